"""Samples that lack a modality: presence masks, a learned stand-in, and modality dropout.

A model built with `missing_modalities=True` takes one more input per
modality, `"<modality>_present"` (1 or 0 per sample), which the data
pipeline and the serving signature derive from the raw input (an empty
image path or bytes, an empty text). `MissingModality` replaces a missing
modality's features by a learned embedding, and `ModalityDropout` hides
modalities at random in training so the model learns to do without them.
"""

import keras
from keras import ops


def presence_input(modality):
    """The name of a modality's presence input, e.g. `"image_present"`."""
    return f"{modality}_present"


@keras.saving.register_keras_serializable(package="keras_mmtl")
class MissingModality(keras.layers.Layer):
    """Replaces the features of samples that lack the modality by a learned embedding.

    `outputs = present * features + (1 - present) * missing`, where
    `missing` is a trained vector: the model learns what to assume when it
    cannot see the modality, instead of reading a black image's or an empty
    text's features as if they were real.

    Example:

    >>> import numpy as np
    >>> layer = MissingModality()
    >>> features = np.ones((2, 3), "float32")
    >>> layer([features, np.array([1.0, 0.0], "float32")]).numpy().tolist()
    [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    """

    def build(self, input_shapes):
        self.missing = self.add_weight(name="missing", shape=(input_shapes[0][-1],),
                                       initializer="zeros")

    def call(self, inputs):
        features, present = inputs
        present = ops.expand_dims(ops.cast(present, features.dtype), -1)
        missing = ops.cast(self.missing, features.dtype)
        return present * features + (1 - present) * missing

    def compute_output_shape(self, input_shapes):
        return input_shapes[0]


@keras.saving.register_keras_serializable(package="keras_mmtl")
class ModalityDropout(keras.layers.Layer):
    """In training, marks each present modality of a sample missing with probability `rate`.

    A sample always keeps at least one of the modalities it had. At
    inference the presence masks pass unchanged. Trained this way, a fused
    model stays accurate when a sample comes without its image or its text.

    Args:
        rate: probability of hiding each modality of each training sample.
        seed: seed of the random draws.

    Example:

    >>> import numpy as np
    >>> dropout = ModalityDropout(0.5, seed=1)
    >>> masks = [np.ones(4, "float32"), np.ones(4, "float32")]
    >>> [m.numpy().tolist() for m in dropout(masks)]  # inference: unchanged
    [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
    >>> kept = dropout(masks, training=True)
    >>> bool(np.all(np.sum(kept, axis=0) >= 1))  # never all hidden
    True
    """

    def __init__(self, rate, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= rate < 1:
            raise ValueError(f"modality dropout rate must be in [0, 1). Received: rate={rate}")
        self.rate, self.seed = float(rate), seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, presence, training=None):
        if not training or not self.rate:
            return list(presence)
        masks = ops.stack([ops.cast(p, self.compute_dtype) for p in presence], axis=-1)
        keep = keras.random.uniform(ops.shape(masks), seed=self.seed_generator) >= self.rate
        dropped = masks * ops.cast(keep, masks.dtype)
        emptied = ops.sum(dropped, axis=-1, keepdims=True) == 0
        masks = ops.where(emptied, masks, dropped)
        return [masks[:, i] for i in range(len(presence))]

    def compute_output_shape(self, input_shapes):
        return list(input_shapes)

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}
