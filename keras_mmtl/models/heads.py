"""Heads on the fused features: class probabilities (in float32), and gradient reversal."""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="keras_mmtl")
class ClassifierHead(keras.layers.Layer):
    """Dropout, then a dense softmax over the classes, computed in float32.

    The class names are part of the config: a saved or exported model knows
    its labels, and nothing outside it has to remember their order.

    Args:
        class_names: label of each output, in order.
        dropout: dropout rate before the dense layer.
        temperature: the logits are divided by it before the softmax
            (temperature scaling, set by `keras_mmtl.calibrate`; 1 leaves
            them as trained). It changes the probabilities, never their order.
            Held in a variable: setting `head.temperature` changes what
            compiled `predict` and `evaluate` functions compute at once.

    Example:

    >>> import numpy as np
    >>> head = ClassifierHead(["cat", "dog"])
    >>> tuple(head(np.ones((1, 4))).shape)
    (1, 2)
    """

    def __init__(self, class_names, dropout=0.2, temperature=1.0, **kwargs):
        super().__init__(**kwargs)
        self.class_names = [str(name) for name in class_names]
        self.dropout_rate = float(dropout)
        self._temperature = TemperatureVariable(temperature)
        self.dropout = keras.layers.Dropout(self.dropout_rate)
        # Softmax in float32 even under a mixed precision policy.
        self.dense = keras.layers.Dense(len(self.class_names), dtype="float32", name="logits")

    def build(self, input_shape):
        self.dense.build(input_shape)

    def call(self, features, training=None):
        features = self.dropout(features, training=training)
        logits = self.dense(keras.ops.cast(features, "float32"))
        return keras.ops.softmax(logits / self._temperature.variable)

    temperature = property(lambda self: self._temperature.value,
                           lambda self, value: self._temperature.set(value))

    def compute_output_spec(self, features):
        return keras.KerasTensor((features.shape[0], len(self.class_names)), dtype="float32")

    def get_config(self):
        return {**super().get_config(), "class_names": self.class_names,
                "dropout": self.dropout_rate, "temperature": self.temperature}


class TemperatureVariable:
    """A head's temperature: a Python float (what the config saves) and a float32 variable.

    Functions traced for `predict` and `evaluate` read the variable, so a new
    temperature needs no retracing; it is not among the layer's weights, so
    weight files are the same with or without calibration.
    """

    def __init__(self, value):
        self.value = float(value)
        self.variable = tf.Variable(self.value, trainable=False, dtype="float32",
                                    name="temperature")

    def set(self, value):
        self.value = float(value)
        self.variable.assign(self.value)


@keras.saving.register_keras_serializable(package="keras_mmtl")
class GradientReversal(keras.layers.Layer):
    """Identity going forward; multiplies the gradient by `-weight` going back.

    Put between shared features and a domain classifier, it makes the shared
    layers learn features the domain classifier cannot tell apart
    (domain-adversarial training, Ganin et al. 2016).

    Args:
        weight: how strongly the reversed gradient pushes the shared layers.

    Example:

    >>> import tensorflow as tf
    >>> x = tf.constant([1.0, 2.0])
    >>> with tf.GradientTape() as tape:
    ...     tape.watch(x)
    ...     y = tf.reduce_sum(GradientReversal(0.5)(x))
    >>> tape.gradient(y, x).numpy().tolist()
    [-0.5, -0.5]
    """

    def __init__(self, weight=1.0, **kwargs):
        super().__init__(**kwargs)
        self.weight = float(weight)

    def call(self, features):
        @tf.custom_gradient
        def reverse(x):
            return tf.identity(x), lambda upstream: -self.weight * upstream

        return reverse(features)

    def get_config(self):
        return {**super().get_config(), "weight": self.weight}
