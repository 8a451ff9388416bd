import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_mmtl.models import backbone_network, build_classifier, unfreeze_top_blocks
from keras_mmtl.training.optimizers import (
    LayerwiseAdam,
    decoupled_weight_decay,
    fine_tuning_optimizer,
    layerwise_multipliers,
)

SMALL = dict(image_backbone="small_cnn", image_weights=None, image_size=(16, 16),
             freeze_backbone=True, text_encoder=None)


@pytest.mark.parametrize("decay", [0.5, 0.8, 1.0])
def test_layer_decay_shrinks_the_rate_one_block_at_a_time(decay):
    model = build_classifier(["a", "b"], **SMALL)
    unfreeze_top_blocks(model, 3)
    multipliers = layerwise_multipliers(model, decay)
    network = backbone_network(model)
    for layer, depth in [("block4_conv", 0), ("block3_conv", 1), ("block2_conv", 2)]:
        for weight in network.get_layer(layer).weights:
            assert multipliers[weight.path] == pytest.approx(decay**depth)
    assert not any(w.path in multipliers for w in network.get_layer("block1_conv").weights)
    assert not any(w.path in multipliers for w in model.get_layer("head").weights)
    assert len({w.path for w in model.trainable_weights}) == len(model.trainable_weights)


def test_layerwise_adam_scales_each_update_and_round_trips():
    layer = keras.layers.Dense(1, bias_initializer="zeros", kernel_initializer="zeros")
    layer.build((None, 1))
    optimizer = LayerwiseAdam({layer.kernel.path: 0.25}, learning_rate=0.1)
    optimizer.apply([np.ones((1, 1), "float32"), np.ones((1,), "float32")], layer.weights)
    np.testing.assert_allclose(layer.kernel.numpy(), [[-0.025]], rtol=1e-3)
    np.testing.assert_allclose(layer.bias.numpy(), [-0.1], rtol=1e-3)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(restored, LayerwiseAdam)
    assert restored.learning_rate_multipliers == {layer.kernel.path: 0.25}


def test_fine_tuning_rate_warms_up_then_decays_to_zero():
    model = build_classifier(["a", "b"], **SMALL)
    schedule = fine_tuning_optimizer(model, 1e-3, 100, warmup=0.1)._learning_rate
    rates = [float(schedule(step)) for step in range(0, 101, 5)]
    peak = int(np.argmax(rates))
    assert rates[0] == 0 and rates[peak] == pytest.approx(1e-3) and peak * 5 == 10
    assert all(a <= b for a, b in zip(rates[:peak], rates[1:peak + 1]))
    assert all(a >= b for a, b in zip(rates[peak:], rates[peak + 1:]))
    assert rates[-1] == pytest.approx(0, abs=1e-9)


@pytest.mark.bad_input
@pytest.mark.parametrize("warmup, decay", [(1.0, 0.8), (0.1, 0.0), (0.1, 1.5)])
def test_bad_schedule_settings_are_refused(warmup, decay):
    model = build_classifier(["a", "b"], **SMALL)
    with pytest.raises(ValueError, match="warmup|layer_decay"):
        fine_tuning_optimizer(model, 1e-3, 10, warmup=warmup, layer_decay=decay)


def test_fused_and_lazy_updates_match_keras_adam():
    # Every embedding row used at every step, no duplicates: lazy Adam is Adam.
    x = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
    ids = np.array([0, 1, 2])
    results = []
    for optimizer in (keras.optimizers.Adam(0.01), LayerwiseAdam(learning_rate=0.01)):
        keras.utils.set_random_seed(0)
        dense, embedding = keras.layers.Dense(2), keras.layers.Embedding(5, 2)
        dense.build((None, 3))
        embedding.build((None,))
        variables = dense.trainable_variables + embedding.trainable_variables
        for _ in range(3):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(dense(x) ** 2) + tf.reduce_sum(embedding(ids) ** 3)
            optimizer.apply(tape.gradient(loss, variables), variables)
        results.append([v.numpy() for v in variables])
    for ours, reference in zip(*results):
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-6)


def test_weight_decay_shrinks_kernels_not_biases():
    layer = keras.layers.Dense(2, kernel_initializer="ones", bias_initializer="ones")
    layer.build((None, 3))
    optimizer = decoupled_weight_decay(LayerwiseAdam(learning_rate=0.1, weight_decay=0.5))
    optimizer.apply([keras.ops.zeros((3, 2)), keras.ops.zeros((2,))], layer.trainable_variables)
    np.testing.assert_allclose(layer.kernel.numpy(), 1 - 0.1 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(layer.bias.numpy(), 1.0)
