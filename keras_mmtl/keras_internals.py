"""Every private Keras internal the library relies on, in one place.

Keras 3 has no public API for a few things the library needs: walking a
functional graph's nodes (to cut a model at a cached layer), marking a
symbolic tensor sparse (where a cut passes n-gram counts), every nested
layer of a model, building a model from a dataset's element spec under
`tf.distribute`, Adam's moment slots (for a fused and a lazy update), and
the hooks of `BackupAndRestore` (to write its files atomically). Each is
reached through a function here, or, for the methods our subclasses
override, named in `INTERNALS`. `missing_internals()` lists whatever a
Keras upgrade removed; `tests/test_keras_internals.py` checks that it
lists nothing and that each function still does what callers expect, so an
upgrade that breaks one fails there, by name, rather than deep in a run.

Checked with Keras 3.15.
"""

import tempfile

import keras

# What is used, on what kind of object: methods and attributes read here, or overridden or
# read by the library's subclasses (`LayerwiseAdam`, `AtomicBackupAndRestore`).
INTERNALS = {
    "functional model": ("_flatten_layers", "_symbolic_build", "_maybe_symbolic_build",
                         "_distribute_strategy"),
    "layer called in a model": ("_inbound_nodes",),
    "symbolic tensor": ("_keras_history", "_sparse"),
    "built Adam": ("_backend_update_step", "_get_variable_index", "_momentums", "_velocities"),
    "BackupAndRestore": ("_save_model", "_weights_path", "_training_metadata_path",
                         "_current_epoch", "_last_batch_seen"),
}


def _samples(folder):
    """A small object of each kind in `INTERNALS`."""
    inputs = keras.Input((1,))
    layer = keras.layers.Dense(1)
    model = keras.Model(inputs, layer(inputs))
    adam = keras.optimizers.Adam()
    adam.build(model.trainable_variables)
    return {"functional model": model, "layer called in a model": layer,
            "symbolic tensor": inputs, "built Adam": adam,
            "BackupAndRestore": keras.callbacks.BackupAndRestore(folder)}


def missing_internals():
    """`"kind.name"` of each private internal this Keras lacks (empty when all are there).

    Example:

    >>> missing_internals()
    []
    """
    with tempfile.TemporaryDirectory() as folder:
        samples = _samples(folder)
        return [f"{kind}.{name}" for kind, names in INTERNALS.items() for name in names
                if not hasattr(samples[kind], name)]


def inbound_nodes(operation):
    """The nodes at which `operation` (a layer or op) was called in functional graphs."""
    return operation._inbound_nodes


def history(tensor):
    """`(operation, node_index, tensor_index)`: where a symbolic tensor was made."""
    return tensor._keras_history


def mark_sparse(tensor):
    """Marks a symbolic tensor sparse, where the layer that made it outputs sparse tensors.

    `TextVectorization(sparse=True)` outputs `tf.SparseTensor`s but leaves its
    symbolic output dense; a model whose input is that tensor would convert
    what it is given to dense. `KerasTensor.sparse` has no public setter.
    """
    tensor._sparse = True


def all_layers(model):
    """The model and every layer nested in it, parents before children.

    Example:

    >>> inner = keras.Sequential([keras.layers.Dense(2, name="dense")], name="inner")
    >>> [layer.name for layer in all_layers(keras.Sequential([inner], name="outer"))]
    ['outer', 'inner', 'dense']
    """
    return list(model._flatten_layers())


def adam_moments(optimizer, index):
    """Adam's first and second moment variables of the variable at `index`."""
    return optimizer._momentums[index], optimizer._velocities[index]


def distribute_strategy(model):
    """The `tf.distribute` strategy whose scope the model was made in, or `None`."""
    return model._distribute_strategy


def build_from_spec(model, element_spec):
    """Builds a compiled model from a dataset's element spec, so `fit` does not rebuild it.

    Keras 3's `fit` builds the model from a first batch that, under
    `tf.distribute`, it averages over replicas; that fails for batches of
    several inputs or of strings (keras-team/keras#20585). Building here
    first, in the strategy's scope, and making `fit`'s build a no-op avoids it.
    """
    model._symbolic_build(data_batch=element_spec)
    model._maybe_symbolic_build = _already_built


def _already_built(*args, **kwargs):
    """`_maybe_symbolic_build` of a model `build_from_spec` built: nothing left to do."""
