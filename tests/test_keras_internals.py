"""The private Keras internals the library uses: still there, still meaning what we read them as.

A Keras upgrade that removes or changes one fails here, naming it, before any run does.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_mmtl import keras_internals
from keras_mmtl.keras_internals import (
    adam_moments,
    all_layers,
    build_from_spec,
    distribute_strategy,
    history,
    inbound_nodes,
    mark_sparse,
    missing_internals,
)


def test_every_internal_is_there():
    assert missing_internals() == [], (
        f"Keras {keras.__version__} lacks private internals keras_mmtl uses: see "
        "keras_mmtl/keras_internals.py for what each is for and replace it")


def test_a_missing_internal_is_named(monkeypatch):
    monkeypatch.setitem(keras_internals.INTERNALS, "built Adam", ("_momentums", "_moments_v9"))
    assert missing_internals() == ["built Adam._moments_v9"]


def test_nodes_and_history_walk_a_shared_layer():
    shared = keras.layers.Dense(2, name="shared")
    first, second = keras.Input((3,), name="first"), keras.Input((3,), name="second")
    outputs = [shared(first), shared(second)]
    keras.Model([first, second], outputs)
    nodes = inbound_nodes(shared)
    assert [node.input_tensors[0] for node in nodes] == [first, second]
    assert [node.output_tensors[0] for node in nodes] == outputs
    operation, node_index, tensor_index = history(outputs[1])
    assert (operation, node_index, tensor_index) == (shared, 1, 0)
    assert history(first).operation.name == "first"


def test_a_model_keeps_what_a_tensor_marked_sparse_is_given_sparse():
    texts = keras.Input((), dtype="string")
    counts = keras.layers.TextVectorization(output_mode="count", sparse=True,
                                            vocabulary=["red", "blue"])(texts)
    assert not counts.sparse  # what TextVectorization leaves
    mark_sparse(counts)
    model = keras.Model(counts, keras.layers.Dense(1, kernel_initializer="ones")(counts))
    given = tf.sparse.from_dense(tf.constant([[0.0, 1.0, 2.0]]))
    assert counts.sparse and isinstance(model._convert_inputs_to_tensors([given])[0],
                                        tf.SparseTensor)


def test_all_layers_are_nested_parents_first():
    dense = keras.layers.Dense(1, name="dense")
    inner = keras.Sequential([keras.Input((2,)), dense], name="inner")
    inputs = keras.Input((2,))
    outer = keras.Model(inputs, inner(inputs), name="outer")
    names = [layer.name for layer in all_layers(outer)]
    assert names.index("outer") < names.index("inner") < names.index("dense")


def test_adam_moments_are_the_first_and_second_moments():
    variable = keras.Variable(np.zeros((2,), "float32"))
    adam = keras.optimizers.Adam(beta_1=0.9, beta_2=0.99)
    adam.apply([tf.constant([1.0, -2.0])], [variable])
    m, v = adam_moments(adam, 0)
    np.testing.assert_allclose(m.numpy(), [0.1, -0.2], rtol=1e-6)
    np.testing.assert_allclose(v.numpy(), [0.01, 0.04], rtol=1e-5)


@pytest.mark.parametrize("in_scope", [False, True])
def test_the_strategy_of_a_model(in_scope):
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")

    def make():
        inputs = keras.Input((1,))
        return keras.Model(inputs, keras.layers.Dense(1)(inputs))

    if in_scope:
        with strategy.scope():
            model = make()
    else:
        model = make()
    assert distribute_strategy(model) is (strategy if in_scope else None)


def test_a_model_built_from_a_spec_fits_without_building_again():
    # Keras builds again in `fit` only under a strategy, from an averaged batch.
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        inputs = {"x": keras.Input((2,), name="x"),
                  "word": keras.Input((), dtype="string", name="word")}
        index = keras.layers.StringLookup(vocabulary=["a", "b"], output_mode="one_hot")(
            inputs["word"])
        model = keras.Model(inputs, keras.layers.Dense(1)(
            keras.layers.Concatenate()([inputs["x"], index])))
        model.compile("sgd", "mse")
    data = tf.data.Dataset.from_tensor_slices(
        ({"x": np.ones((4, 2), "float32"), "word": ["a", "b", "a", "b"]},
         np.ones((4, 1), "float32"))).batch(2)
    with distribute_strategy(model).scope():
        build_from_spec(model, data.element_spec)
    assert model.built and model.optimizer.built
    calls = []
    model._symbolic_build = lambda *args, **kwargs: calls.append(kwargs)  # would build again
    model.fit(data, epochs=1, verbose=0)
    assert calls == []
