"""The Colab notebooks run top to bottom on the CPU at their smallest size, and their committed files hold the
plots they draw."""

import pathlib
import runpy

import nbformat
import pytest

NOTEBOOKS_DIR = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "notebooks"
execute = runpy.run_path(str(NOTEBOOKS_DIR / "execute.py"))["execute"]
NOTEBOOKS = sorted(path.stem for path in NOTEBOOKS_DIR.glob("*.ipynb"))


def images(cell) -> int:
    return sum("image/png" in output.get("data", {}) for output in cell.get("outputs", []))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_runs_on_the_cpu_at_its_smallest_size(name, tmp_path):
    notebook = execute(name, "smoke", tmp_path)
    errors = [output for cell in notebook.cells for output in cell.get("outputs", [])
              if output.get("output_type") == "error"]
    assert not errors
    assert sum(images(cell) for cell in notebook.cells) > 0


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_the_committed_notebook_shows_its_plots(name):
    notebook = nbformat.read(NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4)
    plotting = [cell for cell in notebook.cells if cell.cell_type == "code" and "plt.show()" in cell.source]
    assert plotting, f"{name} draws nothing"
    assert all(images(cell) for cell in plotting), f"{name}: a plotting cell was committed without its plot"
    assert all(cell.get("execution_count") for cell in notebook.cells if cell.cell_type == "code")


def test_every_notebook_is_known_to_the_runner():
    runner = runpy.run_path(str(NOTEBOOKS_DIR / "execute.py"))["NOTEBOOKS"]
    assert set(NOTEBOOKS) <= set(runner)
