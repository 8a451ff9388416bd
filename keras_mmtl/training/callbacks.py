"""Callbacks of the trainer beyond Keras' own, and the atomic writes they use."""

import math
import os

import keras


class NonFiniteLossError(FloatingPointError):
    """Raised when the training loss becomes NaN or infinite."""


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops training as soon as the loss is NaN or infinite, saying at which epoch and batch.

    Keras' `TerminateOnNaN` only names the batch, and the run then ends as if
    it had finished. This raises `NonFiniteLossError` instead, so nothing
    downstream uses the broken weights; the run keeps its checkpoints and
    backup, so it resumes from its last finished epoch.

    Args:
        run_dir: the run folder, named in the message.

    Example:

    >>> callback = StopOnNonFiniteLoss("runs/products")
    >>> callback.on_epoch_begin(2)
    >>> callback.on_train_batch_end(6, {"loss": float("nan")})
    Traceback (most recent call last):
    ...
    keras_mmtl.training.callbacks.NonFiniteLossError: The training loss became nan in epoch 3, by batch 7. ...
    """

    def __init__(self, run_dir=None):
        super().__init__()
        self.run_dir = run_dir
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or math.isfinite(float(loss)):
            return
        where = f" in {self.run_dir}" if self.run_dir else ""
        raise NonFiniteLossError(
            f"The training loss became {float(loss)} in epoch {self.epoch + 1}, by batch "
            f"{batch + 1}. The checkpoints and backup{where} are kept: after a fix, the same "
            "call resumes from the last finished epoch. Usual causes: a learning rate too "
            "high for this model (lower learning_rate / fine_tune_learning_rate), inputs with "
            "NaN or infinite values, or float16 overflow (use float32).")


def save_atomic(save, path):
    """Calls `save(tmp_path)`, then renames into place: never a half-written file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    base, name = os.path.split(path)
    tmp = os.path.join(base, f".tmp-{name}")
    save(tmp)
    os.replace(tmp, path)


class BestWeights(keras.callbacks.Callback):
    """Keeps the weights of the best epoch so far (lowest `monitor`), written atomically.

    Unlike `keras.callbacks.ModelCheckpoint`, a run killed while it writes
    leaves the previous best file whole, and a resumed run passes the best
    value it had reached (`best`) so a worse epoch does not replace it.

    Args:
        path: the `.weights.h5` file.
        monitor: the logged value to minimise, e.g. `"val_loss"`.
        best: the best value reached before (a resumed run), or infinity.
    """

    def __init__(self, path, monitor="val_loss", best=math.inf):
        super().__init__()
        self.path, self.monitor, self.best = path, monitor, best

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is not None and value < self.best:
            self.best = float(value)
            save_atomic(self.model.save_weights, self.path)
