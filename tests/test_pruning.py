"""Magnitude pruning: the schedule, the masks that stay, the sparsity reached, the size saved."""

import keras
import numpy as np
import pytest

from keras_mmtl.evaluation import evaluate
from keras_mmtl.models import build_classifier_for
from keras_mmtl.training import train
from keras_mmtl.training.pruning import (
    MagnitudePruning,
    compressed_size,
    prunable_weights,
    prune,
    sparsity,
)

SMALL = dict(image_backbone="small_cnn", image_weights=None, image_size=(16, 16))


def test_the_schedule_rises_to_the_target_and_stays():
    callback = MagnitudePruning(0.9, ramp_steps=10)
    levels = [callback.sparsity_at(step) for step in range(15)]
    assert levels[0] == 0 and levels[10] == levels[14] == pytest.approx(0.9)
    assert all(a <= b for a, b in zip(levels, levels[1:]))
    assert MagnitudePruning(**callback.get_config()).get_config() == callback.get_config()
    with pytest.raises(ValueError, match="target must be in"):
        MagnitudePruning(1.0, 10)


def test_pruned_weights_stay_zero_while_training():
    inputs = keras.Input((64,))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Dense(64)(inputs)))
    model.compile("adam", "mse")
    x = np.random.default_rng(0).normal(size=(256, 64)).astype("float32")
    y = np.random.default_rng(1).normal(size=(256, 2)).astype("float32")
    model.fit(x, y, epochs=3, batch_size=16, verbose=0,
              callbacks=[MagnitudePruning(0.75, ramp_steps=16, frequency=4)])
    (kernel,) = prunable_weights(model)  # the 64x64 kernel; the 64x2 one is too small
    assert tuple(kernel.shape) == (64, 64)
    assert sparsity(model) == pytest.approx(0.75, abs=0.01)


@pytest.mark.slow
def test_prune_reaches_its_target_and_the_file_shrinks(tmp_path, product_records):
    model = build_classifier_for(product_records, **SMALL)
    train(model, product_records, str(tmp_path), epochs=10, patience=10, learning_rate=3e-3,
          verbose=0, projector=False)
    dense_size = compressed_size(model)
    frozen = [layer.name for layer in model.layers if not layer.trainable]
    reached = prune(model, product_records, 0.8, epochs=3, learning_rate=1e-3, batch_size=8,
                    verbose=0)
    assert reached == pytest.approx(0.8, abs=0.01)
    assert compressed_size(model) < 0.5 * dense_size
    assert [layer.name for layer in model.layers if not layer.trainable] == frozen
    assert evaluate(model, product_records, "test").accuracy > 0.4
