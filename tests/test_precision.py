"""Mixed precision: "auto" picks a policy per GPU; every model kind trains in float16 and bfloat16.

No GPU runs these tests: the device details are faked for `setup_precision`,
and the CPU computes float16 and bfloat16 as a GPU would (more slowly).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_mmtl.data import from_arrays, make_dataset
from keras_mmtl.models import build_classifier_for, describe
from keras_mmtl.training import setup_precision
from keras_mmtl.training.trainer import compile_classifier
from test_xla import KINDS, SMALL, kind_records, phase_model

MIXED = ("mixed_float16", "mixed_bfloat16")
FAST = {("fusion_attention", "mixed_float16"), ("multitask", "mixed_bfloat16")}


@pytest.fixture(autouse=True)
def _restore_policy():
    policy = keras.mixed_precision.global_policy()
    yield
    keras.mixed_precision.set_global_policy(policy)


@pytest.mark.parametrize("capabilities, expected", [
    pytest.param([], "float32", id="no_gpu"),
    pytest.param([(6, 1)], "float32", id="pascal"),  # no tensor cores
    pytest.param([(7, 0)], "mixed_float16", id="volta"),
    pytest.param([(7, 5)], "mixed_float16", id="turing"),
    pytest.param([(8, 0)], "mixed_bfloat16", id="ampere"),
    pytest.param([(8, 9)], "mixed_bfloat16", id="ada"),
    pytest.param([(9, 0)], "mixed_bfloat16", id="hopper"),
    pytest.param([(8, 6), (7, 5)], "mixed_float16", id="ampere_and_turing"),  # the least decides
    pytest.param([(8, 0), (6, 0)], "float32", id="ampere_and_pascal"),
    pytest.param([None], "float32", id="unknown"),  # details without a compute capability
])
def test_auto_precision_follows_the_gpus_compute_capability(capabilities, expected,
                                                            monkeypatch):
    gpus = [tf.config.PhysicalDevice(f"/physical_device:GPU:{i}", "GPU")
            for i in range(len(capabilities))]
    details = {gpu.name: {} if c is None else {"compute_capability": c}
               for gpu, c in zip(gpus, capabilities)}
    grown = []
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda device_type=None: gpus if device_type == "GPU" else [])
    monkeypatch.setattr(tf.config.experimental, "get_device_details",
                        lambda gpu: details[gpu.name])
    monkeypatch.setattr(tf.config.experimental, "set_memory_growth",
                        lambda gpu, enable: grown.append((gpu.name, enable)))
    assert setup_precision("auto") == expected
    assert keras.mixed_precision.global_policy().name == expected
    assert grown == [(gpu.name, True) for gpu in gpus]


def test_a_policy_asked_for_is_set_as_is():
    assert setup_precision("mixed_bfloat16") == "mixed_bfloat16"
    assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"


def _outputs(predictions):
    return list(predictions.values()) if isinstance(predictions, dict) else [predictions]


# bfloat16 on the kinds whose layers differ; the other fusions and text encoders share them.
BFLOAT16_KINDS = ("image", "text", "text_ngrams", "fusion_attention", "fusion_gated",
                  "multitask", "missing", "tabular")


@pytest.mark.parametrize("kind, policy", [
    pytest.param(kind, policy, id=f"{kind}-{policy}",
                 marks=() if (kind, policy) in FAST else pytest.mark.slow)
    for kind in KINDS for policy in MIXED
    if policy == "mixed_float16" or kind in BFLOAT16_KINDS])
def test_each_model_kind_trains_saves_and_reloads_under_mixed_precision(kind, policy,
                                                                          tmp_path):
    options, data, _ = KINDS[kind]
    records = kind_records(**data)
    setup_precision(policy)
    model = build_classifier_for(records, **SMALL, **options)
    compute = policy.removeprefix("mixed_")
    assert compute in {layer.compute_dtype for layer in model._flatten_layers()}
    assert all(output.dtype == "float32" for output in _outputs(model.output))  # the heads
    compile_classifier(model, 1e-3)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) is (
        policy == "mixed_float16")  # bfloat16 has float32's range: no loss scaling
    x, y = next(iter(_dataset(model, records)))
    history = model.fit(x, y, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    predictions = model.predict(x, verbose=0)
    for output in _outputs(predictions):
        assert output.dtype == np.float32 and np.isfinite(output).all()
        np.testing.assert_allclose(output.sum(axis=-1), 1.0, atol=1e-3)
    model.save(tmp_path / "model.keras")
    reloaded = keras.models.load_model(tmp_path / "model.keras")  # safe_mode
    assert compute in {layer.compute_dtype for layer in reloaded._flatten_layers()}
    for before, after in zip(_outputs(predictions), _outputs(reloaded.predict(x, verbose=0))):
        np.testing.assert_allclose(after, before, atol=1e-6)


@pytest.mark.parametrize("policy, kind, phase", [
    ("mixed_float16", "text", "cached"),  # loss scaling around sparse (lazy) Adam updates
    pytest.param("mixed_bfloat16", "text", "cached", marks=pytest.mark.slow),
    pytest.param("mixed_float16", "image", "uncached", marks=pytest.mark.slow),
    pytest.param("mixed_bfloat16", "image", "uncached", marks=pytest.mark.slow),
])
@pytest.mark.filterwarnings("ignore:.*shuffle=True")  # fit() on a tf.data dataset
def test_xla_compiles_mixed_precision_training(policy, kind, phase, tmp_path):
    # What a GPU runs by default: "auto" precision and, where the layers allow, XLA.
    setup_precision(policy)
    model, train_ds, _ = phase_model(kind, phase, tmp_path)
    compile_classifier(model, 1e-3)
    model.jit_compile = True
    assert model.jit_compile is True
    history = model.fit(train_ds.take(2), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert np.isfinite(model.predict(train_ds.take(1).map(lambda x, y: x), verbose=0)).all()


def _dataset(model, records):
    return make_dataset(records, "train", **describe(model).dataset_arguments(), batch_size=16,
                        shuffle=False)


def large_numbers(n=64):
    """Tabular data beyond float16: a price around 1e6 with a variance of 9e10, and a column
    near float16's largest value (65504) with a variance of 1e6. The label needs both."""
    rng = np.random.default_rng(0)
    price = 1e6 + rng.normal(0, 3e5, n)
    near_limit = 60000 + rng.normal(0, 1e3, n)
    labels = np.where((price - 1e6) / 3e5 + (near_limit - 60000) / 1e3 > 0, "dear", "cheap")
    return from_arrays(list(labels), tabular=np.stack([price, near_limit], 1),
                       splits=["train"] * n)


@pytest.mark.parametrize("policy, tolerance", [("mixed_float16", 0.01),
                                               ("mixed_bfloat16", 0.03)])
def test_tabular_values_beyond_float16_train_and_predict_as_in_float32(policy, tolerance):
    records = large_numbers()
    x, y = {"tabular": tf.constant(records.tabular, "float32")}, records.labels
    keras.utils.set_random_seed(0)
    reference = build_classifier_for(records)  # float32, trained to read both columns
    compile_classifier(reference, 1e-2)
    reference.fit(x, y, batch_size=32, epochs=20, verbose=0)
    expected = reference.predict(x, verbose=0)
    assert np.mean(expected.argmax(-1) == y) >= 0.9
    setup_precision(policy)
    model = build_classifier_for(records)
    assert model.get_layer("tabular_hidden").compute_dtype == policy.removeprefix("mixed_")
    model.set_weights(reference.get_weights())
    predictions = model.predict(x, verbose=0)
    assert np.isfinite(predictions).all()
    np.testing.assert_allclose(predictions, expected, atol=tolerance)
    compile_classifier(model, 1e-3)
    history = model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert np.isfinite(model.predict(x, verbose=0)).all()
