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


def _printed(nb):
    """What an executed notebook printed to stdout, once no cell shows an error."""
    outputs = [output for cell in nb.cells if cell.cell_type == "code"
               for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.get("output_type") == "error"]
    return "".join(output.get("text", "") for output in outputs
                   if output.get("output_type") == "stream" and output.get("name") == "stdout")


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
    # The config run_experiment wrote back reloads as the one the notebook saved, with the
    # preset it ran.
    saved = RunConfig.from_file(str(run_dir / "baseline.yaml"))
    written = RunConfig.from_file(str(run_dir / "baseline" / "config.yaml"))
    assert written == saved.replace(training={"preset": "medium"})
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


@pytest.mark.slow
def test_fusion_and_missing_modalities_notebook(tmp_path):
    import csv
    import json
    import re

    with open(os.path.join(NOTEBOOKS, "02_fusion_and_missing_modalities.ipynb"),
              encoding="utf-8") as f:
        nb = nbformat.read(f, as_version=4)
    run_dir, export_dir = tmp_path / "runs" / "fusion", tmp_path / "saved_models" / "fusion"
    _with_parameters(nb, NUM_SAMPLES=180, EPOCHS=1, IMAGE_WEIGHTS=None, VERBOSE=0,
                     RUN_DIR=str(run_dir), EXPORT_DIR=str(export_dir))

    printed = _printed(_execute(nb, str(tmp_path)))
    # One trained and scored model per fusion, in the comparison table.
    for fusion in ("concat", "gated", "attention", "hierarchical", "late", "shared"):
        assert re.search(rf"^{fusion} +[01]\.\d{{3}} +[01]\.\d{{3}} +[\d,]+ +\d+$", printed,
                         re.M), fusion
    # Gates were read from the trained gated fusion; a missing image gets a gate of 0.
    assert re.search(r"^mean over \d+ test samples: image 0\.\d\d, text 0\.\d\d", printed, re.M)
    no_image_gates = re.search(r"^image gates, without images: \[(.*)\]$", printed, re.M)
    assert no_image_gates and {float(g) for g in no_image_gates.group(1).split()} == {0.0}
    # Both missing-modality models have a modality report with the three conditions.
    for i in range(2):
        with open(run_dir / "modalities" / str(i) / "modalities.json", encoding="utf-8") as f:
            assert list(json.load(f)) == ["all inputs", "without image", "without text"]
    # The export answered with class names, with an empty text and with images=None.
    with open(run_dir / "data" / "manifest.csv", newline="", encoding="utf-8") as f:
        labels = {row["label"] for row in csv.DictReader(f)}
    assert (export_dir / "1" / "saved_model.pb").exists()
    for request in ("image and text", "no text", "no image"):
        answer = re.search(rf"^{request} +(.+)$", printed, re.M)
        assert answer, request
        top = [item.rsplit(" ", 1) for item in answer.group(1).split(", ")]
        assert len(top) == 3 and all(name in labels and 0 <= float(p) <= 1 for name, p in top)


@pytest.mark.slow
def test_export_and_serve_notebook(tmp_path):
    import re

    with open(os.path.join(NOTEBOOKS, "04_export_and_serve.ipynb"), encoding="utf-8") as f:
        nb = nbformat.read(f, as_version=4)
    export_dir = tmp_path / "saved_models" / "serving"
    _with_parameters(nb, NUM_SAMPLES=180, EPOCHS=2, IMAGE_WEIGHTS=None, PRUNE_EPOCHS=1,
                     VERBOSE=0, RUN_DIR=str(tmp_path / "runs" / "serving"),
                     EXPORT_DIR=str(export_dir))

    printed = _printed(_execute(nb, str(tmp_path)))
    assert re.search(r"^temperature \d+\.\d{3}; val ECE 0\.\d{4} -> 0\.\d{4}$", printed, re.M)
    assert re.search(r"^\d+ op types; beyond core TensorFlow: \[\]$", printed, re.M)
    assert "signatures: ['embed', 'serving_default']" in printed
    assert (export_dir / "1" / "saved_model.pb").exists()
    assert (tmp_path / "saved_models" / "serving-ensemble" / "1" / "saved_model.pb").exists()
    for quantization in ("float32", "float16", "int8"):
        assert re.search(rf"^TFLite {quantization} +[01]\.\d{{3}} +\d+$", printed, re.M)
    reached = re.search(r"^sparsity (\d\.\d{3}) \(before: 0\.0\d\d\)$", printed, re.M)
    assert reached and abs(float(reached.group(1)) - 0.5) < 0.01
