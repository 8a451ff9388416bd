import json
import os
import uuid
import warnings

import keras
import pytest
import tensorflow as tf

from conftest import product_rows, write_image, write_manifest
from keras_mmtl import cli
from keras_mmtl.cli import build_parser, main
from keras_mmtl.data import DataWarning


@pytest.mark.parametrize("command", [[], ["demo"], ["train"], ["evaluate"], ["export"],
                                     ["predict"], ["tune"], ["explain"]])
def test_help_explains_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: keras-mmtl" in capsys.readouterr().out


@pytest.mark.bad_input
def test_train_rejects_a_bad_manifest_with_the_row(tmp_path, capsys):
    rows = product_rows(str(tmp_path))
    rows[4]["image"] = "images/missing.jpg"
    manifest = write_manifest(str(tmp_path), rows)
    assert main(["train", "--manifest", manifest, "--split-column", "split",
                 "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "manifest.csv:6: field 'image': image file not found" in err
    assert "--skip-bad-rows" in err


@pytest.mark.bad_input
def test_train_refuses_a_manifest_of_one_class(tmp_path, capsys):
    rows = product_rows(str(tmp_path))
    for row in rows:
        row["label"] = "red cotton"
    manifest = write_manifest(str(tmp_path), rows)
    assert main(["train", "--manifest", manifest, "--image-backbone", "small_cnn",
                 "--image-weights", "none", "--image-size", "16x16", "--epochs", "1",
                 "--no-export", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "the label column 'label' has 1 distinct label ('red cotton')" in err
    assert "--label-column" in err
    assert not (tmp_path / "run").exists()  # stopped before any work


@pytest.mark.slow
def test_a_rerun_resumes_only_what_the_same_settings_and_data_trained(tmp_path, capsys,
                                                                      monkeypatch):
    rows = product_rows(str(tmp_path))
    manifest = write_manifest(str(tmp_path), rows)
    run_dir, export_dir = tmp_path / "run", tmp_path / "saved"
    common = ["--manifest", manifest, "--split-column", "split", "--image-backbone", "small_cnn",
              "--image-weights", "none", "--image-size", "16x16", "--batch-size", "8",
              "--no-projector", "--run-dir", str(run_dir), "--export-dir", str(export_dir)]
    assert main(["train", *common, "--epochs", "1"]) == 0
    config = (run_dir / "config.yaml").read_text()
    capsys.readouterr()
    # The same settings (here from the written config) and data: the finished run is reused.
    assert main(["train", "--config", str(run_dir / "config.yaml")]) == 0
    assert "is finished; loading its best weights" in capsys.readouterr().out
    assert sorted(os.listdir(export_dir)) == ["1", "2"]

    def refused(*args, **kwargs):
        raise AssertionError("images checked: the run went on")

    monkeypatch.setattr("keras_mmtl.data.manifest.find_undecodable", refused)
    write_image(str(tmp_path / rows[0]["image"]), (30, 220, 30))  # a replaced image alone
    assert main(["train", *common, "--epochs", "1"]) == 2
    assert ("What changed: the data of data.manifest (its rows or image files). To train"
            in capsys.readouterr().err)
    for row in rows:  # relabelled, with other settings
        row["label"] = row["label"].replace("red", "green")
    write_manifest(str(tmp_path), rows)
    assert main(["train", *common, "--epochs", "2", "--learning-rate", "0.01"]) == 2
    err = capsys.readouterr().err
    for said in ("training.epochs 1 -> 2", "training.learning_rate 0.001 -> 0.01",
                 "the data of data.manifest", "--overwrite", "--run-dir"):
        assert said in err
    assert (run_dir / "config.yaml").read_text() == config
    assert sorted(os.listdir(export_dir)) == ["1", "2"]  # nothing exported

    monkeypatch.undo()
    assert main(["train", *common, "--epochs", "2", "--learning-rate", "0.01",
                 "--overwrite"]) == 0
    assert not (run_dir / "member1-text").exists()  # text experts are not trained
    for member in ("member1", "member1-image"):  # the fused model, its image expert
        state = json.loads((run_dir / member / "state.json").read_text())
        assert state["history"]["epoch"] == [0, 1]  # trained again, on the new settings
    assert "green cotton" in capsys.readouterr().out
    assert sorted(os.listdir(export_dir)) == ["1", "2", "3"]


@pytest.mark.slow
def test_train_evaluate_export_predict(tmp_path, products, capsys):
    run_dir, export_dir = str(tmp_path / "run"), str(tmp_path / "saved" / "products")
    common = ["--manifest", products, "--split-column", "split"]
    assert main(["train", *common, "--image-backbone", "small_cnn", "--image-weights", "none",
                 "--image-size", "16x16", "--epochs", "2", "--batch-size", "8",
                 "--test-time-mirror", "--no-modality-experts", "--run-dir", run_dir,
                 "--export-dir", export_dir]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "macro" in out
    assert os.path.exists(os.path.join(export_dir, "1", "saved_model.pb"))
    assert os.path.exists(os.path.join(run_dir, "eval", "confusion_matrix.png"))

    model = os.path.join(run_dir, "model.keras")
    # With --test-time-mirror the served model averages each image with its mirror image.
    assert "mirror_image" in [layer.name for layer in keras.models.load_model(model).layers]
    assert main(["evaluate", "--model", model, *common, "--out-dir", str(tmp_path / "e")]) == 0
    assert os.path.exists(tmp_path / "e" / "report.json")
    # The run's config reads the data as the run did: no data flags to repeat.
    assert main(["evaluate", "--model", model, "--config", os.path.join(run_dir, "config.yaml"),
                 "--out-dir", str(tmp_path / "c")]) == 0
    assert os.path.exists(tmp_path / "c" / "report.json")
    assert main(["export", "--model", model, "--export-dir", export_dir]) == 0
    assert os.path.isdir(os.path.join(export_dir, "2"))

    capsys.readouterr()
    image = os.path.join(os.path.dirname(products), "images", "000.jpg")
    assert main(["predict", "--model", export_dir, "--image", image, "--text",
                 "a nice cotton thing", "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(" " in line for line in lines)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["--joint", "--domain-adversarial"]])
def test_train_transfers_from_a_source_manifest(tmp_path, products, capsys, mode):
    rows = product_rows(str(tmp_path))
    for row in rows:
        row["label"] = f"new {row['label']}"
    target = write_manifest(str(tmp_path), rows, name="target.csv")
    run_dir = tmp_path / "run"
    assert main(["train", "--manifest", target, "--source-manifest", products,
                 "--split-column", "split", "--image-backbone", "small_cnn",
                 "--image-weights", "none", "--image-size", "16x16", "--epochs", "1",
                 "--fine-tune-epochs", "1", "--batch-size", "4", "--run-dir", str(run_dir),
                 "--no-export", *mode]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out
    model = run_dir / ("model.keras" if mode else os.path.join("target", "model.keras"))
    assert model.exists() and f"Model saved to {model}" in out


def test_joint_needs_a_source_manifest(tmp_path, products, capsys):
    assert main(["train", "--manifest", products, "--joint"]) == 2
    assert "need transfer.source_manifest (--source-manifest)" in capsys.readouterr().err


@pytest.mark.slow
def test_tune_writes_a_best_config_that_train_runs(tmp_path, products, capsys):
    from keras_mmtl.config import RunConfig

    run_dir = tmp_path / "search"
    small = ["--manifest", products, "--split-column", "split", "--image-backbone", "small_cnn",
             "--image-weights", "none", "--image-size", "16x16", "--epochs", "1",
             "--batch-size", "8"]
    assert main(["tune", *small, "--run-dir", str(run_dir), "--max-trials", "2",
                 "--search", "learning_rate", "dropout"]) == 0
    out = capsys.readouterr().out
    best = run_dir / "best_config.yaml"
    assert f"Best config written to {best}" in out
    config = RunConfig.from_file(str(best))
    assert 1e-4 <= config.training.learning_rate <= 3e-3 and config.training.epochs == 1
    assert config.output.run_dir == str(run_dir / "best")
    assert main(["train", "--config", str(best), "--no-export"]) == 0
    assert (run_dir / "best" / "model.keras").exists()


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A model.keras of a tiny image + text classifier (untrained), beside its data."""
    from keras_mmtl.data import read_manifest
    from keras_mmtl.models import build_classifier_for

    folder = tmp_path_factory.mktemp("small_model")
    manifest = write_manifest(str(folder), product_rows(str(folder)))
    model = build_classifier_for(read_manifest(manifest, split_column="split"),
                                 image_backbone="small_cnn", image_weights=None,
                                 image_size=(16, 16))
    model.save(str(folder / "model.keras"))
    return str(folder / "model.keras"), manifest


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.mark.bad_input
@pytest.mark.parametrize("case, message", [
    ("truncated", "not a complete .keras file (a zip archive); it may be truncated"),
    ("empty", "not a complete .keras file"),
    ("folder", "is a folder, not a model file; did you mean"),
    ("missing", "model file not found"),
])
def test_a_model_that_cannot_be_loaded_is_one_line(tmp_path, capsys, small_model, case, message):
    model, manifest = small_model
    path = str(tmp_path / "model.keras")
    if case == "truncated":
        data = open(model, "rb").read()
        open(path, "wb").write(data[:len(data) // 2])
    elif case == "empty":
        open(path, "wb").close()
    elif case == "folder":
        path = os.path.dirname(model)
    assert main(["evaluate", "--model", path, "--manifest", manifest]) == 2
    assert message in _one_line_error(capsys)


@pytest.mark.bad_input
@pytest.mark.parametrize("case, message", [
    ("undecodable image",
     "cannot predict: Input image: items that are not a JPEG/PNG/GIF/BMP/WebP image (0-based): 0"),
    ("no image", "cannot predict: This model needs inputs ['image', 'text']; missing: ['image']"),
])
def test_predict_with_an_unusable_input_is_one_line(tmp_path, capsys, small_model, case, message):
    model, _ = small_model
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not a jpeg")
    image = ["--image", str(bad)] if case == "undecodable image" else []
    assert main(["predict", "--model", model, *image, "--text", "a nice wool thing"]) == 2
    error = _one_line_error(capsys)
    assert message in error and (not image or error.endswith(f"(--image {bad})"))


def test_ctrl_c_is_one_line_and_exit_130(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_export", interrupted)
    try:
        code = main(["export", "--model", "m.keras", "--export-dir", "out"])
    except KeyboardInterrupt:  # a failure of this test, not the end of the test run
        code = "KeyboardInterrupt escaped"
    assert code == 130
    assert capsys.readouterr().err.strip() == "interrupted: run the same command to resume"


def test_data_warnings_print_without_python_source(monkeypatch):
    shown = []

    def command(args):  # how a warning raised while the command runs is written
        shown.append(warnings.formatwarning("Skipped 1 of 24 rows", DataWarning, "m.py", 10))
        shown.append(warnings.formatwarning("other", UserWarning, "x.py", 3))

    monkeypatch.setattr(cli, "cmd_export", command)
    assert main(["export", "--model", "m.keras", "--export-dir", "out"]) == 0
    assert shown[0] == "warning: Skipped 1 of 24 rows\n"
    assert "x.py:3" in shown[1]  # other warnings as Python writes them


def test_predict_scores_a_manifest_into_a_file(tmp_path, capsys, small_model):
    model, manifest = small_model
    output = tmp_path / "scores.jsonl"
    assert main(["predict", "--model", model, "--manifest", manifest, "--output", str(output),
                 "--batch-size", "5", "--top-k", "2"]) == 0
    assert capsys.readouterr().out.endswith(f"rows/s). Written to {output}\n")
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["line"] for r in records] == list(range(2, 26))
    assert all(len(r["top"]) == 2 and r["label"] == r["top"][0]["label"] for r in records)


@pytest.mark.bad_input
@pytest.mark.parametrize("arguments, message", [
    (["--text", "wool", "--manifest", "M", "--output", "O.csv"], "not both"),
    ([], "give --image and/or --text to score one sample, or --manifest and --output"),
    (["--manifest", "M"], "or --manifest and --output (a .csv or .jsonl file)"),
    (["--manifest", "missing.csv", "--output", "O.csv"], "cannot predict: Manifest not found: "),
    (["--manifest", "M", "--output", "O.csv", "--image-column", "photo"],
     "cannot predict: manifest.csv: missing column(s) ['photo']. Columns found:"),
    (["--manifest", "M", "--output", "O.txt"],
     "O.txt: expected a name ending in .csv or .jsonl"),
])
def test_predict_with_an_unusable_manifest_or_output_is_one_line(tmp_path, capsys, small_model,
                                                                 arguments, message):
    model, manifest = small_model
    arguments = [manifest if value == "M" else str(tmp_path / value) if value.startswith("O.")
                 else value for value in arguments]
    assert main(["predict", "--model", model, *arguments]) == 2
    assert message in _one_line_error(capsys)


def test_evaluate_loads_a_remote_model_and_writes_its_report_beside_it(small_model, capsys):
    model, manifest = small_model
    folder = f"ram://models-{uuid.uuid4().hex}"
    tf.io.gfile.makedirs(folder)
    tf.io.gfile.copy(model, f"{folder}/model.keras")
    assert main(["evaluate", "--model", folder, "--manifest", manifest]) == 2
    assert f"did you mean {folder}/model.keras?" in _one_line_error(capsys)
    assert main(["evaluate", "--model", f"{folder}/model.keras", "--manifest", manifest,
                 "--split-column", "split"]) == 0
    assert "report.json" in tf.io.gfile.listdir(f"{folder}/eval")
