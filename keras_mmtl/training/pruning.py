"""Magnitude pruning of a trained classifier, with fine-tuning (Keras 3 has no tfmot).

The smallest-magnitude weights of every large kernel are set to zero, a few at a time, while
the model fine-tunes; the rest learn to make up for them (Zhu & Gupta, 2017). The zeros are
not a sparse format: the model computes as before, but its weight files compress by about the
sparsity (`compressed_size`), which is what shrinks a download or an app.
"""

import gzip

import keras
import numpy as np

from keras_mmtl.data.pipeline import make_dataset
from keras_mmtl.keras_internals import all_layers
from keras_mmtl.models.spec import describe
from keras_mmtl.progress import keras_verbose
from keras_mmtl.training.optimizers import LayerwiseAdam
from keras_mmtl.training.trainer import compile_classifier

PRUNED = ("kernel", "depthwise_kernel", "embeddings")  # weights that are pruned, by name
MIN_SIZE = 1024  # smaller kernels (and every bias and normalisation) are left whole


def prunable_weights(model, min_size=MIN_SIZE):
    """The kernels and embeddings of `model` with at least `min_size` entries."""
    return [w for w in model.weights if w.name in PRUNED and int(np.prod(w.shape)) >= min_size]


def sparsity(model, min_size=MIN_SIZE):
    """The share of zeros in the prunable weights of `model`."""
    weights = [keras.ops.convert_to_numpy(w) for w in prunable_weights(model, min_size)]
    return float(sum((w == 0).sum() for w in weights) / max(sum(w.size for w in weights), 1))


@keras.saving.register_keras_serializable(package="keras_mmtl")
class MagnitudePruning(keras.callbacks.Callback):
    """Prunes the smallest-magnitude weights of the model's kernels while it trains.

    Every `frequency` batches, each prunable weight (`prunable_weights`) is
    cut to the current sparsity: its smallest entries by magnitude become
    zero. The sparsity ramps from 0 to `target` over `ramp_steps` batches as
    `target * (1 - (1 - t)^3)`, fast first, then slower, as TF Model
    Optimization's polynomial schedule. After every batch the pruned
    entries are set back to zero, so the optimizer cannot revive them.

    Args:
        target: the final sparsity, e.g. 0.75.
        ramp_steps: batches over which the sparsity reaches `target`.
        frequency: batches between two updates of the masks.
        min_size: smaller weights are left whole.

    Example:

    >>> callback = MagnitudePruning(0.8, ramp_steps=100)
    >>> round(callback.sparsity_at(50), 3), callback.sparsity_at(100)
    (0.7, 0.8)
    """

    def __init__(self, target, ramp_steps, frequency=10, min_size=MIN_SIZE):
        super().__init__()
        if not 0 <= target < 1:
            raise ValueError(f"target must be in [0, 1). Received: target={target}")
        self.target, self.ramp_steps = float(target), max(int(ramp_steps), 1)
        self.frequency, self.min_size = max(int(frequency), 1), int(min_size)
        self.step, self.masks = 0, {}

    def sparsity_at(self, step):
        """The sparsity the schedule asks for after `step` batches."""
        progress = min(step / self.ramp_steps, 1.0)
        return self.target * (1 - (1 - progress) ** 3)

    def on_train_begin(self, logs=None):
        self.weights = prunable_weights(self.model, self.min_size)

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step % self.frequency == 0 or self.step == self.ramp_steps:
            self._update_masks(self.sparsity_at(self.step))
        self._apply_masks()

    def on_train_end(self, logs=None):
        self._update_masks(self.sparsity_at(self.step))
        self._apply_masks()

    def _apply_masks(self):
        for weight in self.weights:
            if weight.path in self.masks:  # none yet at sparsity 0
                weight.assign(weight * self.masks[weight.path])

    def _update_masks(self, level):
        for weight in self.weights:
            values = np.abs(keras.ops.convert_to_numpy(weight))
            cut = int(level * values.size)
            if cut == 0:
                continue
            threshold = np.partition(values.ravel(), cut - 1)[cut - 1]
            self.masks[weight.path] = (values > threshold).astype(values.dtype)

    def get_config(self):
        return {"target": self.target, "ramp_steps": self.ramp_steps,
                "frequency": self.frequency, "min_size": self.min_size}

    @classmethod
    def from_config(cls, config):  # keras.callbacks.Callback has none
        return cls(**config)


def prune(model, records, target=0.5, *, epochs=2, learning_rate=1e-4, batch_size=32,
          ramp=0.5, seed=0, verbose="auto"):
    """Prunes a trained classifier to `target` sparsity while fine-tuning it (in place).

    Every layer but BatchNorm is trainable during the fine-tuning (as in
    phase 2 of `train`), and frozen ones are frozen again after it. The sparsity
    reaches `target` after the first `ramp` of the fine-tuning's batches;
    the rest trains at that sparsity. Keep the learning rate low: the
    weights only need to adjust to their lost neighbours.

    Args:
        model: a trained classifier (one output or several).
        records: `Records` with a train split (and val, for the logs).
        target: the share of each large kernel's weights set to zero.
        epochs: fine-tuning epochs.
        learning_rate: Adam learning rate of the fine-tuning.
        batch_size: samples per batch.
        ramp: fraction of the fine-tuning over which the sparsity rises.
        seed: shuffle seed.
        verbose: Keras progress output.

    Returns:
        the sparsity reached (`sparsity(model)`).

    Example:

    >>> prune(model, records, 0.75, epochs=2)  # doctest: +SKIP
    0.75
    """
    layers = all_layers(model)
    trainable = [layer.trainable for layer in layers]
    for layer in layers:  # BatchNorm keeps its statistics and scale, as in phase 2
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
    arguments = describe(model).dataset_arguments()
    train = make_dataset(records, "train", **arguments, batch_size=batch_size, seed=seed)
    has_val = bool((records.splits == "val").any())
    val = make_dataset(records, "val", **arguments, batch_size=batch_size) if has_val else None
    compile_classifier(model, LayerwiseAdam(learning_rate=learning_rate))
    callback = MagnitudePruning(target, ramp_steps=ramp * epochs * len(train))
    try:
        model.fit(train, validation_data=val, epochs=epochs, callbacks=[callback],
                  shuffle=False, verbose=keras_verbose(verbose))  # the dataset shuffles itself
    finally:
        for layer, flag in zip(layers, trainable):
            layer.trainable = flag
    return sparsity(model)


def compressed_size(model):
    """Bytes of the model's weights (float32, as stored) after gzip: what the zeros save.

    The weights only, not an optimizer's state, which a served model does not carry.
    """
    data = b"".join(np.ascontiguousarray(keras.ops.convert_to_numpy(w)).tobytes()
                    for w in model.weights)
    return len(gzip.compress(data, compresslevel=6))
