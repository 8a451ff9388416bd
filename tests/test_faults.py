"""Runs that break: a SIGKILL in the middle of an epoch, a loss that becomes NaN."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest

from keras_mmtl.data import from_arrays
from keras_mmtl.models import build_classifier_for
from keras_mmtl.training import train
from keras_mmtl.training.callbacks import AtomicBackupAndRestore, BestWeights, NonFiniteLossError

SMALL = dict(image_backbone="small_cnn", image_weights=None, image_size=(16, 16),
             freeze_backbone=True)

# Trains 5 epochs on generated data, logging each epoch it starts; with STALL set, it
# stalls in the middle of epoch 3 so that the test can kill it there.
CHILD = textwrap.dedent("""
    import os
    import sys
    import time

    import keras
    import numpy as np

    from keras_mmtl.data import from_arrays
    from keras_mmtl.models import build_classifier_for
    from keras_mmtl.training import train

    run_dir, log = sys.argv[1], sys.argv[2]

    class Log(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
            with open(log, "a") as f:
                f.write(f"begin {epoch}\\n")

        def on_train_batch_end(self, batch, logs=None):
            if os.environ.get("STALL") and self.epoch == 2 and batch == 1:
                with open(log, "a") as f:
                    f.write("stalled\\n")
                time.sleep(600)

    rng = np.random.default_rng(0)
    labels = ["a", "b"] * 32
    images = rng.integers(0, 255, (64, 16, 16, 3), dtype="uint8")
    records = from_arrays(labels, images=images, texts=["x y"] * 64, splits=["train"] * 64)
    model = build_classifier_for(records, image_backbone="small_cnn", image_weights=None,
                                 image_size=(16, 16))
    # No feature cache: a phase on cached features runs many steps per call, and the stall
    # needs a callback after each batch.
    train(model, records, run_dir, epochs=5, batch_size=8, patience=10, callbacks=[Log()],
          cache_features=False, verbose=0)
""")


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_losing_only_that_epoch(tmp_path):
    script, log, run_dir = tmp_path / "child.py", tmp_path / "epochs.log", tmp_path / "run"
    script.write_text(CHILD)
    command = [sys.executable, str(script), str(run_dir), str(log)]
    child = subprocess.Popen(command, env={**os.environ, "STALL": "1"})
    deadline = time.time() + 300
    while not (log.exists() and "stalled" in log.read_text()):
        assert child.poll() is None and time.time() < deadline, "the child ended early"
        time.sleep(0.5)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (run_dir / "model.keras").exists()

    log.write_text("")
    subprocess.run(command, check=True, timeout=300)
    begun = [int(line.split()[1]) for line in log.read_text().splitlines()
             if line.startswith("begin")]
    assert begun == [2, 3, 4]  # epochs 1 and 2 were kept; epoch 3 starts over
    state = json.loads((run_dir / "state.json").read_text())
    assert state["phases_done"] == 1
    assert state["history"]["epoch"] == [0, 1, 2, 3, 4]  # the killed run's epochs are kept
    assert (run_dir / "model.keras").exists()


class Diverge(keras.callbacks.Callback):
    """Turns the trained weights to NaN as epoch 2 begins, as a diverging run would."""

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            for weight in self.model.trainable_weights:
                weight.assign(np.full(weight.shape, np.nan, weight.dtype))


@pytest.mark.bad_input
def test_nan_loss_stops_with_epoch_and_batch_then_resumes(tmp_path):
    records = from_arrays(["a", "b"] * 16, images=np.zeros((32, 16, 16, 3), "uint8"),
                          texts=["x y"] * 32, splits=["train"] * 32)
    model = build_classifier_for(records, **SMALL)
    with pytest.raises(NonFiniteLossError, match=r"in epoch 2, by batch \d+\."):
        train(model, records, str(tmp_path), epochs=3, fine_tune_epochs=0, batch_size=8,
              callbacks=[Diverge()], verbose=0, projector=False)
    history = train(build_classifier_for(records, **SMALL), records, str(tmp_path), epochs=3,
                    fine_tune_epochs=0, batch_size=8, verbose=0, projector=False)
    assert np.isfinite(history["loss"]).all()


def test_best_weights_are_written_atomically_and_respect_the_resumed_best(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    path = str(tmp_path / "best.weights.h5")
    callback = BestWeights(path, "val_loss", best=0.5)
    callback.set_model(model)
    callback.on_epoch_end(0, {"val_loss": 0.7})  # worse than before the resume
    assert not os.path.exists(path)
    callback.on_epoch_end(1, {"val_loss": 0.4})
    with open(path, "rb") as f:
        saved = f.read()

    def crash(filepath):
        with open(filepath, "wb") as f:
            f.write(b"half a file")
        raise OSError("killed while writing")

    model.save_weights = crash
    with pytest.raises(OSError):
        callback.on_epoch_end(2, {"val_loss": 0.3})
    with open(path, "rb") as f:
        assert f.read() == saved  # the previous best is whole


def test_a_kill_while_the_backup_is_written_leaves_the_previous_backup(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    backup = AtomicBackupAndRestore(str(tmp_path / "backup"))
    backup.set_model(model)
    backup.on_epoch_end(0)
    saved = [w.copy() for w in model.get_weights()]

    def crash(filepath, overwrite=True):
        with open(filepath, "wb") as f:
            f.write(b"half a file")
        raise OSError("killed while writing")

    model.set_weights([w + 1 for w in saved])
    model.save_weights = crash
    with pytest.raises(OSError):
        backup.on_epoch_end(1)
    # A new process resumes from the whole backup of epoch 1.
    restored = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    restored.compile(optimizer="adam", loss="mse")
    resumed = AtomicBackupAndRestore(str(tmp_path / "backup"))
    resumed.set_model(restored)
    resumed.on_train_begin()
    assert restored._initial_epoch == 1
    for got, want in zip(restored.get_weights(), saved):
        np.testing.assert_array_equal(got, want)
