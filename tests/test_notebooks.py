"""Executes the notebooks with small settings (papermill-style parameter injection)."""

import csv
import json
import os
import re

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
    """Runs every cell; nbclient raises CellExecutionError (with the traceback) if one fails."""
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": cwd}})
    client.execute()
    return nb


def _outputs(nb):
    return [output for cell in nb.cells if cell.cell_type == "code"
            for output in cell.get("outputs", [])]


def _printed(nb):
    """What an executed notebook printed to stdout."""
    return "".join(output.get("text", "") for output in _outputs(nb)
                   if output.get("output_type") == "stream" and output.get("name") == "stdout")


def _displayed(nb, mime):
    """The outputs of type `mime` (e.g. "image/png") the notebook displayed, in order."""
    return [output["data"][mime] for output in _outputs(nb) if mime in output.get("data", {})]


def _manifest_rows(run_dir):
    with open(os.path.join(run_dir, "data", "manifest.csv"), newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _top(guesses, class_names):
    """`"name p, name p, ..."` as [(name, p)], checked: known names, probabilities falling."""
    top = [(name, float(p)) for name, p in (item.rsplit(" ", 1) for item in guesses.split(", "))]
    assert all(name in class_names and 0 <= p <= 1 for name, p in top), top
    assert [p for _, p in top] == sorted((p for _, p in top), reverse=True), top
    assert sum(p for _, p in top) <= 1.0 + 0.01 * len(top), top  # shown to 2 decimals
    return top


@pytest.mark.slow
def test_quickstart_notebook(tmp_path):
    with open(os.path.join(NOTEBOOKS, "01_quickstart.ipynb"), encoding="utf-8") as f:
        nb = nbformat.read(f, as_version=4)
    run_dir, export_dir = tmp_path / "runs" / "quickstart", tmp_path / "saved_models" / "quickstart"
    _with_parameters(
        nb, NUM_SAMPLES=180, EPOCHS=1, FINE_TUNE_EPOCHS=1, IMAGE_WEIGHTS=None, VERBOSE=0,
        RUN_DIR=str(run_dir), EXPORT_DIR=str(export_dir))

    printed = _printed(_execute(nb, str(tmp_path)))
    rows = _manifest_rows(run_dir)
    class_names = sorted({row["label"] for row in rows})
    tests = sum(row["split"] == "test" for row in rows)
    assert len(rows) == 180 and re.search(r"manifest\.csv: 180 rows\.", printed)
    # The comparison table: one trained model per input, one epoch each.
    (table,) = _displayed(nb, "text/markdown")
    scores = {title: (float(accuracy), int(epochs)) for title, accuracy, epochs in re.findall(
        r"^\| (image only|text only|image \+ text) \| ([01]\.\d{3}) \| [01]\.\d{3} \| (\d+) "
        r"\| [\d,]+ \|$", table, re.M)}
    assert sorted(scores) == ["image + text", "image only", "text only"], table
    assert all(epochs == 1 for _, epochs in scores.values()), scores
    # The gain it prints is the table's, over the test split's samples.
    gain = re.search(r"^Fused model vs the best single modality: ([+-]\d+\.\d) points of "
                     r"accuracy \((\d+) test samples\)\.$", printed, re.M)
    best_single = max(scores["image only"][0], scores["text only"][0])
    assert gain and int(gain.group(2)) == tests, printed
    assert float(gain.group(1)) == pytest.approx(100 * (scores["image + text"][0] - best_single),
                                                 abs=0.2)
    # The fused model's report: printed, and written with the files it lists.
    summary = re.search(r"^accuracy (\d\.\d{4}) \| macro P .* \| (\d+) samples$", printed, re.M)
    assert summary and int(summary.group(2)) == tests, printed
    assert float(summary.group(1)) == pytest.approx(scores["image + text"][0], abs=6e-4)
    with open(run_dir / "image_text" / "eval" / "report.json", encoding="utf-8") as f:
        report = json.load(f)
    assert report["accuracy"] == pytest.approx(float(summary.group(1)), abs=6e-5)
    assert report["class_names"] == class_names and report["num_samples"] == tests
    assert (run_dir / "image_text" / "eval" / "confusion_matrix.png").stat().st_size > 0
    # The explanation: a known class, modality shares that add up, saved.
    explained = re.search(r"^Explaining '(.+)' \(probability (\d\.\d{3})\); predicted '(.+)'\.$",
                          printed, re.M)
    assert explained and {explained.group(1), explained.group(3)} <= set(class_names), printed
    shares = re.search(r"^Modality shares: image (\d+)% .*, text (\d+)% ", printed, re.M)
    assert shares and abs(int(shares.group(1)) + int(shares.group(2)) - 100) <= 1, printed
    assert (run_dir / "image_text" / "explanation" / "explanation.html").exists()
    # Learning curves, confusion matrix, attribution heatmap, word bars: four figures.
    assert len(_displayed(nb, "image/png")) >= 4
    # The export answered the three test samples with known classes, most likely first.
    versions = [name for name in os.listdir(export_dir) if name.isdigit()]
    assert versions and all((export_dir / v / "saved_model.pb").exists() for v in versions)
    answers = re.findall(r"^title: '.*' \| true: (.+) \| predicted: (.+)$", printed, re.M)
    assert len(answers) == 3, printed
    for true, guesses in answers:
        assert true in class_names and len(_top(guesses, class_names)) == 3


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

    printed = _printed(_execute(nb, str(tmp_path)))
    tests = sum(row["split"] == "test" for row in _manifest_rows(run_dir))
    assert re.search(r"^replicas in sync: [1-9]\d*$", printed, re.M), printed
    summary = re.search(r"^accuracy (\d\.\d{4}) \| .* \| (\d+) samples$", printed, re.M)
    assert summary and int(summary.group(2)) == tests, printed
    assert re.search(r"config\.yaml written; the same config, with the preset it ran "
                     r"\('medium'\): True$", printed, re.M), printed
    # Both runs in the comparison: one epoch each, scores in range.
    runs = re.findall(r"^(baseline|regularised) +([01]\.\d{3}) +[01]\.\d{3} +(\d+) +(\d+) "
                      r"+([01]\.\d{3}) +[01]\.\d{3}$", printed, re.M)
    assert [(run, best, epochs) for run, _, best, epochs, _ in runs] == [
        ("baseline", "1", "1"), ("regularised", "1", "1")], printed
    # The run's test accuracy in the table is the one run_experiment's report printed.
    assert float(runs[0][4]) == pytest.approx(float(summary.group(1)), abs=6e-4)
    curves = re.search(r"^  epoch_loss +(.+)$", printed, re.M)
    assert curves and len(curves.group(1).split()) == 1, printed
    # The search: its best score is the best of the trials it tabled.
    table = re.search(r"^trial +learning_rate .* val_accuracy\n((?:\d+ .*\n)+)", printed, re.M)
    best = re.search(r"^best val_accuracy ([01]\.\d{3}) with \{'learning_rate': ", printed, re.M)
    assert table and best, printed
    scores = [float(line.split()[-1]) for line in table.group(1).splitlines()]  # 4 digits
    assert len(scores) == 2
    assert float(best.group(1)) == pytest.approx(max(scores), abs=6e-4)
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
    # Learning curves of both runs and the confusion matrix read back from the logs.
    assert len(_displayed(nb, "image/png")) >= 3


@pytest.mark.slow
def test_fusion_and_missing_modalities_notebook(tmp_path):
    with open(os.path.join(NOTEBOOKS, "02_fusion_and_missing_modalities.ipynb"),
              encoding="utf-8") as f:
        nb = nbformat.read(f, as_version=4)
    run_dir, export_dir = tmp_path / "runs" / "fusion", tmp_path / "saved_models" / "fusion"
    _with_parameters(nb, NUM_SAMPLES=180, EPOCHS=1, IMAGE_WEIGHTS=None, VERBOSE=0,
                     RUN_DIR=str(run_dir), EXPORT_DIR=str(export_dir))

    printed = _printed(_execute(nb, str(tmp_path)))
    # One trained and scored model per fusion, in the comparison table.
    for fusion in ("concat", "gated", "attention", "hierarchical", "late", "shared"):
        assert re.search(rf"^{fusion} +[01]\.\d{{3}} +[01]\.\d{{3}} +[\d,]+ +1$", printed,
                         re.M), fusion
    tests = sum(row["split"] == "test" for row in _manifest_rows(run_dir))
    assert f"({tests} test samples)" in printed
    assert len(_displayed(nb, "image/png")) >= 4  # scores, gates, heatmap, word bars
    # Gates were read from the trained gated fusion; a missing image gets a gate of 0.
    assert re.search(r"^mean over \d+ test samples: image 0\.\d\d, text 0\.\d\d", printed, re.M)
    no_image_gates = re.search(r"^image gates, without images: \[(.*)\]$", printed, re.M)
    assert no_image_gates and {float(g) for g in no_image_gates.group(1).split()} == {0.0}
    # Both missing-modality models have a modality report with the three conditions.
    for i in range(2):
        with open(run_dir / "modalities" / str(i) / "modalities.json", encoding="utf-8") as f:
            assert list(json.load(f)) == ["all inputs", "without image", "without text"]
    # The export answered with class names, with an empty text and with images=None.
    labels = {row["label"] for row in _manifest_rows(run_dir)}
    assert (export_dir / "1" / "saved_model.pb").exists()
    for request in ("image and text", "no text", "no image"):
        answer = re.search(rf"^{request} +(.+)$", printed, re.M)
        assert answer and len(_top(answer.group(1), labels)) == 3, request


@pytest.mark.slow
def test_export_and_serve_notebook(tmp_path):
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
    rows = _manifest_rows(tmp_path / "runs" / "serving")
    labels, tests = {row["label"] for row in rows}, sum(row["split"] == "test" for row in rows)
    served = re.search(r"^labels: \[(.+)\]$", printed, re.M)
    assert served and {label.strip("'") for label in served.group(1).split(", ")} <= labels
    # Every TFLite model scores as the Keras model does (float16, int8: within 1, 2 samples).
    keras_accuracy = re.search(r"^Keras +([01]\.\d{3})$", printed, re.M)
    assert keras_accuracy, printed
    sizes = {}
    for quantization, samples in (("float32", 0), ("float16", 1), ("int8", 2)):
        line = re.search(rf"^TFLite {quantization} +([01]\.\d{{3}}) +(\d+)$", printed, re.M)
        assert line, quantization
        difference = abs(float(line.group(1)) - float(keras_accuracy.group(1)))
        assert difference <= samples / tests + 1e-3, (quantization, difference)
        sizes[quantization] = int(line.group(2))
        written = tmp_path / "saved_models" / "serving-tflite" / f"{quantization}.tflite"
        assert round(written.stat().st_size / 1024) == sizes[quantization], quantization
    assert sizes["int8"] < sizes["float16"] < sizes["float32"]
    reached = re.search(r"^sparsity (\d\.\d{3}) \(before: 0\.0\d\d\)$", printed, re.M)
    assert reached and abs(float(reached.group(1)) - 0.5) < 0.01
    compressed = re.search(r"^compressed weights: (\d+) KiB -> (\d+) KiB$", printed, re.M)
    assert compressed and int(compressed.group(2)) < int(compressed.group(1))
