"""Executes the notebooks with small settings (papermill-style parameter injection)."""

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
CELL_TIMEOUT = 600


def _with_parameters(nb, **params):
    """Inserts a cell that overrides `params` right after the cell tagged "parameters"."""
    index = next(i for i, cell in enumerate(nb.cells)
                 if "parameters" in cell.get("metadata", {}).get("tags", []))
    source = "# Injected by tests/test_notebooks.py\n" + "".join(
        f"{name} = {value!r}\n" for name, value in params.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)
    return nb


def _execute(nb, cwd):
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": cwd}})
    client.execute()
    return nb


@pytest.mark.slow
def test_quickstart_notebook(tmp_path):
    with open(os.path.join(NOTEBOOKS, "01_quickstart.ipynb"), encoding="utf-8") as f:
        nb = nbformat.read(f, as_version=4)
    export_dir = str(tmp_path / "saved_models" / "quickstart")
    _with_parameters(
        nb, NUM_SAMPLES=180, EPOCHS=1, FINE_TUNE_EPOCHS=1, IMAGE_WEIGHTS=None, VERBOSE=0,
        RUN_DIR=str(tmp_path / "runs" / "quickstart"), EXPORT_DIR=export_dir)

    # Raises nbclient.exceptions.CellExecutionError (with the traceback) if a cell fails.
    _execute(nb, str(tmp_path))

    errors = [output for cell in nb.cells if cell.cell_type == "code"
              for output in cell.get("outputs", []) if output.get("output_type") == "error"]
    assert not errors
    versions = [name for name in os.listdir(export_dir) if name.isdigit()]
    assert versions, f"no version folder in {export_dir}: {os.listdir(export_dir)}"
    assert any(os.path.exists(os.path.join(export_dir, v, "saved_model.pb")) for v in versions)


@pytest.mark.slow
def test_training_and_tensorboard_notebook(tmp_path):
    import tensorflow as tf

    from keras_mmtl.config import RunConfig

    with open(os.path.join(NOTEBOOKS, "03_training_and_tensorboard.ipynb"), encoding="utf-8") as f:
        nb = nbformat.read(f, as_version=4)
    run_dir = tmp_path / "runs" / "training"
    _with_parameters(
        nb, NUM_SAMPLES=180, EPOCHS=1, FINE_TUNE_EPOCHS=1, IMAGE_WEIGHTS=None, MAX_TRIALS=2,
        TUNE_EPOCHS=1, TUNE_FINE_TUNE_EPOCHS=0, VERBOSE=0, RUN_DIR=str(run_dir))

    _execute(nb, str(tmp_path))

    errors = [output for cell in nb.cells if cell.cell_type == "code"
              for output in cell.get("outputs", []) if output.get("output_type") == "error"]
    assert not errors
    # The config run_experiment wrote back reloads as the one the notebook saved.
    saved = RunConfig.from_file(str(run_dir / "baseline.yaml"))
    assert RunConfig.from_file(str(run_dir / "baseline" / "config.yaml")) == saved
    assert saved.training.epochs == 1 and saved.data.text_column == "title"
    # Both runs logged loss curves and confusion-matrix images for TensorBoard.
    for run in ("baseline", "regularised"):
        validation = run_dir / run / "logs" / "validation"
        tags = {value.tag for name in os.listdir(validation) if "tfevents" in name
                for event in tf.compat.v1.train.summary_iterator(str(validation / name))
                for value in event.summary.value}
        assert {"epoch_loss", "confusion_matrix"} <= tags, (run, tags)
    # The search ran its trials, and the notebook displayed a PNG image.
    assert len(os.listdir(run_dir / "search" / "trials")) == 2
    assert any("image/png" in output.get("data", {}) for cell in nb.cells
               if cell.cell_type == "code" for output in cell.get("outputs", []))
