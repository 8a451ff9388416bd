import os

import pytest

from conftest import product_rows, write_manifest
from keras_mmtl.cli import build_parser, main


@pytest.mark.parametrize("command", [[], ["demo"], ["train"], ["evaluate"], ["export"],
                                     ["predict"], ["tune"]])
def test_help_explains_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: keras-mmtl" in capsys.readouterr().out


def test_train_rejects_a_bad_manifest_with_the_row(tmp_path, capsys):
    rows = product_rows(str(tmp_path))
    rows[4]["image"] = "images/missing.jpg"
    manifest = write_manifest(str(tmp_path), rows)
    assert main(["train", "--manifest", manifest, "--split-column", "split",
                 "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "manifest.csv:6: field 'image': image file not found" in err
    assert "--skip-bad-rows" in err


@pytest.mark.slow
def test_train_evaluate_export_predict(tmp_path, products, capsys):
    run_dir, export_dir = str(tmp_path / "run"), str(tmp_path / "saved" / "products")
    common = ["--manifest", products, "--split-column", "split"]
    assert main(["train", *common, "--image-backbone", "small_cnn", "--image-weights", "none",
                 "--image-size", "16x16", "--epochs", "2", "--batch-size", "8",
                 "--run-dir", run_dir, "--export-dir", export_dir]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "macro" in out
    assert os.path.exists(os.path.join(export_dir, "1", "saved_model.pb"))
    assert os.path.exists(os.path.join(run_dir, "eval", "confusion_matrix.png"))

    model = os.path.join(run_dir, "model.keras")
    assert main(["evaluate", "--model", model, *common, "--out-dir", str(tmp_path / "e")]) == 0
    assert os.path.exists(tmp_path / "e" / "report.json")
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
