"""Fusion layers: many modality feature vectors in, one fused vector out.

Every fusion is called as `fusion(inputs, presence=None)`: `inputs` is a
list of N >= 2 feature tensors `(batch, d_i)`, of any widths, and `presence`
is `None` or a list of N float tensors `(batch,)`, 1 where the sample has
the modality and 0 where it lacks it. A missing modality's features have
already been replaced upstream by a learned embedding (`MissingModality`);
the gated, attention, late and shared fusions also use the masks to leave it out
entirely, the others ignore them. The output is `(batch, width)`.
"""

import itertools

import keras
from keras import ops


def _large_negative(dtype):
    """A logit that softmax turns into a weight of 0, and that `dtype` can hold."""
    return -3e4 if keras.backend.standardize_dtype(dtype) == "float16" else -1e9


def _presence_matrix(presence, count, dtype):
    """The presence masks stacked into one `(batch, count)` tensor of `dtype`, or `None`."""
    if presence is None:
        return None
    if len(presence) != count:
        raise ValueError(f"Expected one presence mask per input ({count}). "
                         f"Received: {len(presence)} presence masks")
    return ops.stack([ops.reshape(ops.cast(p, dtype), (-1,)) for p in presence], axis=-1)


def _masked_mean(vectors, presence, dtype):
    """The mean of N `(batch, d)` vectors over the modalities a sample has (all, without masks)."""
    stacked = ops.stack(vectors, axis=1)
    present = _presence_matrix(presence, len(vectors), dtype)
    if present is None:
        return ops.mean(stacked, axis=1)
    total = ops.sum(ops.expand_dims(present, -1) * stacked, axis=1)
    return total / ops.maximum(ops.sum(present, axis=-1, keepdims=True), 1)


def _projections(layer, input_shapes, activation=None, name="projection"):
    """One `Dense(layer.units)` per modality, built for its input: `f"{name}_{i}"` reads input i."""
    projections = [keras.layers.Dense(layer.units, activation=activation, name=f"{name}_{i}",
                                      dtype=layer.dtype_policy)
                   for i in range(len(input_shapes))]
    for projection, shape in zip(projections, input_shapes):
        projection.build(shape)
    return projections


def _project(projections, inputs):
    """Each input through its own projection."""
    return [projection(x) for projection, x in zip(projections, inputs)]


def _check_inputs(layer, input_shapes):
    if not isinstance(input_shapes, (list, tuple)) or len(input_shapes) < 2 or not all(
            isinstance(shape, (list, tuple)) for shape in input_shapes):
        raise ValueError(f"{type(layer).__name__} fuses a list of at least 2 feature tensors "
                         f"(batch, features). Received: input shapes {input_shapes}")


class Fusion(keras.layers.Layer):
    """What every fusion holds: `units`, the width of its per-modality projections.

    Subclasses build `self.projections` (or layers of their own) in `build`
    and fuse in `call(inputs, presence=None, training=None)`; see the module.
    """

    def __init__(self, units=256, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.projections = []

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="keras_mmtl")
class ConcatFusion(Fusion):
    """Concatenates the modality features, each first projected to `units`.

    The projection keeps one modality from dominating the fused vector just
    because its backbone is wider (1280 image features beside 256 text ones).
    `presence` is accepted and ignored: the missing-modality embedding
    upstream already stands in for an absent modality.

    Args:
        units: size of each modality's projection; `None` to concatenate the
            raw features.

    Example:

    >>> import numpy as np
    >>> fusion = ConcatFusion(units=8)
    >>> tuple(fusion([np.ones((2, 5)), np.ones((2, 3))]).shape)
    (2, 16)
    """

    def build(self, input_shapes):
        if self.units is not None:
            self.projections = _projections(self, input_shapes, activation="relu")

    def call(self, inputs, presence=None, training=None):
        if self.projections:
            inputs = _project(self.projections, inputs)
        return ops.concatenate(inputs, axis=-1)

    def compute_output_shape(self, input_shapes):
        width = (self.units * len(input_shapes) if self.units is not None
                 else sum(shape[-1] for shape in input_shapes))
        return (input_shapes[0][0], width)


@keras.saving.register_keras_serializable(package="keras_mmtl")
class GatedFusion(Fusion):
    """Weighs each modality by a learned, per-sample gate (a gated multimodal unit).

    Each modality becomes `h_i = tanh(Dense_i(x_i))`; a dense layer on the
    concatenated features gives one gate logit per modality, and a softmax
    over the modalities turns them into weights `z_i` that sum to 1. The
    output is `sum_i z_i * h_i`. A missing modality (`presence` 0) gets a
    weight of exactly 0 and its features do not reach the gates, so the
    output depends only on the modalities the sample has. With two
    modalities this is the gated multimodal unit of Arevalo et al., 2017,
    "Gated Multimodal Units for Information Fusion" (softmax over two
    logits is their sigmoid gate).

    Call with `return_gates=True` to also get the gates `(batch, N)`: how
    much each modality contributes to each sample's fused vector.

    Args:
        units: size of the fused vector.

    Example:

    >>> import numpy as np
    >>> fusion = GatedFusion(units=8)
    >>> features = [np.ones((2, 5)), np.ones((2, 3))]
    >>> presence = [np.array([1.0, 1.0]), np.array([1.0, 0.0])]
    >>> fused, gates = fusion(features, presence=presence, return_gates=True)
    >>> tuple(fused.shape), np.round(gates[1], 3).tolist()
    ((2, 8), [1.0, 0.0])
    """

    def __init__(self, units=256, **kwargs):
        super().__init__(units, **kwargs)
        self.gate = None

    def build(self, input_shapes):
        _check_inputs(self, input_shapes)
        self.projections = _projections(self, input_shapes, activation="tanh")
        self.gate = keras.layers.Dense(len(input_shapes), name="gate", dtype=self.dtype_policy)
        self.gate.build((input_shapes[0][0], sum(shape[-1] for shape in input_shapes)))

    def call(self, inputs, presence=None, training=None, return_gates=False):
        present = _presence_matrix(presence, len(inputs), self.compute_dtype)
        if present is not None:
            # A missing modality's features must not sway the others' gates.
            inputs = [x * present[:, i:i + 1] for i, x in enumerate(inputs)]
        logits = self.gate(ops.concatenate(inputs, axis=-1))
        if present is not None:
            logits = ops.where(present > 0, logits, _large_negative(logits.dtype))
        gates = ops.softmax(logits, axis=-1)
        hidden = ops.stack(_project(self.projections, inputs), axis=1)
        fused = ops.sum(ops.expand_dims(gates, -1) * hidden, axis=1)
        return (fused, gates) if return_gates else fused

    def compute_output_shape(self, input_shapes):
        return (input_shapes[0][0], self.units)

    def compute_output_spec(self, inputs, presence=None, training=None, return_gates=False):
        fused = keras.KerasTensor(self.compute_output_shape([x.shape for x in inputs]),
                                  dtype=self.compute_dtype)
        if not return_gates:
            return fused
        return fused, keras.KerasTensor((inputs[0].shape[0], len(inputs)),
                                        dtype=self.compute_dtype)


@keras.saving.register_keras_serializable(package="keras_mmtl")
class AttentionFusion(Fusion):
    """A small transformer over one token per modality; a [CLS] token reads them out.

    Each modality becomes a token `Dense_i(x_i) + e_i`, where `e_i` is a
    learned modality-type embedding, and a learned [CLS] token is put in
    front. `num_layers` pre-norm transformer blocks (multi-head
    self-attention, then a two-layer MLP of width `2 * units`, each with a
    residual connection) let the modalities attend to each other, as in
    ViLT-style single-stream fusion (Kim et al., 2021). The output is the
    [CLS] token after a final layer normalisation. No token attends to a
    modality the sample lacks (`presence` 0), so its features cannot reach
    the output. `call(..., return_attention=True)` also returns how the
    [CLS] token attends to each modality in the last block (heads averaged,
    summing to 1): what `keras_mmtl.explain` reports.

    Args:
        units: width of the tokens and of the output.
        num_heads: attention heads; must divide `units`.
        num_layers: transformer blocks.
        dropout: dropout rate on the attention weights and on each block's
            residual branches.

    Example:

    >>> import numpy as np
    >>> fusion = AttentionFusion(units=8, num_heads=2)
    >>> tuple(fusion([np.ones((2, 5)), np.ones((2, 3))]).shape)
    (2, 8)
    >>> _, weights = fusion([np.ones((2, 5)), np.ones((2, 3))], return_attention=True)
    >>> tuple(weights.shape), bool(np.allclose(np.sum(weights, axis=-1), 1.0))
    ((2, 2), True)
    """

    def __init__(self, units=256, num_heads=4, num_layers=1, dropout=0.1, **kwargs):
        super().__init__(units, **kwargs)
        if units % num_heads:
            raise ValueError(f"units must be a multiple of num_heads. "
                             f"Received: units={units}, num_heads={num_heads}")
        self.num_heads, self.num_layers, self.dropout_rate = num_heads, num_layers, float(dropout)
        self.dropout = keras.layers.Dropout(self.dropout_rate, dtype=self.dtype_policy)

    def build(self, input_shapes):
        _check_inputs(self, input_shapes)
        count, batch = len(input_shapes), input_shapes[0][0]
        common = {"dtype": self.dtype_policy}
        self.projections = _projections(self, input_shapes)
        self.modality_embeddings = self.add_weight(
            name="modality_embeddings", shape=(count, self.units),
            initializer=keras.initializers.TruncatedNormal(stddev=0.02))
        self.cls_token = self.add_weight(
            name="cls_token", shape=(self.units,),
            initializer=keras.initializers.TruncatedNormal(stddev=0.02))
        tokens = (batch, count + 1, self.units)
        layers = range(self.num_layers)
        self.attention_norms = [keras.layers.LayerNormalization(
            epsilon=1e-6, name=f"block_{i}_attention_norm", **common) for i in layers]
        self.attentions = [keras.layers.MultiHeadAttention(
            self.num_heads, self.units // self.num_heads, dropout=self.dropout_rate,
            name=f"block_{i}_attention", **common) for i in layers]
        self.mlp_norms = [keras.layers.LayerNormalization(
            epsilon=1e-6, name=f"block_{i}_mlp_norm", **common) for i in layers]
        self.mlp_hiddens = [keras.layers.Dense(
            2 * self.units, activation="gelu", name=f"block_{i}_mlp_hidden", **common)
            for i in layers]
        self.mlp_outputs = [keras.layers.Dense(
            self.units, name=f"block_{i}_mlp_output", **common) for i in layers]
        for i in layers:
            self.attention_norms[i].build(tokens)
            self.attentions[i].build(tokens, tokens)
            self.mlp_norms[i].build(tokens)
            self.mlp_hiddens[i].build(tokens)
            self.mlp_outputs[i].build(tokens[:-1] + (2 * self.units,))
        self.output_norm = keras.layers.LayerNormalization(epsilon=1e-6, name="output_norm",
                                                           **common)
        self.output_norm.build(tokens)

    def call(self, inputs, presence=None, training=None, return_attention=False):
        dtype = self.compute_dtype
        embeddings = ops.cast(self.modality_embeddings, dtype)
        tokens = ops.stack(_project(self.projections, inputs), axis=1) + embeddings
        batch = ops.shape(tokens)[0]
        cls = ops.broadcast_to(ops.reshape(ops.cast(self.cls_token, dtype), (1, 1, self.units)),
                               (batch, 1, self.units))
        tokens = ops.concatenate([cls, tokens], axis=1)
        mask = None
        present = _presence_matrix(presence, len(inputs), dtype)
        if present is not None:
            # Every query may attend to [CLS] and to the modalities the sample has.
            keys = ops.concatenate([ops.ones_like(present[:, :1]), present], axis=-1) > 0
            mask = ops.broadcast_to(ops.expand_dims(keys, 1),
                                    (batch, len(inputs) + 1, len(inputs) + 1))
        for i in range(self.num_layers):
            x = self.attention_norms[i](tokens)
            x, scores = self.attentions[i](x, x, attention_mask=mask, training=training,
                                           return_attention_scores=True)
            tokens = tokens + self.dropout(x, training=training)
            x = self.mlp_outputs[i](self.mlp_hiddens[i](self.mlp_norms[i](tokens)))
            tokens = tokens + self.dropout(x, training=training)
        fused = self.output_norm(tokens)[:, 0]
        if not return_attention:
            return fused
        to_inputs = ops.mean(ops.cast(scores, "float32")[:, :, 0, 1:], axis=1)  # [CLS] -> inputs
        return fused, to_inputs / ops.sum(to_inputs, axis=-1, keepdims=True)

    def compute_output_shape(self, input_shapes):
        return (input_shapes[0][0], self.units)

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads,
                "num_layers": self.num_layers, "dropout": self.dropout_rate}


@keras.saving.register_keras_serializable(package="keras_mmtl")
class HierarchicalFusion(Fusion):
    """Fuses every pair of modalities, then fuses the pairs.

    Each modality is projected to `units` (dense, relu); each pair `i < j`
    is fused by a dense relu layer on the two projections side by side; a
    last dense relu layer fuses all the pair vectors. Pairwise interactions
    (image with text, text with metadata) are learned before the global
    one. With two modalities it is one pair and the top layer. `presence`
    is accepted and ignored: the missing-modality embedding upstream stands
    in for an absent modality.

    Args:
        units: width of the projections, of each pair vector and of the output.

    Example:

    >>> import numpy as np
    >>> fusion = HierarchicalFusion(units=8)
    >>> tuple(fusion([np.ones((2, 5)), np.ones((2, 3)), np.ones((2, 4))]).shape)
    (2, 8)
    """

    def __init__(self, units=256, **kwargs):
        super().__init__(units, **kwargs)
        self.pairs, self.top = [], None

    def build(self, input_shapes):
        _check_inputs(self, input_shapes)
        count, batch = len(input_shapes), input_shapes[0][0]
        self.projections = _projections(self, input_shapes, activation="relu")
        pairs = list(itertools.combinations(range(count), 2))
        self.pairs = [self._dense(f"pair_{i}_{j}") for i, j in pairs]
        for pair in self.pairs:
            pair.build((batch, 2 * self.units))
        self.top = self._dense("top")
        self.top.build((batch, len(pairs) * self.units))

    def _dense(self, name):
        return keras.layers.Dense(self.units, activation="relu", name=name,
                                  dtype=self.dtype_policy)

    def call(self, inputs, presence=None, training=None):
        projected = _project(self.projections, inputs)
        pairs = itertools.combinations(range(len(projected)), 2)
        fused = [layer(ops.concatenate([projected[i], projected[j]], axis=-1))
                 for layer, (i, j) in zip(self.pairs, pairs)]
        return self.top(ops.concatenate(fused, axis=-1))

    def compute_output_shape(self, input_shapes):
        return (input_shapes[0][0], self.units)


@keras.saving.register_keras_serializable(package="keras_mmtl")
class LateFusion(Fusion):
    """Averages a linear projection of each modality over the modalities a sample has.

    `outputs = sum_i(presence_i * Dense_i(x_i)) / max(sum_i presence_i, 1)`,
    with no activation. The classifier head on top is linear up to its
    softmax, so its logits are `W (avg_i (A_i x_i + b_i)) + c =
    avg_i (W A_i x_i + W b_i + c)`: the average of one linear classifier per
    modality, each seeing only its own modality, that is late (decision
    level) fusion. The modalities never interact before the decision, which
    makes it robust when one is missing or noisy, and a good baseline for
    the richer fusions. Without `presence` every modality counts.

    Args:
        units: size of each modality's projection and of the output.

    Example:

    >>> import numpy as np
    >>> fusion = LateFusion(units=8)
    >>> tuple(fusion([np.ones((2, 5)), np.ones((2, 3))]).shape)
    (2, 8)
    """

    def build(self, input_shapes):
        _check_inputs(self, input_shapes)
        self.projections = _projections(self, input_shapes)

    def call(self, inputs, presence=None, training=None):
        return _masked_mean(_project(self.projections, inputs), presence, self.compute_dtype)

    def compute_output_shape(self, input_shapes):
        return (input_shapes[0][0], self.units)


@keras.saving.register_keras_serializable(package="keras_mmtl")
class SharedSpaceFusion(Fusion):
    """Maps every modality into one space with shared layers; averages them there.

    Each modality first gets its own linear adapter to `units` (backbones
    differ in width), then the same layers for all of them: a dense layer
    with ReLU and a layer normalisation whose weights are shared across
    modalities (cross-modal parameter sharing). The output is the mean of
    the shared-space vectors over the modalities a sample has. The linear
    head on top therefore classifies each modality with one shared head and
    averages the logits: a photo and a title of the same product are pushed
    to the same place, and whatever the head learns from one modality
    applies to the other. Of the fusions it has the fewest parameters per
    modality, and like `late` it keeps working when a modality is missing.
    Without `presence` every modality counts.

    Args:
        units: width of the shared space and of the output.

    Example:

    >>> import numpy as np
    >>> fusion = SharedSpaceFusion(units=8)
    >>> tuple(fusion([np.ones((2, 5)), np.ones((2, 3))]).shape)
    (2, 8)
    """

    def __init__(self, units=256, **kwargs):
        super().__init__(units, **kwargs)
        self.adapters = []
        self.shared = keras.layers.Dense(units, activation="relu", name="shared",
                                         dtype=self.dtype_policy)
        self.norm = keras.layers.LayerNormalization(name="shared_norm", dtype=self.dtype_policy)

    def build(self, input_shapes):
        _check_inputs(self, input_shapes)
        self.adapters = _projections(self, input_shapes, name="adapter")
        self.shared.build((input_shapes[0][0], self.units))
        self.norm.build((input_shapes[0][0], self.units))

    def call(self, inputs, presence=None, training=None):
        return _masked_mean([self.norm(self.shared(x)) for x in _project(self.adapters, inputs)],
                            presence, self.compute_dtype)

    def compute_output_shape(self, input_shapes):
        return (input_shapes[0][0], self.units)


FUSIONS = {
    "concat": ConcatFusion,
    "gated": GatedFusion,
    "attention": AttentionFusion,
    "hierarchical": HierarchicalFusion,
    "late": LateFusion,
    "shared": SharedSpaceFusion,
}


def get_fusion(fusion, **kwargs):
    """A new fusion layer of the registered kind `fusion`, e.g. `"concat"`."""
    if fusion not in FUSIONS:
        raise ValueError(
            f"Unknown fusion {fusion!r}. Expected one of {sorted(FUSIONS)}. "
            f"Received: fusion={fusion!r}"
        )
    return FUSIONS[fusion](**kwargs)
