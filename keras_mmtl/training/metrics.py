"""Training metrics beyond Keras' own: macro-F1 over an accumulated confusion matrix, and
accuracy over the rows that hold a label."""

import keras
import numpy as np
import tensorflow as tf


@keras.saving.register_keras_serializable(package="keras_mmtl")
class LabelledAccuracy(keras.metrics.SparseCategoricalAccuracy):
    """Sparse categorical accuracy over the rows that hold a label; label -1 marks one without.

    A row of a multi-task dataset may lack a label for one task (in joint
    domain transfer, each row is labelled for its own domain's classes
    only): it counts for neither right nor wrong, as `MacroF1` leaves it out.

    Example:

    >>> metric = LabelledAccuracy()
    >>> metric.update_state([1, -1, 0], [[0.2, 0.8], [0.9, 0.1], [0.3, 0.7]])
    >>> float(metric.result())  # 1 right of 2 labelled rows
    0.5
    """

    def __init__(self, name="accuracy", dtype=None):
        super().__init__(name=name, dtype=dtype)

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = tf.reshape(tf.cast(y_true, "int32"), (-1,))
        labelled = tf.cast(y_true >= 0, "float32")
        if sample_weight is not None:
            labelled *= tf.reshape(tf.cast(sample_weight, "float32"), (-1,))
        return super().update_state(tf.maximum(y_true, 0), y_pred, sample_weight=labelled)


@keras.saving.register_keras_serializable(package="keras_mmtl")
class MacroF1(keras.metrics.Metric):
    """Macro-averaged F1 of a classifier, from a confusion matrix accumulated over batches.

    Every class weighs alike, so on imbalanced data it shows what accuracy
    hides: rare classes the model never predicts. The average runs over the
    classes that occur in the labels or the predictions seen since the last
    reset (as scikit-learn's `f1_score(average="macro", labels=present)`
    and `keras_mmtl.evaluation.classification_report`); classes absent from
    both are left out. Each class's F1 is `2 tp / (true + predicted)`.

    The confusion matrix (rows: true class, columns: predicted class) is a
    metric variable summed over `tf.distribute` replicas. Keras resets
    compiled metrics before each `evaluate`, and `fit` calls `on_epoch_end`
    after its validation pass, so a callback reading `confusion_matrix`
    there gets the validation matrix of that epoch (the training one when
    the epoch had no validation pass).

    Args:
        num_classes: number of classes; labels are integers in
            `[0, num_classes)` (others, such as -1 for a row without a
            label, are left out).
        name: metric name; Keras logs it as `macro_f1` and `val_macro_f1`.
        dtype: dtype of the confusion matrix and of the result.

    Example:

    >>> metric = MacroF1(3)
    >>> metric.update_state([0, 1, 1, 2], [[0.9, 0.1, 0.0], [0.2, 0.7, 0.1],
    ...                                    [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    >>> metric.confusion_matrix
    array([[1., 0., 0.],
           [1., 1., 0.],
           [0., 0., 1.]], dtype=float32)
    >>> round(float(metric.result()), 4)  # F1 of 0.667, 0.667, 1
    0.7778
    """

    def __init__(self, num_classes, name="macro_f1", dtype=None):
        super().__init__(name=name, dtype=dtype)
        if int(num_classes) < 1:
            raise ValueError(f"MacroF1 needs at least one class. Received: "
                             f"num_classes={num_classes!r}")
        self.num_classes = int(num_classes)
        self._direction = "up"
        self.confusion = self.add_variable(
            shape=(self.num_classes, self.num_classes),
            initializer="zeros",
            dtype=self.dtype,
            aggregation="sum",
            name="confusion",
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Adds a batch: integer labels `(batch,)` and probabilities `(batch, num_classes)`."""
        y_pred = tf.convert_to_tensor(y_pred)
        if y_pred.shape.rank is not None and y_pred.shape[-1] != self.num_classes:
            raise ValueError(
                f"MacroF1(num_classes={self.num_classes}) expects class probabilities of "
                f"shape (batch, {self.num_classes}). Received: y_pred.shape={y_pred.shape}")
        y_pred = tf.reshape(tf.cast(y_pred, self.dtype), (-1, self.num_classes))
        y_true = tf.reshape(tf.cast(y_true, "int32"), (-1,))
        weights = tf.ones_like(y_true, dtype=self.dtype)
        if sample_weight is not None:
            weights *= tf.reshape(tf.cast(sample_weight, self.dtype), (-1,))
        true = tf.one_hot(y_true, self.num_classes, dtype=self.dtype) * weights[:, None]
        predicted = tf.one_hot(tf.argmax(y_pred, axis=-1), self.num_classes, dtype=self.dtype)
        # A matmul rather than a scatter: XLA-friendly and deterministic on a GPU.
        self.confusion.assign_add(tf.matmul(true, predicted, transpose_a=True))

    def result(self):
        confusion = tf.convert_to_tensor(self.confusion)
        true_positives = tf.linalg.diag_part(confusion)
        support = tf.reduce_sum(confusion, axis=1) + tf.reduce_sum(confusion, axis=0)
        present = tf.cast(support > 0, self.dtype)
        f1 = tf.math.divide_no_nan(2 * true_positives, support)
        return tf.math.divide_no_nan(tf.reduce_sum(f1 * present), tf.reduce_sum(present))

    def reset_state(self):
        self.confusion.assign(tf.zeros_like(self.confusion))

    @property
    def confusion_matrix(self):
        """The accumulated confusion matrix, rows true and columns predicted, as numpy."""
        return np.asarray(keras.ops.convert_to_numpy(self.confusion))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}
