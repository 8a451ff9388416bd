"""Every object keras_mmtl registers with Keras saves and loads: same config, same answers.

Layers go through `run_model_saving_test` (as keras-hub's): built in a small model with
random weights, saved to `.keras`, loaded with `safe_mode=True`, and compared. The loss,
the metric and the optimizer go through a compiled model's save and load; the callback,
which a model does not carry, through Keras' own serialization. A registered object with
no case here fails `test_every_registered_object_has_a_case`.
"""

import collections
import json
import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_mmtl.data.augmentation import ImageAugmentation, TextAugmentation
from keras_mmtl.models.ensemble import EnsembleHead, MirrorImages
from keras_mmtl.models.fusion import (
    AttentionFusion,
    ConcatFusion,
    GatedFusion,
    HierarchicalFusion,
    LateFusion,
    SharedSpaceFusion,
)
from keras_mmtl.models.heads import ClassifierHead, GradientReversal
from keras_mmtl.models.missing import MissingModality, ModalityDropout
from keras_mmtl.models.text import (
    MaskedMeanPooling,
    NgramProjection,
    TextTokenizer,
    WordPieceTokenizer,
)
from keras_mmtl.training.losses import ClassificationLoss
from keras_mmtl.training.metrics import LabelledAccuracy, MacroF1
from keras_mmtl.training.optimizers import LayerwiseAdam
from keras_mmtl.training.pruning import MagnitudePruning

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "keras_mmtl")
REGISTERED = re.compile(
    r"@keras\.saving\.register_keras_serializable\([^)]*\)\s*\nclass (\w+)")


def _floats(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _presence():
    return np.array([1.0, 0.0, 1.0], "float32")


def _fusion_inputs():
    return [_floats(3, 5), _floats(3, 4, seed=1), _presence(), np.ones(3, "float32")]


def _fuse(layer, x):
    return layer(x[:2], presence=x[2:])


def _bags():
    """Two bags of n-gram counts (index 0: out of vocabulary), as TextVectorization gives."""
    return [tf.sparse.from_dense(tf.constant([[0.0, 3.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 2.0]])),
            tf.sparse.from_dense(tf.constant([[1.0, 0.0, 0.0, 2.0], [0.0, 1.0, 0.0, 0.0],
                                              [0.0, 0.0, 4.0, 1.0]]))]


WORDPIECE = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "red", "shoe", "##s"]
TEXTS = ["Red shoes", "a blue shirt", ""]

# A layer under test: `make()` builds it, `inputs()` its concrete inputs (a tensor or a
# list of them), and `call(layer, symbolic)` wires it into a model (default: one argument).
Case = collections.namedtuple("Case", ["make", "inputs", "call"], defaults=[None])

LAYERS = {
    "ClassifierHead": Case(lambda: ClassifierHead(["a", "b", "c"], dropout=0.1, temperature=1.5),
                           lambda: _floats(3, 4)),
    "GradientReversal": Case(lambda: GradientReversal(0.3), lambda: _floats(3, 4)),
    "EnsembleHead": Case(
        lambda: EnsembleHead([ClassifierHead(["a", "b"]), ClassifierHead(["a", "b"])], [3, 2],
                             temperature=1.5, combine="geometric"),
        lambda: _floats(3, 5)),
    "MirrorImages": Case(MirrorImages, lambda: _floats(2, 4, 3, 3)),
    "MissingModality": Case(MissingModality, lambda: [_floats(3, 4), _presence()]),
    "ModalityDropout": Case(lambda: ModalityDropout(0.3, seed=1),
                            lambda: [_presence(), np.ones(3, "float32")]),
    "ConcatFusion": Case(lambda: ConcatFusion(units=4), _fusion_inputs, _fuse),
    "GatedFusion": Case(lambda: GatedFusion(units=4), _fusion_inputs, _fuse),
    "AttentionFusion": Case(lambda: AttentionFusion(units=4, num_heads=2, dropout=0.0),
                            _fusion_inputs, _fuse),
    "HierarchicalFusion": Case(lambda: HierarchicalFusion(units=4), _fusion_inputs, _fuse),
    "LateFusion": Case(lambda: LateFusion(units=4), _fusion_inputs, _fuse),
    "SharedSpaceFusion": Case(lambda: SharedSpaceFusion(units=4), _fusion_inputs, _fuse),
    "TextTokenizer": Case(lambda: TextTokenizer(["red", "shirt"], sequence_length=4),
                          lambda: tf.constant(TEXTS)),
    "MaskedMeanPooling": Case(MaskedMeanPooling,
                              lambda: [_floats(3, 4, 2), np.array([[2, 3, 0, 0], [1, 0, 0, 0],
                                                                   [0, 0, 0, 0]], "int32")],
                              lambda layer, x: layer(x[0], x[1])),
    "WordPieceTokenizer": Case(lambda: WordPieceTokenizer(WORDPIECE, sequence_length=5),
                               lambda: tf.constant(TEXTS)),
    "NgramProjection": Case(lambda: NgramProjection(4, idf_weights=[[1.0, 2.0], [0.5, 1.5, 1.0]]),
                            _bags),
    "ImageAugmentation": Case(lambda: ImageAugmentation(rotation=0.1, crop=0.2, seed=3),
                              lambda: np.random.default_rng(0).uniform(
                                  0, 255, (3, 8, 8, 3)).astype("float32")),
    "TextAugmentation": Case(lambda: TextAugmentation(delete=0.2, swap=0.3, seed=2),
                             lambda: tf.constant(TEXTS)),
}


def _symbolic(value):
    """A `keras.Input` like the concrete input `value` (batch axis left free)."""
    if isinstance(value, tf.SparseTensor):
        return keras.Input(tuple(value.dense_shape.numpy()[1:]), sparse=True,
                           dtype=value.dtype.name)
    value = tf.convert_to_tensor(value)
    return keras.Input(tuple(value.shape[1:]), dtype=value.dtype.name)


def _plain(config):
    """`config` as JSON gives it back (tuples become lists), as a `.keras` file stores it."""
    return json.loads(json.dumps(config))


def _assert_same(actual, expected):
    for a, e in zip(keras.tree.flatten(actual), keras.tree.flatten(expected), strict=True):
        a, e = keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(e)
        if a.dtype.kind == "f":
            np.testing.assert_allclose(a, e, atol=1e-6)
        else:
            np.testing.assert_array_equal(a, e)


def run_model_saving_test(case, path):
    """Builds `case`'s layer in a model, randomizes its weights, saves, reloads, compares.

    Random weights: a weight the file lost would come back at its initial value (often
    zeros or ones), which the answers would show.

    Returns:
        `(model, restored)`.
    """
    layer = case.make()
    inputs = case.inputs()
    symbolic = [_symbolic(x) for x in inputs] if isinstance(inputs, list) else _symbolic(inputs)
    outputs = (case.call or (lambda layer, x: layer(x)))(layer, symbolic)
    model = keras.Model(symbolic, outputs)
    rng = np.random.default_rng(0)
    for weight in model.weights:
        if keras.backend.standardize_dtype(weight.dtype).startswith("float"):
            weight.assign(rng.normal(0, 0.5, weight.shape))
    expected = model(inputs)
    model.save(path)
    restored = keras.saving.load_model(path, safe_mode=True)
    restored_layer = restored.get_layer(layer.name)
    assert type(restored_layer) is type(layer)
    assert _plain(restored_layer.get_config()) == _plain(layer.get_config())
    assert _plain(restored.get_config()) == _plain(model.get_config())
    _assert_same(restored(inputs), expected)
    return model, restored


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_saves_and_loads(name, tmp_path):
    if name == "WordPieceTokenizer":
        pytest.importorskip("tensorflow_text")
    run_model_saving_test(LAYERS[name], str(tmp_path / f"{name}.keras"))


def test_gradient_reversal_still_reverses_after_loading(tmp_path):
    _, restored = run_model_saving_test(LAYERS["GradientReversal"], str(tmp_path / "m.keras"))
    x = tf.constant(_floats(3, 4))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.reduce_sum(restored(x))
    np.testing.assert_allclose(tape.gradient(y, x), np.full((3, 4), -0.3), rtol=1e-6)


# What a compiled model carries: the object under test in its place, Keras' own elsewhere.
COMPILED = {
    "ClassificationLoss": lambda model: dict(
        loss=ClassificationLoss(gamma=2.0, label_smoothing=0.1)),
    "MacroF1": lambda model: dict(metrics=[MacroF1(3, name="f1")]),
    "LabelledAccuracy": lambda model: dict(metrics=[LabelledAccuracy(name="acc")]),
    # The multipliers are keyed by variable path: they must still match after loading.
    "LayerwiseAdam": lambda model: dict(optimizer=LayerwiseAdam(
        {model.layers[-1].kernel.path: 0.1}, learning_rate=0.01)),
}


def _classifier():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(hidden))


@pytest.mark.parametrize("name", sorted(COMPILED))
def test_compiled_object_saves_and_loads_with_its_model(name, tmp_path):
    keras.utils.set_random_seed(0)
    model = _classifier()
    compiled = {"optimizer": "adam", "loss": "sparse_categorical_crossentropy",
                "metrics": ["accuracy"], **COMPILED[name](model)}
    model.compile(**compiled)
    x, y = _floats(16, 4), np.arange(16) % 3
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # builds the optimizer's slots
    path = str(tmp_path / f"{name}.keras")
    model.save(path)
    restored = keras.saving.load_model(path, safe_mode=True)
    assert _plain(restored.get_compile_config()) == _plain(model.get_compile_config())
    assert type(restored.optimizer) is type(model.optimizer)
    assert restored.optimizer.get_config() == model.optimizer.get_config()
    assert restored.evaluate(x, y, verbose=0, return_dict=True) == pytest.approx(
        model.evaluate(x, y, verbose=0, return_dict=True))
    # One more step from the same state gives the same weights: slots and rates came back.
    _assert_same([v.numpy() for v in restored.optimizer.variables],
                 [v.numpy() for v in model.optimizer.variables])
    for trained in (model, restored):
        trained.train_on_batch(x[:8], y[:8])
    _assert_same(restored.get_weights(), model.get_weights())


def test_pruning_callback_serializes():
    callback = MagnitudePruning(0.6, ramp_steps=20, frequency=5, min_size=16)
    config = json.loads(json.dumps(keras.saving.serialize_keras_object(callback)))
    assert config["registered_name"] == "keras_mmtl>MagnitudePruning"
    restored = keras.saving.deserialize_keras_object(config, safe_mode=True)
    assert type(restored) is MagnitudePruning
    assert restored.get_config() == callback.get_config()
    assert [restored.sparsity_at(step) for step in range(25)] == [
        callback.sparsity_at(step) for step in range(25)]


def _registered_in_sources():
    """The classes the package's sources decorate with `register_keras_serializable`."""
    names = []
    for folder, _, files in os.walk(PACKAGE):
        for file in files:
            if file.endswith(".py"):
                with open(os.path.join(folder, file), encoding="utf-8") as f:
                    names += REGISTERED.findall(f.read())
    return sorted(names)


def test_every_registered_object_has_a_case():
    registered = _registered_in_sources()
    assert "GradientReversal" in registered and len(registered) >= 21
    cases = sorted([*LAYERS, *COMPILED, "MagnitudePruning"])
    assert registered == cases
    # Registered under the package's name, so `.keras` files name it as Keras looks it up.
    custom = keras.saving.get_custom_objects()
    assert [name for name in registered if f"keras_mmtl>{name}" not in custom] == []
