"""The notebooks in notebooks/ run top to bottom, and are committed with their outputs.

Each notebook is executed in memory with nbclient, from the notebooks/ folder; the committed
file is never rewritten. A failing cell fails the test with its number and error.
"""

import os
import pathlib

import nbclient
import nbformat
import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
NAMES = ["01_quickstart", "02_sliding_digits", "03_segmentation", "04_resolution", "05_onnx"]


def _failed_cell(notebook):
    """``(index, error output)`` of the first code cell with an error output, else None."""
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return index, output
    return None


def test_every_notebook_is_tested_and_committed_with_outputs():
    assert [path.stem for path in NOTEBOOKS] == NAMES
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert all(cell.get("execution_count") for cell in code), f"{path.name}: not executed top to bottom"
        assert _failed_cell(notebook) is None, f"{path.name}: committed with an error output"
        assert path.stat().st_size < 300_000, f"{path.name}: {path.stat().st_size} bytes; keep figures small"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    root = str(path.parents[1])  # the kernel imports this checkout's fcnify, not an installed one
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    notebook = nbformat.read(path, as_version=4)  # executed in memory: the file stays as committed
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        failed = _failed_cell(notebook)
        where = f"cell {failed[0]}" if failed else "a cell"
        pytest.fail(f"{path.name}: {where} raised\n{err}", pytrace=False)
