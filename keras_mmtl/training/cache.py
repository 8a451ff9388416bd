"""Cached frozen-backbone features: compute each sample's backbone output once, train the top.

While a backbone is frozen (and nothing random touches its input), its output for a sample
never changes: a phase can train the layers above it on features computed once. The same
holds for the token ids of the from-scratch text encoder's tokenizer, and for the n-gram
counts of the n-gram encoder (sparse: computed at the start of each phase, in about a second
per 10,000 texts, and kept in memory, not in the cache folder). Phase 1 caches every
frozen branch; phase 2 still caches the ones it does not fine-tune (a frozen text encoder
while the image backbone is fine-tuned), and caches the frozen bottom of a partly
fine-tuned image backbone: the feature map below its unfrozen top blocks, so only those
blocks run each step. The bottom runs over the images once for both phases: phase 1's
features are phase 2's maps through the frozen top blocks. The top model shares its layers
with (a clone of) the classifier, so what it learns is the classifier's. A split merged from
others (a refit's train and val rows, `Records.merge_splits`) is read from their cached
features.
"""

import dataclasses
import hashlib
import io
import json
import re
import time
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_mmtl.data.pipeline import make_dataset
from keras_mmtl.files import is_file, join_path, read_bytes, write_bytes
from keras_mmtl.keras_internals import history, inbound_nodes, mark_sparse
from keras_mmtl.modalities import modality_kind
from keras_mmtl.models.backbones import BACKBONE_NAME, split_frozen_bottom
from keras_mmtl.models.builder import clone_classifier
from keras_mmtl.models.spec import describe, input_image_size
from keras_mmtl.models.text import NGRAM_LAYERS
from keras_mmtl.progress import Progress, expected_retracing, logger, predict_with_progress

# Per kind of modality: (layer whose output is cached, layer that must be frozen for it). Where
# none applies, a text input tokenized in the graph caches its token ids (`describe`'s tokenizers),
# and one read as bags of n-grams its n-gram counts (`NGRAM_LAYERS`).
CACHEABLE = {
    "image": [("image_backbone", "image_backbone")],
    "text": [("text_pooling", "text_backbone")],
}


# Bumped when the same inputs give other features: 2, large JPEGs are downscaled while decoding;
# 3, resized images are rounded to whole levels.
FEATURES_VERSION = 3
# Least time a worker waits for the other workers' shards of cached features, after its own.
SHARD_WAIT_SECONDS = 600


def branch_outputs(model, layer_name, modality):
    """The tensors a layer outputs inside `model`'s graph for one of its inputs.

    A layer shared by several inputs of a kind (a backbone for `image` and
    `image_2`) is called once per input: this is the call on `modality`'s.
    """
    for node in inbound_nodes(model.get_layer(layer_name)):
        if modality in _source_inputs(node.input_tensors):
            return node.output_tensors
    return []


def _source_inputs(tensors):
    """The names of the model inputs that symbolic `tensors` are computed from."""
    names, stack = set(), list(tensors)
    while stack:
        operation, node_index, _ = history(stack.pop())
        if isinstance(operation, keras.layers.InputLayer):
            names.add(operation.name)
        else:
            stack.extend(inbound_nodes(operation)[node_index].input_tensors)
    return names


def cacheable_outputs(model, exclude=()):
    """`{modality: layer names}` of the outputs that stay fixed while the model trains.

    A phase reads these branches from the cache and the other inputs raw;
    when every input is cached, the fitted top is tiny. A branch is the
    output of one layer (a frozen backbone, a tokenizer), or of several (the
    n-gram encoder's bags).

    Args:
        model: the classifier.
        exclude: kinds of modality never cached, such as those augmented in
            training (`"image"` excludes `"image_2"` too).
    """
    names = {layer.name for layer in model.layers}
    spec = describe(model)
    found = {}
    for modality in spec.modalities:
        if modality_kind(modality) in exclude:
            continue
        for output, frozen in CACHEABLE.get(modality_kind(modality), ()):
            if output in names and len(branch_outputs(model, output, modality)) == 1 and (
                    frozen in names and not model.get_layer(frozen).trainable):
                found[modality] = (output,)
                break
        else:
            if modality in spec.tokenizers:
                found[modality] = (spec.tokenizers[modality],)
            elif modality_kind(modality) == "text" and names.issuperset(NGRAM_LAYERS):
                found[modality] = NGRAM_LAYERS
    return found


def split_model(model, exclude=()):
    """Splits a copy of a classifier after its cacheable outputs (`cacheable_outputs`).

    The split works on a clone (same weights and trainable flags) so the
    classifier's own graph stays as built and saves cleanly; copy the clone's
    weights back with `model.set_weights(clone.get_weights())` after training
    the top.

    Args:
        model: the classifier.
        exclude: modalities left raw (see `cacheable_outputs`).

    Returns:
        `(extractors, top, clone)`: `extractors` maps each cached modality to
        a model from its raw input to `{"<modality>_features": ...}` (for
        the n-gram encoder's bags, `"<modality>_features_<i>"`); `top`
        maps those features plus the other raw inputs to the output, sharing
        the layers of `clone`. An image backbone whose top blocks train and
        whose bottom is frozen (phase 2) is cached below the trained blocks
        (`split_frozen_bottom`): its features are that feature map, and `top`
        runs the trained blocks.
    """
    clone = clone_classifier(model)
    branches = cacheable_outputs(clone, exclude)
    split = partial = None
    if BACKBONE_NAME not in branches.values() and "image" not in exclude and any(
            layer.name == BACKBONE_NAME for layer in clone.layers):
        split = split_frozen_bottom(clone.get_layer(BACKBONE_NAME))
    if split is not None:  # the image inputs read the feature map below the trained blocks
        partial = [m for m in describe(clone).modalities if modality_kind(m) == "image"]
        branches.update({m: (BACKBONE_NAME,) for m in partial})
    # Per modality, feature name -> tensor: "<modality>_features", or "_features_<i>" for several.
    features = {m: {f"{m}_features" + (f"_{i}" if len(layers) > 1 else ""):
                    branch_outputs(clone, layer, m)[0] for i, layer in enumerate(layers)}
                for m, layers in branches.items()}
    for m, layers in branches.items():
        for tensor, layer in zip(features[m].values(), layers):
            if _sparse(clone.get_layer(layer)):  # n-gram counts: the top takes them sparse
                mark_sparse(tensor)
    top_inputs = {name: t for named in features.values() for name, t in named.items()}
    top_inputs.update({m: t for m, t in clone.input.items() if m not in branches})
    with warnings.catch_warnings():  # feature keys differ from the tensors' own names
        warnings.simplefilter("ignore", UserWarning)
        if partial:
            bottom, trained_top = split
            features.update({m: {f"{m}_features": bottom(clone.input[m])} for m in partial})
        extractors = {m: keras.Model({m: clone.input[m]}, named, name=f"frozen_{m}_features")
                      for m, named in features.items()}
        top = keras.Model(top_inputs, clone.output, name="cached_top")
        if partial:  # the backbone's trained top blocks, then the rest of the classifier
            maps = {f"{m}_features" for m in partial}
            inputs = {name: keras.Input((bottom.output if name in maps else t).shape[1:],
                                        dtype=t.dtype, sparse=t.sparse, name=name)
                      for name, t in top_inputs.items()}
            top = keras.Model(inputs, top({name: trained_top(x) if name in maps else x
                                           for name, x in inputs.items()}), name="cached_top")
    return extractors, top, clone


def cache_key(extractor, records, split):
    """A digest of the frozen weights, their input spec and the split's samples."""
    digest = hashlib.sha256()
    digest.update(f"features {FEATURES_VERSION}:".encode())
    digest.update(canonical_config(extractor).encode())
    for weight in extractor.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    rows = records.subset(split)
    digest.update(f"{split}:{len(rows)}:{rows.input_digest(list(extractor.input))}".encode())
    return digest.hexdigest()[:24]


def canonical_config(model, trainable=True):
    """The model's config as JSON with layer names replaced by their order of appearance.

    Keras numbers automatic names per process (`input_layer_3`), so the same
    architecture built twice would otherwise get another key. With
    `trainable=False` the layers' trainable flags are left out (training
    changes them; the model stays the same).
    """
    config = model.get_config()
    if not trainable:
        config = _without(config, "trainable")
    text = json.dumps(config, sort_keys=True, default=str)
    names = []

    def collect(node):
        if isinstance(node, dict):
            if isinstance(node.get("name"), str) and node["name"] not in names:
                names.append(node["name"])
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(json.loads(text))
    index = {json.dumps(name): f'"#{i}"' for i, name in enumerate(names)}
    return re.sub(r'"(?:[^"\\]|\\.)*"', lambda m: index.get(m.group(0), m.group(0)), text)


def _without(node, key):
    """A JSON-like tree with every `key` entry left out."""
    if isinstance(node, dict):
        return {k: _without(v, key) for k, v in node.items() if k != key}
    if isinstance(node, list):
        return [_without(v, key) for v in node]
    return node


def compute_features(extractors, records, split, cache_dir=None, batch_size=64, shard=None):
    """The frozen features of one split, read from `cache_dir` when already computed.

    Each extractor's features are cached in their own file, keyed by
    `cache_key`, so phase 2 reuses what phase 1 computed for a branch that
    stays frozen. The folder may be on any TensorFlow filesystem (`gs://...`).
    N-gram counts are computed each call, whole, and not written: counting is
    about as fast as reading them back.

    With `shard=(index, count)` (one of `count` workers of a cluster), this
    process computes every `count`-th row from `index` only, writes them as
    `<split>-<key>.shard<index>of<count>.npz`, waits for the other workers'
    shards in the same folder and returns the whole split; worker 0 also
    writes the whole file, which later phases and runs read at once. The
    folder must be one that every worker sees (shared storage).

    Args:
        extractors: dict modality -> extractor, as `split_model` returns.
        records: the `Records`.
        split: `"train"`, `"val"` or `"test"`.
        cache_dir: folder of cached features, or `None` to compute without caching.
        batch_size: samples per batch while computing.
        shard: `(index, count)` of this worker, or `None` for one process.

    Returns:
        dict `"<modality>_features"` -> array, in the split's row order
        (n-gram counts: `"<modality>_features_<i>"` -> `tf.SparseTensor`).
    """
    features = {}
    for extractor in extractors.values():
        features.update(_features(extractor, records, split, cache_dir, batch_size, shard))
    return features


def cache_whole_from_bottom(model, fine_tuned, records, splits, cache_dir, batch_size=64):
    """Caches a frozen image backbone's output from the frozen bottom that phase 2 reads.

    Phase 1 reads the whole backbone's output and phase 2 the feature map
    below its fine-tuned blocks (`split_model`): computed apart, each runs
    the bottom over every image. This runs it once: it computes and caches
    phase 2's bottom features, then phase 1's by running the backbone's top
    blocks over them (`top(bottom(x)) == backbone(x)`), under the keys each
    phase looks up. Features already cached are kept.

    Args:
        model: the classifier, its image backbone frozen (before phase 1).
        fine_tuned: a function that unfreezes in place what phase 2 trains,
            applied to a copy of `model`.
        records: the `Records`.
        splits: the splits to cache, such as `("train", "val")`.
        cache_dir: the folder of cached features.
        batch_size: samples per batch while computing.

    Example:

    >>> cache_whole_from_bottom(model, lambda m: unfreeze_top_blocks(m, 3), records,
    ...                         ("train", "val"), "runs/x/cache")  # doctest: +SKIP
    """
    later = clone_classifier(model)
    fine_tuned(later)
    parts = (split_frozen_bottom(later.get_layer(BACKBONE_NAME))
             if any(layer.name == BACKBONE_NAME for layer in later.layers) else None)
    if parts is None:
        return
    now, _, _ = split_model(model)
    bottoms, _, _ = split_model(later)
    images = [m for m in now if modality_kind(m) == "image" and m in bottoms]
    for split_name in splits:
        for m in images:
            path = join_path(cache_dir, f"{_cache_name(now[m], records, split_name)}.npz")
            if is_file(path):
                continue
            maps = _features(bottoms[m], records, split_name, cache_dir, batch_size, None)
            maps = maps[f"{m}_features"]
            whole = parts[1].predict(maps, batch_size=batch_size, verbose=0)
            _save(path, {f"{m}_features": whole})


def _cache_name(extractor, records, split):
    """The file name (without `.npz`) of an extractor's cached features of one split."""
    return f"{split}-{cache_key(extractor, records, split)}"


def _features(extractor, records, split, cache_dir, batch_size, shard):
    if _sparse_outputs(extractor):  # n-gram counts: a second per 10,000 texts, kept in memory
        return _compute(extractor, records.subset(split), batch_size,
                        f"N-gram counts of the {split} split", predict=False)
    index, count = shard if cache_dir is not None and shard else (0, 1)
    key = None if cache_dir is None else _cache_name(extractor, records, split)
    path = key and join_path(cache_dir, f"{key}.npz")
    if path and is_file(path):
        return _load(path)
    rows, title = records.subset(split), f"Backbone features of the {split} split"
    assembled = path and _assembled(extractor, records, split, cache_dir)
    if assembled:
        features = assembled
    elif count == 1:
        features = _compute(extractor, rows, batch_size, title)
    else:  # this worker's shard, then everyone's
        shards = [join_path(cache_dir, f"{key}.shard{i}of{count}.npz") for i in range(count)]
        started = time.monotonic()
        if not is_file(shards[index]):
            mine = rows.select(np.arange(len(rows)) % count == index)
            _save(shards[index], _compute(extractor, mine, batch_size,
                                          f"{title}, shard {index + 1} of {count}", predict=False))
        waited = max(SHARD_WAIT_SECONDS, 4 * (time.monotonic() - started))
        parts = [_load(p) for p in _wait_for(shards, waited)]
        features = {}
        for name, first in parts[0].items():
            features[name] = np.empty((len(rows), *first.shape[1:]), first.dtype)
            for i, part in enumerate(parts):
                features[name][i::count] = part[name]
    if path and index == 0:
        _save(path, features)
    return features


def _assembled(extractor, records, split, cache_dir):
    """A merged split's features from the cached ones of the splits it is made of, or `None`.

    After `Records.merge_splits` (a refit's train and val rows), each former
    split's cached features give its rows' values (a merge moves whole
    splits); `None` where the split was not merged or a former split's
    features are not cached.
    """
    if records.former_splits is None:
        return None
    rows = records.splits == split
    origins = records.former_splits[rows]
    names = sorted(set(origins))
    if names == [split]:
        return None
    former = dataclasses.replace(records, splits=records.former_splits, former_splits=None)
    paths = {name: join_path(cache_dir, f"{_cache_name(extractor, former, name)}.npz")
             for name in names}
    if not all(is_file(path) for path in paths.values()):
        return None
    parts = {name: _load(path) for name, path in paths.items()}
    features = {key: np.empty((len(origins), *values.shape[1:]), values.dtype)
                for key, values in parts[names[0]].items()}
    for name, part in parts.items():
        for key, values in part.items():
            features[key][origins == name] = values
    logger.info(f"{int(rows.sum()):,} rows of the {split} split: the cached features of the "
                f"{' and '.join(names)} splits.")
    return features


def _compute(extractor, rows, batch_size, title, predict=True):
    """The extractor's outputs on rows, in order.

    `predict=False` runs the batches through the extractor in this process: under
    several workers, `predict` would split them between the workers.
    """
    if not len(rows):  # a worker's shard of a split smaller than the number of workers
        return {name: np.zeros((0, *output.shape[1:]), output.dtype)
                for name, output in extractor.output.items()}
    names = tuple(extractor.input)
    # With presence, a missing image comes black (its features are replaced in the model).
    ds = make_dataset(rows, None, image_size=input_image_size(extractor), modalities=names,
                      presence=names, batch_size=batch_size, shuffle=False)
    ds = ds.map(lambda x, y: {name: x[name] for name in names})
    if predict:
        return predict_with_progress(extractor, ds, title, len(rows), batch_size)
    call = tf.function(lambda x: extractor(x, training=False), reduce_retracing=True)
    batches, sparse = [], _sparse_outputs(extractor)
    with Progress(title, len(rows)) as progress, expected_retracing():
        for batch in ds:
            batches.append({name: value if name in sparse else value.numpy()
                            for name, value in call(batch).items()})
            progress.add(len(next(iter(batch.values()))))
    return {name: tf.sparse.concat(0, [b[name] for b in batches]) if name in sparse else
            np.concatenate([b[name] for b in batches]) for name in batches[0]}


def _sparse_outputs(extractor):
    """The names of an extractor's outputs that are sparse tensors (n-gram counts)."""
    return {name for name, output in extractor.output.items() if output.sparse}


def _sparse(layer):
    """Whether a layer outputs sparse tensors: the n-gram encoder's counting of a bag."""
    return isinstance(layer, keras.layers.TextVectorization) and layer.get_config()["sparse"]


def _wait_for(paths, seconds):
    """`paths` once they all exist; a clear error after `seconds`."""
    deadline, told = time.monotonic() + seconds, False
    while True:
        missing = [p for p in paths if not is_file(p)]
        if not missing:
            return paths
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"Waited {seconds:.0f} s for the other workers' cached features; still missing: "
                f"{missing}. Every worker must see the same run folder (shared storage such as "
                "gs://...), or turn the cache off (cache_features=False, --no-cache-features).")
        if not told:
            logger.info(f"Waiting for the other workers' features ({len(missing)} shards).")
            told = True
        time.sleep(0.5)


def _load(path):
    with np.load(io.BytesIO(read_bytes(path))) as stored:
        return dict(stored)


def _save(path, features):
    buffer = io.BytesIO()
    np.savez(buffer, **features)
    write_bytes(path, buffer.getvalue())
