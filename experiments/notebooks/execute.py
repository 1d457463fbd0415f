"""Runs the notebooks of this folder top to bottom and, with --write, saves them with their outputs (the plots).

    python experiments/notebooks/execute.py --write                 # refresh the committed outputs (size "small")
    python experiments/notebooks/execute.py --size smoke kernels    # what `make test` runs, without writing

Each notebook reads its size from LONGCTX_NOTEBOOK_SIZE ("smoke", "small", "large"; default: by its runtime) and
runs in a kernel of this interpreter, in a scratch directory (anything it trains goes there), with this process's
environment less a CPU device count forced in XLA_FLAGS (the test suite forces eight): the notebooks see the devices
a fresh runtime has, as on Colab, and sharded_training asks for its eight CPU devices itself.
"""

import argparse
import os
import pathlib
import re
import sys
import tempfile

import nbclient
import nbformat

HERE = pathlib.Path(__file__).resolve().parent
NOTEBOOKS = ["quickstart", "position_schemes", "kernels", "sharded_training"]


def kernel_environment(size: str | None) -> dict[str, str]:
    """This process's environment, with LONGCTX_NOTEBOOK_SIZE=`size` (None: as it is) and without a
    --xla_force_host_platform_device_count in XLA_FLAGS. At size "smoke", which checks that every cell runs, XLA
    compiles without LLVM's optimisations: compiling is most of a smoke run's time, and takes about half as long."""
    env = dict(os.environ)
    if size:
        env["LONGCTX_NOTEBOOK_SIZE"] = size
    xla_flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.pop("XLA_FLAGS", "")).split()
    if size == "smoke":
        xla_flags.append("--xla_backend_optimization_level=0")
    if xla_flags:
        env["XLA_FLAGS"] = " ".join(xla_flags)
    return env


def execute(name: str, size: str | None, workdir: pathlib.Path, timeout_s: int = 900) -> nbformat.NotebookNode:
    """Notebook `name` executed in `workdir`, with LONGCTX_NOTEBOOK_SIZE=`size` (None: the notebook's choice)."""
    notebook = nbformat.read(HERE / f"{name}.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=timeout_s, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}}).execute(env=kernel_environment(size))
    return notebook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"Notebooks to run (default: all of {', '.join(NOTEBOOKS)}).")
    parser.add_argument("--size", choices=["smoke", "small", "large"])
    parser.add_argument("--write", action="store_true", help="Save each executed notebook over its file.")
    args = parser.parse_args()
    for name in args.names or [n for n in NOTEBOOKS if (HERE / f"{n}.ipynb").exists()]:
        with tempfile.TemporaryDirectory() as workdir:
            notebook = execute(name, args.size, pathlib.Path(workdir))
        if args.write:
            nbformat.write(notebook, HERE / f"{name}.ipynb")
        print(f"{name}: ran{' and saved' if args.write else ''}", file=sys.stderr)


if __name__ == "__main__":
    main()
