"""Callbacks of the trainer beyond Keras' own, the atomic writes they use, and TensorBoard extras.

Keras' `keras.callbacks.TensorBoard(log_dir)` writes the losses, metrics and
learning rate of each epoch under `log_dir/train` and `log_dir/validation`.
Next to them, `ConfusionMatrixImage` adds an image of the confusion matrix
per epoch, `write_hparams` the run's hyperparameters (HParams dashboard) and
`write_projector` embeddings with their labels (Projector).
"""

import contextlib
import math
import time

import keras
import numpy as np
import tensorflow as tf

from keras_mmtl.files import join_path, make_folder, save_atomic, write_json, write_text
from keras_mmtl.plots import figure_image, plot_confusion_matrix
from keras_mmtl.training.metrics import MacroF1


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


class TimeLimit(keras.callbacks.Callback):
    """Stops training by a deadline: before an epoch that would not end in time, or mid-epoch.

    After each epoch, training stops when another epoch as long as the last
    would end past the deadline; a batch that ends past it stops the epoch
    there (Keras still validates and ends the epoch, so the best checkpoint
    and early stopping see it).

    Args:
        deadline: the `time.monotonic()` value to stop by.

    Example:

    >>> import time
    >>> limit = TimeLimit(time.monotonic() + 600)  # ten minutes from now
    """

    def __init__(self, deadline):
        super().__init__()
        self.deadline = deadline
        self.stopped = False

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        self._stop_if(time.monotonic() > self.deadline)

    def on_epoch_end(self, epoch, logs=None):
        now = time.monotonic()
        self._stop_if(now + (now - self._epoch_start) > self.deadline)

    def _stop_if(self, late):
        if late:
            self.model.stop_training = self.stopped = True


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` whose files are replaced atomically.

    Keras writes the backup in place: a run killed while it writes leaves a
    broken file and cannot resume. Here the weights and then the epoch
    counter are each written to a temporary file and renamed into place, so
    a kill leaves the previous backup whole, and the run loses at most the
    epoch in progress.

    Args:
        backup_dir: the folder of the backup.
        **kwargs: arguments of `keras.callbacks.BackupAndRestore`.
    """

    def _save_model(self):
        make_folder(self.backup_dir)
        save_atomic(lambda tmp: self.model.save_weights(tmp, overwrite=True), self._weights_path)
        write_json(self._training_metadata_path,
                   {"epoch": self._current_epoch, "batch": self._last_batch_seen}, indent=None)


class BestWeights(keras.callbacks.Callback):
    """Keeps the weights of the best epoch so far (lowest `monitor`), written atomically.

    Unlike `keras.callbacks.ModelCheckpoint`, a run killed while it writes
    leaves the previous best file whole, and a resumed run passes the best
    value it had reached (`best`) so a worse epoch does not replace it.

    With an optimizer that keeps a moving average of the weights (`use_ema`),
    it keeps the average (`averaged_weights`), which Keras' `SwapEMAWeights`
    validates.

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
            with averaged_weights(self.model):
                save_atomic(self.model.save_weights, self.path)


@contextlib.contextmanager
def averaged_weights(model):
    """Inside, a model holds its optimizer's moving average of the weights, if it keeps one.

    Example:

    >>> inputs = keras.Input((1,))
    >>> dense = keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")
    >>> model = keras.Model(inputs, dense(inputs))
    >>> model.compile(keras.optimizers.SGD(1.0, use_ema=True, ema_momentum=0.5), "mse")
    >>> for step in range(2):  # the kernel goes 0, -1, -2; its average -1, -1.5
    ...     model.optimizer.apply([np.ones((1, 1))], model.trainable_variables)
    >>> with averaged_weights(model):
    ...     print(dense.kernel.numpy())
    [[-1.5]]
    >>> print(dense.kernel.numpy())
    [[-2.]]
    """
    optimizer = getattr(model, "optimizer", None)
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)  # a LossScaleOptimizer's
    if not getattr(optimizer, "use_ema", False):
        yield
        return
    raw = [variable.numpy() for variable in model.trainable_variables]
    optimizer.finalize_variable_values(model.trainable_variables)
    try:
        yield
    finally:
        for variable, value in zip(model.trainable_variables, raw):
            variable.assign(value)


class ConfusionMatrixImage(keras.callbacks.Callback):
    """Writes the confusion matrix of each epoch to TensorBoard as an image.

    At the end of each epoch it reads the confusion matrix a compiled
    `MacroF1` metric accumulated (the validation pass's when the epoch had
    one, as `logs` holding `val_loss` tells, else the training one) and
    writes it with tag `confusion_matrix` and step `epoch` under
    `log_dir/validation` (or `log_dir/train`), where Keras' TensorBoard
    callback writes the scalars of the same epoch. Rows are normalised to
    recall, so the diagonal is each class's recall; the figure grows with
    the number of classes and leaves out cell values beyond 15 classes.

    Args:
        metric: the `MacroF1` instance the model was compiled with, or
            `None` to use the first `MacroF1` among the model's metrics.
        log_dir: the log folder of Keras' TensorBoard callback.
        class_names: names of the classes, in label order; `None` numbers
            them.

    Example:

    >>> import os, tempfile
    >>> metric = MacroF1(2)
    >>> metric.update_state([0, 1, 1], [[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    >>> log_dir = tempfile.mkdtemp()
    >>> callback = ConfusionMatrixImage(metric, log_dir, ["cat", "dog"])
    >>> callback.on_epoch_end(0, {"loss": 0.5, "val_loss": 0.6})
    >>> callback.on_train_end()
    >>> os.listdir(log_dir)
    ['validation']
    """

    TAG = "confusion_matrix"

    def __init__(self, metric=None, log_dir="logs", class_names=None):
        super().__init__()
        if metric is not None and not isinstance(metric, MacroF1):
            raise TypeError(f"ConfusionMatrixImage reads the confusion matrix of a MacroF1 "
                            f"metric. Received: metric={metric!r}")
        self.metric, self.log_dir = metric, log_dir
        self.class_names = None if class_names is None else [str(n) for n in class_names]
        self._writers = {}

    def on_epoch_end(self, epoch, logs=None):
        metric = self.metric or _find_macro_f1(self.model)
        confusion = metric.confusion_matrix
        names = self.class_names or [str(i) for i in range(len(confusion))]
        if len(names) != len(confusion):
            raise ValueError(f"ConfusionMatrixImage got {len(names)} class names for a "
                             f"{len(confusion)}-class metric. Received: class_names={names}")
        subdir = "validation" if "val_loss" in (logs or {}) else "train"
        title = (f"{subdir}, epoch {epoch + 1}: macro F1 {float(metric.result()):.3f}, "
                 f"{_number(confusion.sum())} samples")
        image = confusion_matrix_image(confusion, names, title)
        if subdir not in self._writers:
            self._writers[subdir] = tf.summary.create_file_writer(
                join_path(self.log_dir, subdir))
        with self._writers[subdir].as_default():
            tf.summary.image(self.TAG, image[None], step=epoch)
        self._writers[subdir].flush()

    def on_train_end(self, logs=None):
        for writer in self._writers.values():
            writer.close()
        self._writers = {}


def confusion_matrix_image(confusion, class_names, title=""):
    """Renders a confusion matrix, rows normalised to recall, as an RGB image.

    The figure is `keras_mmtl.plots.plot_confusion_matrix`'s, the one the
    evaluation report saves.

    Args:
        confusion: `(classes, classes)` counts, rows true, columns predicted.
        class_names: names of the classes (long names are cut to 24 characters).
        title: title above the matrix.

    Returns:
        `uint8` array `(height, width, 3)`.

    Example:

    >>> image = confusion_matrix_image([[3, 1], [0, 4]], ["cat", "dog"])
    >>> image.dtype, image.ndim, image.shape[2]
    (dtype('uint8'), 3, 3)
    """
    return figure_image(plot_confusion_matrix(confusion, class_names, title))


def write_hparams(log_dir, hparams, metrics=("epoch_accuracy", "epoch_loss", "epoch_macro_f1")):
    """Writes the hyperparameters of a run for TensorBoard's HParams dashboard.

    The run is `log_dir`, the folder of Keras' TensorBoard callback: the
    dashboard shows each metric as its last value under
    `log_dir/validation`. Values other than bool, int, float and str are
    written as their `str` (None as `"none"`). Each run also declares the
    experiment (hyperparameter names, metrics); with many runs under one
    TensorBoard, the dashboard takes the first run's declaration, so runs
    compared together should pass the same hyperparameter names.

    Args:
        log_dir: the run's log folder.
        hparams: dict of hyperparameter name -> value.
        metrics: scalar tags to show, from the `validation` subfolder.

    Example:

    >>> import os, tempfile
    >>> log_dir = tempfile.mkdtemp()
    >>> write_hparams(log_dir, {"learning_rate": 1e-3, "fusion": "gated", "layers": (2, 3),
    ...                         "cache": True, "seed": None})
    {'learning_rate': 0.001, 'fusion': 'gated', 'layers': '(2, 3)', 'cache': True, 'seed': 'none'}
    >>> len(os.listdir(log_dir))  # one event file
    1
    """
    from tensorboard.plugins.hparams import api as hp

    values = {str(name): _hparam_value(value) for name, value in hparams.items()}
    declared = [hp.Metric(tag, group="validation",
                          display_name="val_" + tag.removeprefix("epoch_"))
                for tag in metrics]
    with tf.summary.create_file_writer(log_dir).as_default() as writer:
        hp.hparams_config(hparams=[hp.HParam(name) for name in values], metrics=declared)
        hp.hparams(values)
        writer.flush()
    return values


def write_projector(log_dir, embeddings, labels, metadata=None, max_points=None):
    r"""Writes embeddings with their labels for TensorBoard's Projector.

    Writes, in `log_dir`, a checkpoint of a variable `embedding` holding
    them, `metadata.tsv` and `projector_config.pbtxt`. The metadata has one
    row per point: the label alone (no header, as the Projector reads
    single columns), or, with more columns, a header and the label first.
    Tabs and newlines in the text become spaces. TensorBoard shows it when
    `log_dir` is the folder it is started on, or a run in it (a folder with
    event files, e.g. where `write_hparams` wrote).

    Args:
        log_dir: the folder to write to.
        embeddings: `(N, D)` array, e.g. the fused features of N samples.
        labels: N labels (class names or indices), or `None`.
        metadata: dict of column name -> N values (e.g. `{"text": texts}`),
            shown next to the label.
        max_points: keep this many points at most, an evenly random sample
            (seed 0), so the Projector stays fast (it handles ~10k well).

    Returns:
        the checkpoint's path prefix.

    Example:

    >>> import os, tempfile
    >>> log_dir = tempfile.mkdtemp()
    >>> path = write_projector(log_dir, np.eye(3), ["cat", "dog", "cat"],
    ...                        metadata={"text": ["a cat", "a\tdog", "cat\non mat"]})
    >>> sorted(name for name in os.listdir(log_dir) if not name.startswith("embedding"))
    ['checkpoint', 'metadata.tsv', 'projector_config.pbtxt']
    >>> open(os.path.join(log_dir, "metadata.tsv")).read().splitlines()
    ['label\ttext', 'cat\ta cat', 'dog\ta dog', 'cat\tcat on mat']
    """
    from tensorboard.plugins import projector

    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or not len(embeddings):
        raise ValueError(f"write_projector expects embeddings of shape (N, D), N > 0. "
                         f"Received: embeddings.shape={embeddings.shape}")
    columns = {} if labels is None else {"label": list(labels)}
    for name, values in (metadata or {}).items():
        columns[str(name)] = list(values)
    for name, values in columns.items():
        if len(values) != len(embeddings):
            raise ValueError(f"write_projector got {len(values)} values in column {name!r} "
                             f"for {len(embeddings)} embeddings; give one per row.")
    keep = np.arange(len(embeddings))
    if max_points is not None and len(embeddings) > max_points:
        keep = np.sort(np.random.default_rng(0).choice(len(embeddings), max_points,
                                                       replace=False))
    make_folder(log_dir)
    config = projector.ProjectorConfig()
    embedding = config.embeddings.add()
    embedding.tensor_name = "embedding/.ATTRIBUTES/VARIABLE_VALUE"
    if columns:
        rows = [[_tsv_cell(values[i]) for values in columns.values()] for i in keep]
        if len(columns) > 1:
            rows.insert(0, list(columns))
        write_text(join_path(log_dir, "metadata.tsv"), "".join("\t".join(row) + "\n"
                                                               for row in rows))
        embedding.metadata_path = "metadata.tsv"
    checkpoint = tf.train.Checkpoint(embedding=tf.Variable(embeddings[keep]))
    path = checkpoint.save(join_path(log_dir, "embedding.ckpt"))
    projector.visualize_embeddings(log_dir, config)
    return path


def _find_macro_f1(model):
    """The first `MacroF1` among a compiled model's metrics."""
    stack = list(model.metrics)
    while stack:
        metric = stack.pop(0)
        if isinstance(metric, MacroF1):
            return metric
        stack[:0] = getattr(metric, "metrics", [])
    raise ValueError("ConfusionMatrixImage(metric=None) needs a model compiled with a "
                     "MacroF1 metric, e.g. metrics=[MacroF1(num_classes)]. Received a model "
                     f"with metrics {[m.name for m in model.metrics]}.")


def _hparam_value(value):
    if isinstance(value, np.generic):
        value = value.item()
    if value is None:
        return "none"
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def _tsv_cell(value):
    return " ".join(str(value).replace("\t", " ").splitlines()) or " "


def _number(value):
    return f"{value:g}" if value != int(value) else str(int(value))
