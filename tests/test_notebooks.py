"""Notebooks are stored without outputs and run top to bottom."""

from __future__ import annotations

import json

import nbformat
import pytest
from conftest import REPO, run_cli
from nbclient import NotebookClient

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    notebook = json.loads(path.read_text())
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, path.name


@pytest.mark.slow
def test_unfreeze_notebook_runs_on_a_finished_run(tmp_path, image_folder):
    run_cli(
        tmp_path,
        "model=resnet18",
        "model.weights=null",
        f"data.root={image_folder}",
        "trainer.max_epochs=1",
        "data.image_size=32",
        "data.num_workers=0",
    )
    notebook = nbformat.read(REPO / "notebooks" / "unfreeze_depths.ipynb", as_version=4)
    run_dir = repr(str(tmp_path / "run"))
    notebook.cells[1].source = notebook.cells[1].source.replace("RUN_DIR = None", f"RUN_DIR = {run_dir}")
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}
    ).execute()
    outputs = "".join(str(output) for cell in notebook.cells for output in cell.get("outputs", []))
    assert "| mobilenet_v2 | 19 | `features.18` | `features.17` |" in outputs
    assert "head      classifier.1" in outputs
    assert "classes: ['circle', 'square', 'stripes']" in outputs
