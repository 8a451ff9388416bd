import io
import logging
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import write_image

from keras_mmtl import progress
from keras_mmtl.data.images import find_undecodable
from keras_mmtl.progress import Progress, keras_verbose, predict_with_progress, set_verbosity
from keras_mmtl.startup import is_command, without_noise


@pytest.fixture
def restore_verbosity():
    yield
    set_verbosity("info")


@pytest.fixture
def non_interactive(monkeypatch):
    monkeypatch.setattr(progress, "interactive", lambda: False)


def test_messages_go_to_the_current_stdout_and_verbosity_hides_them(capsys, restore_verbosity):
    progress.logger.info("phase 1")
    set_verbosity("warning")
    progress.logger.info("hidden")
    progress.logger.warning("a problem")
    assert capsys.readouterr().out == "phase 1\na problem\n"


def test_verbosity_none_hands_messages_to_the_root_logger(caplog, capsys, restore_verbosity):
    set_verbosity(None)
    with caplog.at_level(logging.INFO):
        progress.logger.info("to the root")
    assert caplog.messages == ["to the root"] and capsys.readouterr().out == ""


@pytest.mark.bad_input
def test_an_unknown_verbosity_names_the_choices(restore_verbosity):
    with pytest.raises(ValueError, match="Unknown verbosity 'loud'.*'warning'"):
        set_verbosity("loud")


@pytest.mark.parametrize("shown, interactive, expected", [
    ("info", True, 1), ("info", False, 2), ("warning", True, 0)])
def test_keras_verbose_follows_the_display_and_the_verbosity(monkeypatch, restore_verbosity,
                                                            shown, interactive, expected):
    monkeypatch.setattr(progress, "interactive", lambda: interactive)
    set_verbosity(shown)
    assert keras_verbose() == expected
    assert keras_verbose(2) == 2  # given explicitly: kept


def test_a_long_step_is_one_line_when_not_on_a_terminal(capsys, non_interactive):
    with Progress("Checking images", 10, unit="images") as bar:
        bar.add(4)
        bar.add(6)
    out = capsys.readouterr().out
    assert out.startswith("Checking images: 10 images in ") and out.count("\n") == 1


def test_a_long_step_is_a_bar_on_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(progress, "interactive", lambda: True)
    with Progress("Checking images", 10, unit="images") as bar:
        bar.add(10)
    out = capsys.readouterr().out
    assert out.startswith("Checking images:\n") and "10/10" in out


def test_quiet_shows_no_progress_and_a_failed_step_no_summary(capsys, non_interactive,
                                                              restore_verbosity):
    with pytest.raises(RuntimeError):
        with Progress("Scoring", 5) as bar:
            raise RuntimeError("boom")
    set_verbosity("warning")
    with Progress("Scoring", 5) as bar:
        bar.add(5)
    assert capsys.readouterr().out == ""


def test_predict_with_progress_counts_every_row(capsys, non_interactive):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    x = np.random.default_rng(0).normal(size=(10, 3)).astype("float32")
    import tensorflow as tf

    data = tf.data.Dataset.from_tensor_slices(x).batch(4)
    np.testing.assert_allclose(predict_with_progress(model, data, "Scoring", 10, 4),
                               model.predict(x, verbose=0), rtol=1e-6)
    assert capsys.readouterr().out.startswith("Scoring: 10 rows in ")


def test_checking_images_reports_its_progress(tmp_path, capsys, non_interactive):
    paths = [str(tmp_path / f"{i}.jpg") for i in range(3)]
    for path in paths:
        write_image(path, (200, 0, 0))
    assert find_undecodable(paths) == {}
    assert capsys.readouterr().out.startswith("Checking images: 3 images in ")


def test_each_distinct_image_is_checked_once_in_chunks_and_a_bad_one_named_on_every_row(
        tmp_path, capsys, non_interactive, monkeypatch):
    monkeypatch.setattr("keras_mmtl.data.images.CHECK_CHUNK", 2)
    good = [str(tmp_path / f"{i}.jpg") for i in range(3)]
    for path in good:
        write_image(path, (0, 200, 0))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    paths = [good[0], str(bad), good[1], good[0], good[2], str(bad), good[1], str(bad)]
    failures = find_undecodable(paths)
    assert sorted(failures) == [1, 5, 7]
    assert all("cannot decode image" in failures[i] and str(bad) in failures[i] for i in failures)
    assert capsys.readouterr().out.startswith("Checking images: 4 images in ")


@pytest.mark.parametrize("argv, expected", [
    (["/venv/bin/keras-mmtl", "train"], True),
    (["python3", "-m", "keras_mmtl", "demo"], True),
    (["python3", "-m", "pytest", "keras_mmtl"], False),
    (["python3", "train.py", "keras-mmtl"], False),
])
def test_the_command_is_recognised(argv, expected):
    assert is_command(argv) is expected


def test_only_the_start_up_info_lines_are_held_back():
    kept = "E0000 00:00:1.2 7 cuda_dnn.cc:8] Unable to register cuDNN factory\nplain text\n"
    noise = ("WARNING: All log messages before absl::InitializeLog() is called are written to "
             "STDERR\nI0000 00:00:1.1 7 port.cc:153] oneDNN custom operations are on.\n"
             "To enable the following instructions: AVX2 FMA, in other operations\n")
    assert without_noise(noise + kept) == kept


@pytest.mark.slow
@pytest.mark.parametrize("level, args, shown", [
    (None, ["--version"], False), ("0", ["--version"], True),
    (None, ["export", "--verbose", "--help"], True)])
def test_the_command_starts_without_tensorflow_noise(level, args, shown):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    if level is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = level
    result = subprocess.run([sys.executable, "-m", "keras_mmtl", *args], env=env,
                            capture_output=True, text=True, check=True)
    assert result.stdout.startswith(("keras-mmtl ", "usage: keras-mmtl"))
    assert ("I0000" in result.stderr or "oneDNN" in result.stderr) is shown, result.stderr


@pytest.mark.parametrize("shell, expected", [(None, False), ("TerminalInteractiveShell", False),
                                             ("ZMQInteractiveShell", True)])
def test_a_notebook_is_recognised_by_its_kernel_not_by_an_import(monkeypatch, shell, expected):
    import types

    fake = types.ModuleType("IPython")
    fake.get_ipython = lambda: None if shell is None else type(shell, (), {})()
    monkeypatch.setitem(sys.modules, "IPython", fake)
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # not a terminal
    assert progress.interactive() is expected
