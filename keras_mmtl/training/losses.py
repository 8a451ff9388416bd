"""The classification loss: cross-entropy with optional label smoothing and focal weighting."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_mmtl")
class ClassificationLoss(keras.losses.Loss):
    """Cross-entropy on integer labels, with label smoothing and a focal term as options.

    `loss = -sum_c q_c * (1 - p_c)**gamma * log(p_c)`, where `p` are the
    predicted probabilities and `q` the target distribution: the one-hot
    label, smoothed to `1 - label_smoothing` on the true class and
    `label_smoothing / classes` spread over all. `gamma=0` and
    `label_smoothing=0` give plain sparse categorical cross-entropy.

    The focal term (Lin et al., 2017) down-weights samples the model already
    gets right, so training spends its effort on hard and rare ones; label
    smoothing keeps the model from becoming over-confident, which helps
    calibration and generalisation on noisy labels.

    Args:
        gamma: focal exponent; 0 turns the focal term off, 2 is the usual value.
        label_smoothing: probability mass spread over all classes, in [0, 1).
        **kwargs: arguments of `keras.losses.Loss` (`name`, `reduction`).

    Example:

    >>> import numpy as np
    >>> probabilities = np.array([[0.9, 0.1], [0.2, 0.8]], "float32")
    >>> plain = ClassificationLoss()([0, 0], probabilities)
    >>> focal = ClassificationLoss(gamma=2.0)([0, 0], probabilities)
    >>> round(float(plain), 4), round(float(focal), 4)
    (0.8574, 0.5155)
    """

    def __init__(self, gamma=0.0, label_smoothing=0.0, name="classification_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0. Received: gamma={gamma}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1). "
                             f"Received: label_smoothing={label_smoothing}")
        self.gamma, self.label_smoothing = float(gamma), float(label_smoothing)

    def call(self, y_true, y_pred):
        y_pred = ops.cast(y_pred, "float32")
        classes = ops.shape(y_pred)[-1]
        target = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), classes)
        if self.label_smoothing:
            target = target * (1 - self.label_smoothing) + self.label_smoothing / classes
        probabilities = ops.clip(y_pred, keras.config.epsilon(), 1.0)
        terms = -target * ops.log(probabilities)
        if self.gamma:
            terms = terms * ops.power(1.0 - probabilities, self.gamma)
        return ops.sum(terms, axis=-1)

    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma,
                "label_smoothing": self.label_smoothing}
