"""Every notebook executes top to bottom through nbclient with small-scale parameters."""

import os

import nbformat
import pytest
from nbclient import NotebookClient
from test_tofu_fixtures import save_tiny_checkpoint
from two_processes import HANG_TIMEOUT

HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOKS = os.path.join(HERE, "..", "notebooks")
SMALL = {
    "01_markov_mixtures.ipynb": "SCALE = 0.01",
    "02_reference_model_bias.ipynb": "SCALE = 0.01\nSTEPS = 3",
    "03_theory_vs_practice.ipynb": "SCALE = 0.005\nPRETRAIN_EPOCHS = 1\nSTEPS = 2\n"
                                   "PRESETS = ('tiny-synthetic', 'tiny-gpt2')",
    # a tiny random Llama with a word-level tokenizer (test_tofu_fixtures.save_tiny_checkpoint) instead of SmolLM2
    "04_tofu_and_theory.ipynb": "MODEL = {model!r}\nLIMIT = 4\nFINETUNE_EPOCHS = 1\nUNLEARN_STEPS = 2\n"
                                "BATCH_SIZE = 4\nMAX_NEW_TOKENS = 3\nRELEARN_STEPS = (0, 1)\nBIAS_STEPS = 2\n"
                                "BIAS_RECORD_EVERY = 1\nBIAS_MAX_ITEMS = 2\nSIM_SCALE = 0.01\nSIM_STEPS = 3\n"
                                "OUT = 'tofu-run'",
}


def notebook_names():
    return sorted(name for name in os.listdir(NOTEBOOKS) if name.endswith(".ipynb"))


def test_every_notebook_has_small_parameters():
    assert notebook_names(), "no notebooks found"
    assert set(notebook_names()) <= set(SMALL)


@pytest.mark.parametrize("name", notebook_names())
def test_notebook_executes(name, tmp_path, monkeypatch):
    notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
        f"{name} is committed with outputs; clear them"
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    small = SMALL[name].format(model=save_tiny_checkpoint(tmp_path / "tiny-model")) if "{model" in SMALL[name] \
        else SMALL[name]
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(small))
    # the kernel must draw inline as Jupyter does, even where the shell (CI) sets a file-only backend
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # the kernel imports this checkout's packages, not whichever checkout the environment installed
    repository = os.path.dirname(HERE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [repository, os.environ.get("PYTHONPATH")])))
    resources = {"metadata": {"path": str(tmp_path)}}
    # per cell; a hang guard only (tests/two_processes.py, HANG_TIMEOUT)
    NotebookClient(notebook, timeout=HANG_TIMEOUT, kernel_name="python3", resources=resources).execute()
    errors = [output for cell in notebook.cells for output in cell.get("outputs", []) if output.output_type == "error"]
    assert not errors
    plotting = [cell for cell in notebook.cells if cell.cell_type == "code" and "plt.show()" in cell.source]
    assert plotting, f"{name} draws nothing"
    for cell in plotting:
        images = [o for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
        assert images, f"{name}: a plotting cell produced no image:\n{cell.source[:200]}"
