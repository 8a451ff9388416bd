"""The command's checks before any work, its one-line errors, --version and --quiet."""

import pytest
from conftest import product_rows, write_manifest

from keras_mmtl import __version__, cli
from keras_mmtl.cli import main
from keras_mmtl.op_audit import OpAuditError
from keras_mmtl.training.callbacks import NonFiniteLossError


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"keras-mmtl {__version__}\n"


@pytest.mark.parametrize("flag, value, message", [
    ("--fusion", "concatt", "argument --fusion: invalid choice: 'concatt'"),
    ("--image-backbone", "mobilenet", "argument --image-backbone: invalid choice: 'mobilenet'"),
    ("--text-encoder", "ngram", "argument --text-encoder: Unknown text encoder 'ngram'"),
])
@pytest.mark.bad_input
def test_a_typo_in_a_name_stops_before_any_work(tmp_path, capsys, flag, value, message):
    manifest = write_manifest(str(tmp_path), product_rows(str(tmp_path)))
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--manifest", manifest, flag, value, "--run-dir", str(tmp_path / "run")])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key, value, message", [
    ("fusion", "gate", "model.fusion is 'gate'; expected one of ['concat', 'gated'"),
    ("text_encoder", "bert-tiny", "model.text_encoder: Unknown text encoder 'bert-tiny'"),
])
@pytest.mark.bad_input
def test_a_typo_in_a_config_file_is_one_line(tmp_path, capsys, key, value, message):
    manifest = write_manifest(str(tmp_path), product_rows(str(tmp_path)))
    config = tmp_path / "config.yaml"
    config.write_text(f"data:\n  manifest: {manifest}\nmodel:\n  {key}: {value}\n")
    assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("error, shown", [
    (NonFiniteLossError("The loss became nan in epoch 3; lower the learning rate"),
     "error: The loss became nan in epoch 3; lower the learning rate"),
    (OpAuditError("The graph uses custom ops ['FastBertNormalize']"),
     "error: The graph uses custom ops ['FastBertNormalize']"),
    (FileExistsError("Export version saved_models/demo/3 already exists"),
     "error: Export version saved_models/demo/3 already exists"),
    (ImportError("tune() needs KerasTuner: pip install keras-mmtl[tune]"),
     "error: tune() needs KerasTuner: pip install keras-mmtl[tune]"),
])
@pytest.mark.bad_input
def test_known_errors_are_one_line_and_exit_2(capsys, monkeypatch, error, shown):
    def fails(args):
        raise error

    monkeypatch.setattr(cli, "cmd_export", fails)
    assert main(["export", "--model", "m.keras", "--export-dir", "out"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(shown), err


def test_an_import_error_of_a_bug_keeps_its_traceback(monkeypatch):
    def fails(args):
        raise ImportError("cannot import name 'thing' from 'keras_mmtl.models'")

    monkeypatch.setattr(cli, "cmd_export", fails)
    with pytest.raises(ImportError, match="cannot import name"):
        main(["export", "--model", "m.keras", "--export-dir", "out"])


@pytest.mark.slow
def test_quiet_prints_the_results_only(tmp_path, capsys):
    manifest = write_manifest(str(tmp_path), product_rows(str(tmp_path)))
    common = ["--manifest", manifest, "--split-column", "split", "--image-backbone", "small_cnn",
              "--image-weights", "none", "--image-size", "16x16", "--epochs", "1",
              "--no-projector", "--no-export", "--no-modality-experts"]  # one model is enough
    assert main(["train", "--quiet", *common, "--run-dir", str(tmp_path / "quiet")]) == 0
    quiet = capsys.readouterr().out
    assert main(["train", *common, "--run-dir", str(tmp_path / "told")]) == 0
    told = capsys.readouterr().out
    for step in ("Phase 1/", "Checking images: ", "val_macro_f1", "Scoring the test split"):
        assert step in told and step not in quiet
    assert "macro-F1" in quiet and "Model saved to" in quiet
