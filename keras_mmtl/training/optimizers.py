"""Fine-tuning optimizers: warmup then cosine decay, and layer-wise learning-rate decay."""

import keras
import tensorflow as tf

from keras_mmtl.keras_internals import adam_moments
from keras_mmtl.models.backbones import BACKBONE_NAME, backbone_blocks, backbone_network
from keras_mmtl.models.text import TEXT_BACKBONE


@keras.saving.register_keras_serializable(package="keras_mmtl")
class LayerwiseAdam(keras.optimizers.Adam):
    """Adam with a learning-rate multiplier per variable, and fast updates on a CPU.

    The multipliers give layer-wise learning-rate decay in fine-tuning. The
    update is Adam's, run as TensorFlow's fused `ApplyAdam` kernel (one op
    per variable instead of a dozen), and, for embedding tables, as a lazy
    update of only the rows a batch used (as `LazyAdam` does): rows of words
    absent from a batch keep their moments. On a head trained over cached
    features this halves the step time. Under a `tf.distribute` strategy,
    or with `amsgrad`, it falls back to Keras' own Adam update.

    Args:
        learning_rate_multipliers: dict of variable path -> factor applied to
            the learning rate of that variable; variables not listed use 1.
            `layerwise_multipliers(model, decay)` gives the usual choice.
        **kwargs: arguments of `keras.optimizers.Adam`.

    Example:

    >>> layer = keras.layers.Dense(1, kernel_initializer="zeros")
    >>> layer.build((None, 1))
    >>> optimizer = LayerwiseAdam({layer.kernel.path: 0.5}, learning_rate=0.1)
    >>> optimizer.apply([keras.ops.ones((1, 1)), keras.ops.ones((1,))], layer.weights)
    >>> round(float(layer.kernel[0, 0]), 3), round(float(layer.bias[0]), 3)
    (-0.05, -0.1)
    """

    def __init__(self, learning_rate_multipliers=None, **kwargs):
        super().__init__(**kwargs)
        self.learning_rate_multipliers = dict(learning_rate_multipliers or {})
        self._factors = []
        self._beta_powers = None

    def build(self, var_list):
        super().build(var_list)
        self._factors = [float(self.learning_rate_multipliers.get(v.path, 1.0))
                         for v in var_list]

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        learning_rate = learning_rate * self._factors[index]
        if self.amsgrad or tf.distribute.has_strategy() or not isinstance(variable, tf.Variable):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        beta_1_power, beta_2_power = (tf.cast(p, dtype) for p in self._beta_powers)
        m, v = (moment.value for moment in adam_moments(self, index))
        learning_rate = tf.cast(learning_rate, dtype)
        if isinstance(gradient, tf.IndexedSlices):
            return self._lazy_update(gradient, variable, m, v, learning_rate,
                                     beta_1_power, beta_2_power)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=m.handle, v=v.handle, beta1_power=beta_1_power,
            beta2_power=beta_2_power, lr=learning_rate, beta1=tf.cast(self.beta_1, dtype),
            beta2=tf.cast(self.beta_2, dtype), epsilon=tf.cast(self.epsilon, dtype),
            grad=tf.cast(gradient, dtype))

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        # Computed once per step for all variables (update_step runs once per variable).
        step = tf.cast(self.iterations + 1, "float32")
        self._beta_powers = (tf.pow(float(self.beta_1), step), tf.pow(float(self.beta_2), step))
        super()._backend_update_step(grads, trainable_variables, learning_rate)

    def _lazy_update(self, gradient, variable, m, v, learning_rate, beta_1_power,
                     beta_2_power):
        """Adam on the rows of `variable` that the sparse `gradient` touches."""
        rows, positions = tf.unique(gradient.indices)
        values = tf.math.unsorted_segment_sum(
            tf.cast(gradient.values, variable.dtype), positions, tf.shape(rows)[0])
        m_rows = self.beta_1 * tf.gather(m, rows) + (1 - self.beta_1) * values
        v_rows = self.beta_2 * tf.gather(v, rows) + (1 - self.beta_2) * tf.square(values)
        m.scatter_update(tf.IndexedSlices(m_rows, rows))
        v.scatter_update(tf.IndexedSlices(v_rows, rows))
        alpha = learning_rate * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        variable.scatter_sub(tf.IndexedSlices(alpha * m_rows / (tf.sqrt(v_rows) + self.epsilon),
                                              rows))

    def get_config(self):
        config = super().get_config()
        config["learning_rate_multipliers"] = self.learning_rate_multipliers
        return config


def layerwise_multipliers(model, decay):
    """Learning-rate factors that shrink with depth inside each fine-tuned backbone.

    The top trainable block of the image backbone (and the top trainable
    transformer layer of a pretrained text encoder) learns at the full rate,
    the block below at `decay` times it, the next at `decay**2`, and so on:
    the lower a layer, the more general its pretrained features and the
    less they should move. Layers outside the backbones (fusion, head) keep 1.

    Args:
        model: the classifier being fine-tuned (or a model sharing its layers).
        decay: factor per block, in (0, 1]; 1 turns the decay off.

    Returns:
        dict of variable path -> factor, for `LayerwiseAdam`.
    """
    if not 0 < decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1]. Received: layer_decay={decay}")
    names = {layer.name for layer in model.layers}
    stacks = []
    if BACKBONE_NAME in names:
        stacks.append([layers for _, layers in backbone_blocks(backbone_network(model))])
    if TEXT_BACKBONE in names and hasattr(model.get_layer(TEXT_BACKBONE), "transformer_layers"):
        stacks.append([[layer] for layer in model.get_layer(TEXT_BACKBONE).transformer_layers])
    multipliers = {}
    for blocks in stacks:
        trainable = [block for block in blocks if any(l.trainable_weights for l in block)]
        for depth, block in enumerate(reversed(trainable)):
            for layer in block:
                for weight in layer.trainable_weights:
                    multipliers[weight.path] = decay**depth
    return multipliers


# Weights that weight decay leaves alone, by variable name: biases, normalisation
# scales and offsets, and embedding tables (decaying rows a batch did not use).
NO_WEIGHT_DECAY = ("bias", "gamma", "beta", "moving_", "embeddings")


def decoupled_weight_decay(optimizer):
    """Keeps an optimizer's `weight_decay` to kernels, as AdamW is usually run.

    Keras applies `weight_decay` (decoupled: `w -= learning_rate *
    weight_decay * w` each step, apart from the gradient update) to every
    variable; this leaves out those named in `NO_WEIGHT_DECAY`.

    Returns:
        the same optimizer.

    Example:

    >>> optimizer = decoupled_weight_decay(LayerwiseAdam(weight_decay=1e-4))
    >>> layer = keras.layers.Dense(1)
    >>> layer.build((None, 2))
    >>> optimizer.build(layer.trainable_variables)
    >>> [optimizer._use_weight_decay(v) for v in layer.trainable_variables]
    [True, False]
    """
    optimizer.exclude_from_weight_decay(var_names=list(NO_WEIGHT_DECAY))
    return optimizer


def fine_tuning_optimizer(model, learning_rate, total_steps, *, warmup=0.1, layer_decay=0.8,
                          weight_decay=0.0, ema_momentum=None):
    """The optimizer of phase 2: linear warmup, cosine decay, layer-wise rates.

    The learning rate rises from 0 to `learning_rate` over the first
    `warmup` fraction of `total_steps` (so freshly unfrozen layers are not
    hit by large updates computed from the new head's errors), then follows a
    cosine down to 0 at `total_steps`.

    Args:
        model: the model being fine-tuned.
        learning_rate: peak learning rate.
        total_steps: optimizer steps of the whole phase (epochs x batches).
        warmup: fraction of the steps spent warming up.
        layer_decay: factor per block down each backbone (`layerwise_multipliers`).
        weight_decay: decoupled weight decay of kernels (`decoupled_weight_decay`).
        ema_momentum: keep an exponential moving average of the weights with
            this momentum (`moving_average`); `None` for none.

    Returns:
        a `LayerwiseAdam`.
    """
    if not 0 <= warmup < 1:
        raise ValueError(f"warmup must be a fraction in [0, 1). Received: warmup={warmup}")
    total_steps = max(int(total_steps), 1)
    warmup_steps = int(round(warmup * total_steps))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else learning_rate,
        decay_steps=max(total_steps - warmup_steps, 1),
        warmup_target=learning_rate if warmup_steps else None,
        warmup_steps=warmup_steps,
    )
    return decoupled_weight_decay(LayerwiseAdam(
        layerwise_multipliers(model, layer_decay), learning_rate=schedule,
        weight_decay=weight_decay or None, **moving_average(ema_momentum)))


def moving_average(ema_momentum):
    """Optimizer arguments that keep an exponential moving average of the weights.

    Keras optimizers keep it beside the weights (`use_ema`). `train` then
    validates the average (Keras' `SwapEMAWeights`), and keeps the average
    of the best epoch (`BestWeights`) in place of the raw weights.

    Args:
        ema_momentum: the average's momentum, e.g. 0.99 (its horizon is about
            `1 / (1 - ema_momentum)` steps); `None` or 0 for no average.

    Example:

    >>> moving_average(0.99), moving_average(None)
    ({'use_ema': True, 'ema_momentum': 0.99}, {})
    """
    if not ema_momentum:
        return {}
    if not 0 < ema_momentum < 1:
        raise ValueError(f"ema_momentum must be in (0, 1), e.g. 0.99. "
                         f"Received: ema_momentum={ema_momentum}")
    return {"use_ema": True, "ema_momentum": float(ema_momentum)}
