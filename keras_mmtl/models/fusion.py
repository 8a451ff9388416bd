"""Fusion layers: many modality feature vectors in, one fused vector out."""

import keras


@keras.saving.register_keras_serializable(package="keras_mmtl")
class ConcatFusion(keras.layers.Layer):
    """Concatenates the modality features, each first projected to `units`.

    The projection keeps one modality from dominating the fused vector just
    because its backbone is wider (1280 image features beside 256 text ones).

    Args:
        units: size of each modality's projection; `None` to concatenate the
            raw features.

    Example:

    >>> import numpy as np
    >>> fusion = ConcatFusion(units=8)
    >>> tuple(fusion([np.ones((2, 5)), np.ones((2, 3))]).shape)
    (2, 16)
    """

    def __init__(self, units=256, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.projections = []

    def build(self, input_shapes):
        if self.units is not None:
            self.projections = [
                keras.layers.Dense(self.units, activation="relu", name=f"projection_{i}")
                for i in range(len(input_shapes))
            ]
            for projection, shape in zip(self.projections, input_shapes):
                projection.build(shape)

    def call(self, inputs):
        if self.projections:
            inputs = [projection(x) for projection, x in zip(self.projections, inputs)]
        return keras.ops.concatenate(inputs, axis=-1)

    def compute_output_shape(self, input_shapes):
        width = (self.units * len(input_shapes) if self.units is not None
                 else sum(shape[-1] for shape in input_shapes))
        return (input_shapes[0][0], width)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


FUSIONS = {"concat": ConcatFusion}


def get_fusion(fusion, **kwargs):
    """A new fusion layer of the registered kind `fusion`, e.g. `"concat"`."""
    if fusion not in FUSIONS:
        raise ValueError(
            f"Unknown fusion {fusion!r}. Expected one of {sorted(FUSIONS)}. "
            f"Received: fusion={fusion!r}"
        )
    return FUSIONS[fusion](**kwargs)
