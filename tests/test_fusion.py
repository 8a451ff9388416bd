"""Fusion layers: shapes, presence masks, serialization, saving, mixed precision."""

import os

import keras
import numpy as np
import pytest

from keras_mmtl.models.fusion import (
    FUSIONS,
    AttentionFusion,
    ConcatFusion,
    GatedFusion,
    HierarchicalFusion,
    LateFusion,
    SharedSpaceFusion,
    get_fusion,
)

UNITS = 8
WIDTHS = (5, 3, 4)
# Small, deterministic settings for each fusion (attention: no dropout, 2 heads).
OPTIONS = {"attention": {"num_heads": 2, "dropout": 0.0}}
# Fusions whose output ignores a missing modality.
MASKING = ("gated", "attention", "late", "shared")


def make(fusion, **kwargs):
    return get_fusion(fusion, units=UNITS, **OPTIONS.get(fusion, {}), **kwargs)


def features(count=2, batch=4, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(batch, width)).astype("float32") for width in WIDTHS[:count]]


def expected_width(name, count):
    return UNITS * count if name == "concat" else UNITS


@pytest.fixture
def restore_policy():
    policy = keras.mixed_precision.global_policy()
    yield
    keras.mixed_precision.set_global_policy(policy)


def test_registry_order_and_classes():
    assert list(FUSIONS) == ["concat", "gated", "attention", "hierarchical", "late", "shared"]
    assert [FUSIONS[n] for n in FUSIONS] == [ConcatFusion, GatedFusion, AttentionFusion,
                                            HierarchicalFusion, LateFusion, SharedSpaceFusion]


@pytest.mark.parametrize("count", [2, 3])
def test_shared_fusion_shares_its_layers_across_modalities(count):
    fusion = make("shared")
    inputs = features(count)
    fusion(inputs)
    # One adapter per modality (kernel, bias), then one dense layer and one norm for all.
    assert len(fusion.weights) == 2 * count + 4
    # Two modalities whose adapters give the same vector land on the same shared vector.
    for adapter in fusion.adapters:
        adapter.kernel.assign(np.zeros_like(adapter.kernel))
        adapter.bias.assign(np.full(UNITS, 0.5, "float32"))
    single = fusion.norm(fusion.shared(np.full((1, UNITS), 0.5, "float32")))
    np.testing.assert_allclose(fusion(inputs)[:1], single, atol=1e-6)


@pytest.mark.bad_input
def test_unknown_fusion_error():
    with pytest.raises(ValueError, match=r"Unknown fusion 'sum'. Expected one of .*'gated'.*"
                                         r"Received: fusion='sum'"):
        get_fusion("sum")


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("name", list(FUSIONS))
def test_output_shape(name, count):
    fusion = make(name)
    inputs = features(count)
    outputs = fusion(inputs)
    assert tuple(outputs.shape) == (4, expected_width(name, count))
    assert fusion.compute_output_shape([x.shape for x in inputs]) == tuple(outputs.shape)
    symbolic = make(name)([keras.Input((w,)) for w in WIDTHS[:count]])
    assert tuple(symbolic.shape) == (None, expected_width(name, count))


@pytest.mark.parametrize("name", ["gated", "attention", "hierarchical", "late"])
def test_needs_two_inputs(name):
    with pytest.raises(ValueError, match="at least 2"):
        make(name)([np.ones((2, 3), "float32")])


def test_attention_heads_must_divide_units():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        AttentionFusion(units=10, num_heads=4)


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("name", MASKING)
def test_missing_modality_does_not_reach_output(name, count):
    fusion = make(name)
    inputs = features(count)
    presence = [np.ones(4, "float32") for _ in range(count)]
    presence[1] = np.array([0, 1, 0, 1], "float32")
    changed = list(inputs)
    changed[1] = inputs[1] * 10 + 3
    before = fusion(inputs, presence=presence).numpy()
    after = fusion(changed, presence=presence).numpy()
    missing = presence[1] == 0
    np.testing.assert_allclose(before[missing], after[missing], atol=1e-5)
    assert not np.allclose(before[~missing], after[~missing])  # present: it does matter


@pytest.mark.parametrize("name", list(FUSIONS))
def test_all_present_equals_no_presence(name):
    fusion = make(name)
    inputs = features(3)
    presence = [np.ones(4, "float32")] * 3
    np.testing.assert_allclose(fusion(inputs, presence=presence).numpy(),
                               fusion(inputs).numpy(), atol=1e-6)


def test_gates_sum_to_one_and_are_zero_when_missing():
    fusion = GatedFusion(units=UNITS)
    presence = [np.ones(4, "float32"), np.array([1, 0, 1, 0], "float32"),
                np.array([0, 1, 1, 1], "float32")]
    fused, gates = fusion(features(3), presence=presence, return_gates=True)
    gates = gates.numpy()
    assert gates.shape == (4, 3)
    np.testing.assert_allclose(gates.sum(axis=-1), 1, atol=1e-6)
    np.testing.assert_array_equal(gates[np.stack(presence, -1) == 0], 0)
    np.testing.assert_allclose(fused, fusion(features(3), presence=presence), atol=1e-6)


def test_late_fusion_is_masked_mean_of_projections():
    fusion = LateFusion(units=UNITS)
    inputs = features(2)
    presence = [np.array([1, 1, 0, 1], "float32"), np.array([1, 0, 1, 1], "float32")]
    outputs = fusion(inputs, presence=presence).numpy()
    projected = [fusion.projections[i](x).numpy() for i, x in enumerate(inputs)]
    np.testing.assert_allclose(outputs[0], (projected[0][0] + projected[1][0]) / 2, atol=1e-5)
    np.testing.assert_allclose(outputs[1], projected[0][1], atol=1e-5)
    np.testing.assert_allclose(outputs[2], projected[1][2], atol=1e-5)


@pytest.mark.parametrize("name", list(FUSIONS))
def test_config_round_trip(name):
    fusion = make(name, name="fusion")
    inputs = features(3)
    presence = [np.ones(4, "float32"), np.array([1, 0, 1, 0], "float32"), np.ones(4, "float32")]
    expected = fusion(inputs, presence=presence).numpy()
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(fusion))
    assert type(clone) is type(fusion) and clone.get_config() == fusion.get_config()
    assert clone.built  # from the serialized build config
    clone.set_weights(fusion.get_weights())
    np.testing.assert_allclose(clone(inputs, presence=presence).numpy(), expected, atol=1e-6)


def presence_model(name, count=2):
    """Inputs -> Dense -> fusion(presence=...) -> Dense softmax, presence as keyword tensors."""
    inputs = [keras.Input((w,), name=f"x{i}") for i, w in enumerate(WIDTHS[:count])]
    presence = [keras.Input((), name=f"x{i}_present") for i in range(count)]
    hidden = [keras.layers.Dense(6, name=f"dense_{i}")(x) for i, x in enumerate(inputs)]
    fused = make(name, name="fusion")(hidden, presence=presence)
    outputs = keras.layers.Dense(3, activation="softmax", dtype="float32", name="head")(fused)
    return keras.Model(inputs + presence, outputs)


@pytest.mark.parametrize("name", list(FUSIONS))
def test_functional_model_with_presence_saves_and_loads(name, tmp_path):
    model = presence_model(name, count=3)
    data = features(3) + [np.ones(4, "float32"), np.array([1, 0, 1, 0], "float32"),
                          np.array([0, 1, 1, 1], "float32")]
    expected = model.predict(data, verbose=0)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded.get_layer("fusion")) is FUSIONS[name]
    np.testing.assert_allclose(loaded.predict(data, verbose=0), expected, atol=1e-6)


def test_functional_model_exposes_gates():
    inputs = [keras.Input((w,)) for w in WIDTHS[:2]]
    presence = [keras.Input(()) for _ in range(2)]
    fused, gates = GatedFusion(units=UNITS)(inputs, presence=presence, return_gates=True)
    assert tuple(fused.shape) == (None, UNITS) and tuple(gates.shape) == (None, 2)
    model = keras.Model(inputs + presence, gates)
    out = model.predict(features(2) + [np.ones(4, "float32"),
                                       np.array([1, 0, 1, 0], "float32")], verbose=0)
    np.testing.assert_allclose(out[[1, 3], 1], 0)


@pytest.mark.parametrize("name", list(FUSIONS))
def test_mixed_float16(name, restore_policy):
    keras.mixed_precision.set_global_policy("mixed_float16")
    fusion = make(name)
    inputs = features(3)
    presence = [np.ones(4, "float32"), np.array([1, 0, 1, 0], "float32"), np.ones(4, "float32")]
    outputs = fusion(inputs, presence=presence)
    assert outputs.dtype == "float16"
    assert all(w.dtype == "float32" for w in fusion.weights)
    assert np.all(np.isfinite(outputs.numpy()))
    symbolic = make(name)([keras.Input((w,)) for w in WIDTHS[:3]],
                          presence=[keras.Input(()) for _ in range(3)])
    assert symbolic.dtype == "float16"


def test_mixed_float16_gates_mask_missing(restore_policy):
    keras.mixed_precision.set_global_policy("mixed_float16")
    presence = [np.ones(4, "float32"), np.array([1, 0, 1, 0], "float32")]
    _, gates = GatedFusion(units=UNITS)(features(2), presence=presence, return_gates=True)
    gates = gates.numpy().astype("float32")
    np.testing.assert_array_equal(gates[[1, 3], 1], 0)
    np.testing.assert_allclose(gates.sum(-1), 1, atol=1e-3)


def test_attention_trains_with_dropout():
    fusion = AttentionFusion(units=UNITS, num_heads=2, num_layers=2, dropout=0.5)
    inputs = features(2)
    eval_out = fusion(inputs, training=False).numpy()
    np.testing.assert_allclose(fusion(inputs, training=False).numpy(), eval_out)
    assert not np.allclose(fusion(inputs, training=True).numpy(), eval_out)
    assert len(fusion.attentions) == 2
