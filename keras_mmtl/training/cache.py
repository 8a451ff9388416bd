"""Cached frozen-backbone features: compute each sample's backbone output once, train the top.

While a backbone is frozen (and nothing random touches its input), its output for a sample
never changes: phase 1 can train the layers above it on features computed once. The same
holds for the token ids of the from-scratch text encoder's tokenizer. The top model shares
its layers with (a clone of) the classifier, so what it learns is the classifier's.
"""

import hashlib
import json
import os
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_mmtl.data.pipeline import make_dataset
from keras_mmtl.models.builder import image_size

# Per modality, in order of preference: (layer whose output is cached, layer that must be
# frozen for it, or None when the output never changes in training).
CACHEABLE = {
    "image": [("image_backbone", "image_backbone")],
    "text": [("text_pooling", "text_backbone"), ("text_tokenizer", None)],
}


def _call_output(model, layer_name):
    """The tensor a layer outputs inside `model`'s graph (not inside its own)."""
    layer = model.get_layer(layer_name)
    return layer._inbound_nodes[0].output_tensors[0]


def cacheable_outputs(model):
    """`{modality: layer name}` of the outputs that stay fixed while phase 1 trains.

    Phase 1 runs on cached outputs when every input of the model has one.
    """
    names = {layer.name for layer in model.layers}
    found = {}
    for modality, choices in CACHEABLE.items():
        for output, frozen in choices:
            if output in names and (frozen is None or (
                    frozen in names and not model.get_layer(frozen).trainable)):
                found[modality] = output
                break
    return found


def split_model(model):
    """Splits a copy of a classifier after its cacheable outputs (`cacheable_outputs`).

    The split works on a clone (same weights) so the classifier's own graph
    stays as built and saves cleanly; copy the clone's weights back with
    `model.set_weights(clone.get_weights())` after training the top.

    Returns:
        `(extractor, top, clone)`: `extractor` maps the raw inputs of the
        cached branches to `{"<modality>_features": ...}`; `top` maps those
        features plus the other raw inputs to the output, sharing the layers
        of `clone`.
    """
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    branches = cacheable_outputs(clone)
    features = {f"{m}_features": _call_output(clone, layer) for m, layer in branches.items()}
    top_inputs = {**features, **{m: t for m, t in clone.input.items() if m not in branches}}
    with warnings.catch_warnings():  # feature keys differ from the tensors' own names
        warnings.simplefilter("ignore", UserWarning)
        extractor = keras.Model({m: clone.input[m] for m in branches}, features,
                                name="frozen_features")
        top = keras.Model(top_inputs, clone.output, name="cached_top")
    return extractor, top, clone


def cache_key(extractor, records, split):
    """A digest of the frozen weights, their input spec and the split's samples."""
    digest = hashlib.sha256()
    digest.update(json.dumps(extractor.get_config(), sort_keys=True, default=str).encode())
    for weight in extractor.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    rows = records.subset(split)
    digest.update(f"{split}:{len(rows)}:{rows.image_kind}".encode())
    names = extractor.input.keys()
    if "image" in names and rows.image_kind == "array":
        digest.update(np.ascontiguousarray(rows.images).tobytes())
    elif "image" in names and rows.image_kind == "path":
        for path in rows.images:  # a replaced file changes size or modification time
            stat = os.stat(path)
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    elif "image" in names:
        for data in rows.images:
            digest.update(hashlib.sha256(data).digest())
    if "text" in names:
        for text in rows.texts:
            digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()[:24]


def compute_features(extractor, records, split, cache_dir=None, batch_size=64):
    """The frozen features of one split, read from `cache_dir` when already computed.

    Returns:
        dict `"<modality>_features"` -> float array, in the split's row order.
    """
    path = None
    if cache_dir is not None:
        path = os.path.join(cache_dir, f"{split}-{cache_key(extractor, records, split)}.npz")
        if os.path.exists(path):
            with np.load(path) as stored:
                return dict(stored)
    ds = make_dataset(records, split, image_size=image_size(extractor),
                      modalities=tuple(extractor.input), batch_size=batch_size, shuffle=False)
    features = extractor.predict(ds.map(lambda x, y: x), verbose=0)
    if path is not None:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.tmp.npz"
        np.savez(tmp, **features)
        os.replace(tmp, path)
    return features


def cached_dataset(features, records, split, batch_size=32, seed=0):
    """Batches of `(cached features, label)` for a top model whose inputs are all cached."""
    rows = records.subset(split)
    ds = tf.data.Dataset.from_tensor_slices((dict(features), rows.labels.astype(np.int32)))
    if split == "train":
        ds = ds.shuffle(len(rows), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
