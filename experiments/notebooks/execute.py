"""Runs the notebooks of this folder top to bottom and, with --write, saves them with their outputs (the plots).

    python experiments/notebooks/execute.py --write                 # refresh the committed outputs (size "small")
    python experiments/notebooks/execute.py --size smoke kernels    # what `make test` runs, without writing

Each notebook reads its size from LONGCTX_NOTEBOOK_SIZE ("smoke", "small", "large"; default: by its runtime) and
runs in a kernel of this interpreter, in a scratch directory (anything it trains goes there).
"""

import argparse
import os
import pathlib
import sys
import tempfile

import nbclient
import nbformat

HERE = pathlib.Path(__file__).resolve().parent
NOTEBOOKS = ["quickstart", "position_schemes", "kernels", "sharded_training"]


def execute(name: str, size: str | None, workdir: pathlib.Path, timeout_s: int = 900) -> nbformat.NotebookNode:
    """Notebook `name` executed in `workdir`, with LONGCTX_NOTEBOOK_SIZE=`size` (None: the notebook's choice)."""
    notebook = nbformat.read(HERE / f"{name}.ipynb", as_version=4)
    previous = os.environ.get("LONGCTX_NOTEBOOK_SIZE")
    if size:
        os.environ["LONGCTX_NOTEBOOK_SIZE"] = size  # the kernel inherits this process's environment
    try:
        nbclient.NotebookClient(notebook, timeout=timeout_s, kernel_name="python3",
                                resources={"metadata": {"path": str(workdir)}}).execute()
    finally:
        if previous is None:
            os.environ.pop("LONGCTX_NOTEBOOK_SIZE", None)
        else:
            os.environ["LONGCTX_NOTEBOOK_SIZE"] = previous
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
