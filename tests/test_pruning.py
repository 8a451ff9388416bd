"""Magnitude pruning: the schedule, the masks that stay, the sparsity reached, the size saved."""

import keras
import numpy as np
import pytest

from keras_mmtl.data.pipeline import make_dataset
from keras_mmtl.evaluation import predict_records
from keras_mmtl.models import build_classifier_for, describe
from keras_mmtl.training.pruning import (
    MagnitudePruning,
    compressed_size,
    prunable_weights,
    prune,
    sparsity,
)
from keras_mmtl.training.trainer import compile_classifier

SMALL = dict(image_backbone="small_cnn", image_weights=None, image_size=(16, 16))


def test_the_schedule_rises_to_the_target_and_stays():
    callback = MagnitudePruning(0.9, ramp_steps=10)
    levels = [callback.sparsity_at(step) for step in range(15)]
    assert levels[0] == 0 and levels[10] == levels[14] == pytest.approx(0.9)
    assert all(a <= b for a, b in zip(levels, levels[1:]))
    assert MagnitudePruning(**callback.get_config()).get_config() == callback.get_config()
    with pytest.raises(ValueError, match="target must be in"):
        MagnitudePruning(1.0, 10)


class _ZerosAfterEachBatch(keras.callbacks.Callback):
    """Records the share of zeros in the model's one prunable kernel after every batch."""

    def __init__(self):
        super().__init__()
        self.levels = []

    def on_train_batch_end(self, batch, logs=None):
        (kernel,) = prunable_weights(self.model)
        self.levels.append(float((keras.ops.convert_to_numpy(kernel) == 0).mean()))


def test_pruned_weights_stay_zero_while_training():
    inputs = keras.Input((64,))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Dense(64)(inputs)))
    model.compile("adam", "mse")
    x = np.random.default_rng(0).normal(size=(256, 64)).astype("float32")
    y = np.random.default_rng(1).normal(size=(256, 2)).astype("float32")
    zeros = _ZerosAfterEachBatch()  # after the pruning callback: sees what the next batch gets
    model.fit(x, y, epochs=3, batch_size=16, verbose=0,
              callbacks=[MagnitudePruning(0.75, ramp_steps=16, frequency=4), zeros])
    (kernel,) = prunable_weights(model)  # the 64x64 kernel; the 64x2 one is too small
    assert tuple(kernel.shape) == (64, 64)
    assert sparsity(model) == pytest.approx(0.75, abs=0.01)
    # Between two mask updates the optimizer would revive pruned weights: the share of
    # zeros never falls, and from the end of the ramp it stays at the target.
    assert len(zeros.levels) == 48 and zeros.levels == sorted(zeros.levels)
    assert zeros.levels[15:] == pytest.approx([0.75] * 33, abs=0.01)


@pytest.mark.slow
def test_prune_reaches_its_target_keeps_the_answers_and_the_file_shrinks(product_records):
    keras.utils.set_random_seed(0)
    model = build_classifier_for(product_records, **SMALL)
    compile_classifier(model, 3e-3)
    data = make_dataset(product_records, "train", **describe(model).dataset_arguments(),
                        batch_size=8)
    model.fit(data, epochs=8, shuffle=False, verbose=0)
    labels, before = predict_records(model, product_records)  # all 24 rows
    # The known answer needs the colour and the word: a model guessing either is right on half.
    assert (before.argmax(axis=1) == labels).mean() >= 0.9
    dense_size = compressed_size(model)
    model.get_layer("image_backbone").trainable = False  # as a pretrained backbone would be
    reached = prune(model, product_records, 0.8, epochs=3, learning_rate=1e-3, batch_size=8,
                    verbose=0)
    assert reached == pytest.approx(0.8, abs=0.01)
    # Counted here rather than by `sparsity`: every large kernel, frozen ones too, lost 80%.
    kernels = {w.path: keras.ops.convert_to_numpy(w) for w in model.weights
               if w.name in ("kernel", "embeddings") and np.prod(w.shape) >= 1024}
    assert len(kernels) == 7  # 4 convolutions, the text embedding and dense, the fusion's 2
    for path, kernel in kernels.items():
        assert (kernel == 0).mean() == pytest.approx(0.8, abs=0.01), path
    assert compressed_size(model) < 0.5 * dense_size
    assert [layer.name for layer in model.layers if not layer.trainable] == ["image_backbone"]
    # The smallest weights went: the pruned model still gives the answers it gave.
    _, after = predict_records(model, product_records)
    assert (after.argmax(axis=1) == before.argmax(axis=1)).mean() >= 0.9
