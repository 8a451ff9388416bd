"""Which ops an exported SavedModel needs beyond core TensorFlow (what stock TF Serving runs).

Stock TensorFlow Serving (the `tensorflow/serving` image) registers the ops of core
TensorFlow. A graph that uses another library's ops, such as tensorflow-text's tokenizers,
fails to load there with "Op type not registered", unless the server was built with that
library. `audit_ops` lists such ops after an export, so this is found before deployment.
"""

import os
import warnings

import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

CHOICES = ("error", "warn", "ignore")


class OpAuditError(ValueError):
    """An export needs ops that stock TF Serving does not have, and the user asked for none."""


def saved_model_ops(path):
    """The op types a SavedModel's graphs run, function bodies included, sorted.

    Example:

    >>> saved_model_ops("saved_models/demo/1")[:3]  # doctest: +SKIP
    ['AddV2', 'Cast', 'ConcatV2']
    """
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    ops, functions = set(), set()
    for graph in (meta.graph_def for meta in proto.meta_graphs):
        ops.update(node.op for node in graph.node)
        for function in graph.library.function:
            functions.add(function.signature.name)
            ops.update(node.op for node in function.node_def)
    return sorted(ops - functions)  # a call of a graph function names the function


def custom_ops(path):
    """The ops a SavedModel needs that are not core TensorFlow ops (not in `tf.raw_ops`).

    Example:

    >>> custom_ops("saved_models/demo/1")  # doctest: +SKIP
    []
    """
    core = set(dir(tf.raw_ops))
    return [op for op in saved_model_ops(path) if op not in core]


def audit_ops(path, on_custom="warn"):
    """Checks that a SavedModel runs on stock TF Serving; warns or fails if it does not.

    Args:
        path: a SavedModel folder (a version folder).
        on_custom: what to do when it needs ops beyond core TensorFlow:
            `"error"` raises `OpAuditError`, `"warn"` warns, `"ignore"` returns.

    Returns:
        the sorted list of such ops (empty: stock TF Serving loads it).

    Raises:
        OpAuditError: with `on_custom="error"`, when there are such ops.
    """
    if on_custom not in CHOICES:
        raise ValueError(f"on_custom must be one of {CHOICES}. Received: on_custom={on_custom!r}")
    found = custom_ops(path)
    if found and on_custom != "ignore":
        message = (
            f"The exported model needs ops that core TensorFlow (and stock TF Serving) does not "
            f"have: {', '.join(found)}. Serve it with a model server built with them (e.g. the "
            "tensorflow-text ops), or build the model with core ops only: "
            "text_tokenizer='core' (the default) for the scratch text encoder; pretrained "
            "keras-hub encoders tokenize with tensorflow-text.")
        if on_custom == "error":
            raise OpAuditError(message)
        warnings.warn(message, stacklevel=3)
    return found
