"""SavedModel export with a serving signature on raw bytes and strings; prediction."""

import dataclasses
import functools
import os
import posixpath
import shutil
import tempfile
import time
import uuid

import keras
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

from keras_mmtl.checks import check_known
from keras_mmtl.data.images import MAX_MEGAPIXELS, decode_image, decode_optional_image
from keras_mmtl.files import is_remote, join_path, remove
from keras_mmtl.modalities import modality_kind, ordered
from keras_mmtl.models.builder import embedding_model
from keras_mmtl.models.missing import presence_input
from keras_mmtl.models.spec import describe
from keras_mmtl.models.text import register_text_ops
from keras_mmtl.op_audit import audit_ops

SIGNATURE = "serving_default"
EMBED_SIGNATURE = "embed"


def serving_function(model, top_k=5, max_megapixels=MAX_MEGAPIXELS):
    """The function a served model runs: raw request tensors -> predictions.

    It decodes JPEG/PNG bytes with the same `decode_image` as training, then
    calls the model, whose graph holds the backbone's preprocessing and the
    text tokenizer. For a model built with `missing_modalities=True`, empty
    image bytes or an empty (or blank) text mark that modality missing for
    the sample, as in training.

    Args:
        model: a classifier from `keras_mmtl.models`.
        top_k: number of best classes returned by name (at most the number
            of classes).
        max_megapixels: larger images fail the request, refused from their
            header before they are decoded (see `decode_image`).

    Returns:
        `(fn, input_signature)`: `fn` takes one batched tensor per modality
        (`image`, `image_2`, ...: encoded image files, `text`, `text_2`,
        ...: UTF-8 strings, all `tf.string`; `tabular`: float32 numeric
        features `(batch, k)`) and
        returns a dict: `probabilities` (batch, classes) float32, `label`
        (batch,) the predicted class name, `top_labels` and `top_scores`
        (batch, top_k) the best classes and their probabilities. A
        multi-task model returns these four for each task, named
        `<task>_probabilities`, `<task>_label`, ... (auxiliary heads are
        not served).
    """
    model_inputs, signature = request_inputs(model, max_megapixels)
    tasks = describe(model).tasks

    def serve(*inputs):
        predictions = model(model_inputs(*inputs), training=False)
        outputs = {}
        for task, names in tasks.items():
            probabilities = predictions if task is None else predictions[task]
            top = tf.math.top_k(probabilities, k=min(top_k, len(names)))
            names = tf.constant(names)
            outputs.update({output_name(task, key): value for key, value in {
                "probabilities": probabilities,
                "label": tf.gather(names, tf.argmax(probabilities, axis=-1)),
                "top_labels": tf.gather(names, top.indices),
                "top_scores": top.values}.items()})
        return outputs

    return serve, signature


def embedding_function(model, max_megapixels=MAX_MEGAPIXELS):
    """The `embed` signature's function: raw request tensors -> the fused embedding.

    It takes what `serving_function` takes and returns `{"embedding":
    float (batch, width)}`, the vector the classifier's heads read
    (`keras_mmtl.models.embedding_model`): for retrieval, deduplication or
    drift monitoring, next to the predictions of the same model.

    Returns:
        `(fn, input_signature)`, as `serving_function`.
    """
    model_inputs, signature = request_inputs(model, max_megapixels)
    embed = embedding_model(model)

    def embedding(*inputs):
        return {"embedding": tf.cast(embed(model_inputs(*inputs), training=False), tf.float32)}

    return embedding, signature


def request_inputs(model, max_megapixels=MAX_MEGAPIXELS, check=True):
    """What turns a request's raw tensors into a classifier's inputs, and their signature.

    Images are decoded with the same `decode_image` as training (an image
    over `max_megapixels` fails the request before it is decoded); for a
    model built with `missing_modalities=True`, empty image bytes or an
    empty (or blank) text mark that modality missing for the sample, and a
    missing image is decoded black.

    `check` refuses a request that cannot be answered (`check_request`);
    `keras_mmtl.explain` turns it off to feed its own ablations (empty texts
    standing for removed words or modalities).

    Returns:
        `(fn, input_signature)`: `fn(*tensors)` (one per modality, in
        `describe(model).modalities` order) gives the model's input dict.
    """
    spec = describe(model)
    modalities, optional, size = spec.modalities, spec.presence, spec.image_size
    signature = [tf.TensorSpec(model.input[name].shape, tf.float32, name=name)
                 if name == "tabular" else tf.TensorSpec([None], tf.string, name=name)
                 for name in modalities]

    def model_inputs(*inputs):
        features = dict(zip(modalities, inputs))
        if check:
            check_request(features, optional)
        for name in optional:
            raw, kind = features[name], modality_kind(name)
            if kind == "tabular":  # numbers are always there
                present = tf.ones(tf.shape(raw)[:1], tf.bool)
            else:
                present = tf.strings.length(tf.strings.strip(raw) if kind == "text" else raw) > 0
            features[presence_input(name)] = tf.cast(present, tf.float32)
        for name in (name for name in modalities if modality_kind(name) == "image"):
            decode = functools.partial(decode_optional_image if name in optional else decode_image,
                                       image_size=size, max_megapixels=max_megapixels)
            features[name] = tf.map_fn(
                decode, features[name], fn_output_signature=tf.TensorSpec((*size, 3), tf.float32))
        return features

    return model_inputs, signature


# The first bytes of the image formats `decode_image` reads (WebP: "RIFF", 4 bytes, "WEBP").
IMAGE_SIGNATURES = {"JPEG": b"\xff\xd8", "PNG": b"\x89PNG", "GIF": b"GIF8", "BMP": b"BM"}


def check_request(features, optional=()):
    """Fails a request that cannot be answered, naming its items (0-based), before any decode.

    A request with no sample, inputs of different lengths, an image input
    item that is not a JPEG/PNG/GIF/BMP/WebP file, or a text item that is
    not UTF-8 fails with an `InvalidArgumentError` saying which. Empty image
    bytes and empty or blank texts are refused too, except for the inputs in
    `optional` (a model built with `missing_modalities=True` reads them as
    missing), as training refuses them in a manifest.

    Example:

    >>> try:
    ...     check_request({"image": tf.constant([b"\\xff\\xd8..", b"<html>"]),
    ...                    "text": tf.constant(["wool cap", "cap"])})
    ... except tf.errors.InvalidArgumentError as error:
    ...     print("Input image: items that are not a JPEG/PNG/GIF/BMP/WebP" in error.message)
    True
    """
    names = list(features)
    counts = [tf.shape(features[name])[0] for name in names]
    tf.debugging.assert_positive(counts[0], message="The request has no samples: send one or more")
    for name, count in zip(names[1:], counts[1:]):
        tf.debugging.assert_equal(count, counts[0], message=(
            f"Inputs {names[0]} and {name} have different numbers of items: send one value "
            "per sample of every input"))
    for name in names:
        raw, kind = features[name], modality_kind(name)
        if kind == "image":
            head = tf.strings.substr(tf.strings.join([raw, b"\0" * 12]), 0, 12)
            start = [tf.strings.substr(head, 0, len(magic)) == magic
                     for magic in IMAGE_SIGNATURES.values()]
            webp = ((tf.strings.substr(head, 0, 4) == b"RIFF")
                    & (tf.strings.substr(head, 8, 4) == b"WEBP"))
            bad = ~tf.reduce_any(tf.stack([*start, webp]), axis=0)
            what = "not a JPEG/PNG/GIF/BMP/WebP image"
        elif kind == "text":
            clean = tf.strings.unicode_transcode(raw, "UTF-8", "UTF-8", errors="replace")
            bad = clean != raw
            what = "not UTF-8 text"
            if name not in optional:
                bad |= tf.strings.length(tf.strings.strip(raw)) == 0
                what = "empty or not UTF-8 text"
        else:
            continue
        if name in optional:
            bad &= tf.strings.length(raw) > 0  # empty: this sample's input is missing
        tf.debugging.Assert(~tf.reduce_any(bad), [
            f"Input {name}: items that are {what} (0-based):", tf.where(bad)[:, 0]],
            summarize=20)


def output_name(task, key):
    """The serving output `key` (`"probabilities"`, `"label"`, ...) of a task (`None`: the one)."""
    return key if task is None else f"{task}_{key}"


def export_saved_model(model, base_dir, version=None, custom_ops="warn",
                       max_megapixels=MAX_MEGAPIXELS, warmup_batch_sizes=(1, 8)):
    """Exports a classifier as the next version of a TF Serving model folder.

    Writes `base_dir/<version>/` (1, 2, ...: the layout TF Serving watches)
    with a `serving_default` signature that takes raw encoded images
    (`image`, batched `tf.string`) and raw UTF-8 texts (`text`) and returns
    `probabilities` and the predicted `label` name (`serving_function`),
    and an `embed` signature with the same inputs that returns the fused
    `embedding` (`embedding_function`). The version is written
    under a temporary name and renamed into place, so a crash never leaves a
    half-written version, and an existing version is never overwritten. On
    remote storage (`gs://...`, any TensorFlow filesystem), where a folder
    cannot be renamed whole, it is written locally and copied into place with
    `saved_model.pb` last, so a server that polls the folder loads it whole;
    a copy that fails midway is removed (one whose process is killed is
    left without `saved_model.pb`, and `latest_version` passes it over).

    The version carries warm-up requests (`write_warmup_requests`): TF
    Serving runs them when it loads the version, so the first clients do not
    pay for its lazy initialisation.

    Args:
        model: a classifier from `keras_mmtl.models`.
        base_dir: the model's folder, e.g. `"saved_models/products"`.
        version: version number; by default one above the highest present.
        custom_ops: what to do when the graph needs ops that stock TF
            Serving lacks (not core TensorFlow, see
            `keras_mmtl.op_audit.audit_ops`): `"error"` raises before the
            version lands, `"warn"` warns, `"ignore"`.
        max_megapixels: the largest image a request may send, in millions of
            pixels: a larger one fails the request from its header, before
            it is decoded, so one request cannot take the server's memory.
        warmup_batch_sizes: the batch sizes of the warm-up requests; with
            TF Serving's batching, its `allowed_batch_sizes`.

    Returns:
        path of the new version folder.

    Raises:
        OpAuditError: with `custom_ops="error"`, when the graph needs such ops.

    Example:

    >>> path = export_saved_model(model, "saved_models/products")  # doctest: +SKIP
    >>> # saved_model_cli show --dir saved_models/products/1 --all
    """
    remote = is_remote(base_dir)
    tf.io.gfile.makedirs(base_dir)
    if not remote:
        _remove_stale_staging(base_dir)
    if version is None:
        version = max(_versions(base_dir), default=0) + 1
    target = join_path(base_dir, str(int(version)))
    if tf.io.gfile.exists(target):
        raise FileExistsError(
            f"{target} exists; versions are never overwritten. Pass another version "
            "or leave version=None to take the next one."
        )
    archive = keras.export.ExportArchive()
    archive.track(model)
    for name, function in ((SIGNATURE, serving_function), (EMBED_SIGNATURE, embedding_function)):
        fn, signature = function(model, max_megapixels=max_megapixels)
        archive.add_endpoint(name, tf.function(fn), input_signature=signature)
    # Written beside the versions and renamed into place; for remote storage, where a
    # folder cannot be renamed whole, written locally and copied, saved_model.pb last.
    staging = (tempfile.mkdtemp(prefix=".tmp-export-") if remote
               else os.path.join(base_dir, f".tmp-{version}-{uuid.uuid4().hex}"))
    try:
        archive.write_out(staging, verbose=False)
        audit_ops(staging, custom_ops)
        name = (posixpath.basename(base_dir.rstrip("/")) if remote
                else os.path.basename(os.path.abspath(base_dir)))
        write_warmup_requests(model, staging, name, warmup_batch_sizes)
        if remote:
            try:
                _copy_tree(staging, target, last=SAVED_MODEL_FILE)
            except BaseException:  # no half-copied version for a server to trip over
                remove(target)
                raise
        else:
            os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# The file whose presence makes a folder a SavedModel (what TF Serving loads).
SAVED_MODEL_FILE = "saved_model.pb"


def _versions(path):
    """The version numbers of a TF Serving model folder, on any filesystem."""
    if not tf.io.gfile.isdir(path):
        return []
    names = [name.rstrip("/") for name in tf.io.gfile.listdir(path)]  # gs:// marks folders
    return [int(name) for name in names if name.isdigit()]


def _copy_tree(source, target, last):
    """Copies a local folder to any filesystem, the file `last` after all others.

    A reader that waits for `last` (TF Serving for `saved_model.pb`) never
    sees the folder half-copied.
    """
    files = []
    for folder, _, names in os.walk(source):
        relative = os.path.relpath(folder, source)
        tf.io.gfile.makedirs(target if relative == "." else join_path(target, relative))
        files += [os.path.normpath(os.path.join(relative, name)) for name in names]
    for name in sorted(files, key=lambda name: name == last):
        tf.io.gfile.copy(os.path.join(source, name),
                         join_path(target, name.replace(os.sep, "/")), overwrite=False)


# Where TF Serving looks for a version's warm-up requests (at most 1000 of them).
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")


def write_warmup_requests(model, export_dir, model_name, batch_sizes):
    """Writes the requests TF Serving runs when it loads a version, before serving it.

    TF Serving initialises much lazily (graph optimisation, kernels, memory
    pools per shape): without warm-up, the first requests to a new version
    take seconds. At load it runs the `PredictionLog` records of
    `<version>/assets.extra/tf_serving_warmup_requests` (a TFRecord file).
    This writes one `Predict` request per signature (`serving_default`,
    `embed`) and batch size, with every input the signatures take: a grey
    JPEG of the model's image size, a short text, zero tabular features.

    Args:
        model: the classifier being exported.
        export_dir: the SavedModel folder (the version being written).
        model_name: the name TF Serving serves it under (recorded in each
            request's `model_spec`; the warm-up ignores it).
        batch_sizes: one request per batch size and signature.

    Returns:
        path of the warm-up file.

    Example:

    >>> write_warmup_requests(model, "saved_models/products/1", "products", (1, 8))  # doctest: +SKIP
    'saved_models/products/1/assets.extra/tf_serving_warmup_requests'
    """
    sizes = [int(size) for size in batch_sizes]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"Give one or more batch sizes of at least 1. Received: {batch_sizes}")
    sample = {}  # one sample's value of each input
    spec = describe(model)
    for name in spec.modalities:
        kind = modality_kind(name)
        if kind == "image":
            grey = tf.fill((*spec.image_size, 3), tf.constant(128, tf.uint8))
            sample[name] = tf.io.encode_jpeg(grey).numpy()
        elif kind == "text":
            sample[name] = "warm-up request"
        else:
            sample[name] = [0.0] * model.input[name].shape[-1]
    path = os.path.join(export_dir, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for signature in (SIGNATURE, EMBED_SIGNATURE):
            for size in sizes:
                request = grpc_request(model_name, signature_name=signature,
                                       **{name: [value] * size for name, value in sample.items()})
                log = prediction_log_pb2.PredictionLog(
                    predict_log=prediction_log_pb2.PredictLog(request=request))
                writer.write(log.SerializeToString())
    return path


# A staging folder this old is what a killed export left (an export writes in minutes).
STALE_STAGING_SECONDS = 3600


def _remove_stale_staging(base_dir):
    """Removes the `.tmp-*` staging folders that killed exports left in `base_dir`.

    Younger ones may be another export's, still being written: they stay.
    """
    for name in os.listdir(base_dir):
        path = os.path.join(base_dir, name)
        if (name.startswith(".tmp-") and os.path.isdir(path)
                and time.time() - os.path.getmtime(path) > STALE_STAGING_SECONDS):
            shutil.rmtree(path, ignore_errors=True)


def latest_version(path):
    """The newest whole version folder of a TF Serving model folder (or `path` itself).

    A version without `saved_model.pb` (a remote copy that a killed process
    left midway: the file is copied last) is passed over.
    """
    if tf.io.gfile.exists(join_path(path, SAVED_MODEL_FILE)):
        return path
    versions = [version for version in _versions(path)
                if tf.io.gfile.exists(join_path(path, f"{version}/{SAVED_MODEL_FILE}"))]
    if not versions:
        raise FileNotFoundError(
            f"No SavedModel at {path}: expected saved_model.pb or numbered version folders "
            "holding one.")
    return join_path(path, str(max(versions)))


def predict(model, images=None, texts=None, top_k=5, tabular=None, **inputs):
    """Top classes for raw inputs, from a Keras classifier or an exported SavedModel.

    Both go through the same serving function, so they answer alike.

    Args:
        model: a classifier, or the path of an exported model (a version
            folder, or a TF Serving model folder whose newest version is used).
        images: list of encoded image files (bytes) or image file paths;
            `None` or empty for samples without one (models built with
            `missing_modalities=True`).
        texts: list of strings (empty: no text).
        tabular: numeric features `(n, k)`, for a model with a tabular input.
        top_k: classes returned per sample (an export returns at most 5).
        **inputs: more image or text columns by input name, e.g.
            `image_2=[...]`, `text_2=[...]`.

    Returns:
        one list of `(label, probability)` per sample, most probable first;
        for a multi-task model, a dict of task -> such lists.

    Example:

    >>> predict("saved_models/demo", images=["bag.jpg"], texts=["Urban wool cap"])  # doctest: +SKIP
    [[('red wool', 0.97), ('blue wool', 0.02), ...]]
    """
    runner = served(model, top_k)
    modalities = tuple(runner.inputs)
    given = {name: None for name in modalities}
    given.update({"image": images, "text": texts, "tabular": tabular}, **inputs)
    check_known(given, {*modalities, "image", "text", "tabular"}, lambda unknown: (
        f"This model has no inputs {unknown}; it takes {list(modalities)}."))
    # A modality not given is missing for every sample: models built with
    # missing_modalities=True take that (an export cannot tell, and is sent empties).
    missing = [name for name in modalities if given[name] is None and name not in runner.optional]
    count = max((len(values) for values in given.values() if values is not None), default=0)
    if missing or not count:
        raise ValueError(f"This model needs inputs {list(modalities)}; missing: "
                         f"{missing or list(modalities)}.")
    given = {name: [None] * count if values is None else values for name, values in given.items()}
    outputs = runner.run({name: tf.constant(np.asarray(given[name], np.float32))
                          if name == "tabular" else tf.constant(encoded_inputs(given[name], name))
                          for name in modalities})
    answers = {}
    for task in runner.tasks:
        labels = outputs[output_name(task, "top_labels")].numpy()[:, :top_k]
        scores = outputs[output_name(task, "top_scores")].numpy()[:, :top_k]
        answers[task] = [[(label.decode("utf-8"), float(score))
                          for label, score in zip(row_l, row_s)]
                         for row_l, row_s in zip(labels, scores)]
    return answers[None] if runner.tasks == [None] else answers


@dataclasses.dataclass
class Served:
    """A classifier or an export, called as a model server calls it (see `served`)."""

    run: object  # {input name: batched tensor} -> the serving signature's outputs
    inputs: dict  # input name -> tf.TensorSpec, in model order
    tasks: list  # [None] for a one-task model
    top: dict  # task -> classes returned at most
    optional: tuple  # inputs a sample may leave empty (a missing modality)


def served(model, top_k=5):
    """A classifier, a `.keras` file or an exported model folder, answering batches of requests.

    An export's `serving_default` signature is loaded once (the newest
    version of a TF Serving model folder); a Keras model's `serving_function`
    is traced once, so both run as a graph (and fail a bad request with the
    same message). `predict` and `keras_mmtl.predict_manifest` call models
    through this.

    Returns:
        `Served`: `run({input name: tensor})` gives the serving outputs.
    """
    if isinstance(model, (str, os.PathLike)) and os.fspath(model).endswith(".keras"):
        model = keras.models.load_model(os.fspath(model))
    if isinstance(model, (str, os.PathLike)):
        register_text_ops()  # a graph with tensorflow-text ops loads once they are registered
        signature = tf.saved_model.load(latest_version(os.fspath(model))).signatures[SIGNATURE]
        specs = signature.structured_input_signature[1]
        outputs = signature.structured_outputs
        tasks = [None] if "top_labels" in outputs else sorted(
            name.removesuffix("_top_labels") for name in outputs
            if name.endswith("_top_labels"))  # a signature does not keep the model's order
        return Served(
            run=lambda tensors: signature(**tensors),
            inputs={name: specs[name] for name in ordered(specs)},
            tasks=tasks,
            top={task: min(top_k, outputs[output_name(task, "top_labels")].shape[-1])
                 for task in tasks},
            optional=tuple(specs))  # the export decides: a needed image that is empty fails
    serve, signature = serving_function(model, top_k)
    serve = tf.function(serve, input_signature=signature)
    spec = describe(model)
    return Served(run=lambda tensors: serve(*(tensors[name] for name in spec.modalities)),
                  inputs={tensor.name: tensor for tensor in signature},
                  tasks=list(spec.tasks),
                  top={task: min(top_k, len(labels)) for task, labels in spec.tasks.items()},
                  optional=spec.presence)


def request_columns(images=None, texts=None, tabular=None, **inputs):
    """A request's inputs as TF Serving clients send them: one value per sample, by input name.

    Images become encoded file bytes (paths are read from disk), texts str,
    tabular rows lists of float; `None` or empty is a sample without an
    image or a text. Inputs left `None` are not sent.

    Args:
        images, texts, tabular: one value per sample, or `None`.
        **inputs: more image or text columns by input name (`image_2=`,
            `text_2=`, ...).

    Returns:
        a dict of input name -> list, in the order given.

    Raises:
        ValueError: no input, or inputs of different lengths.

    Example:

    >>> request_columns(images=[b"\\xff\\xd8", None], texts=["red wool cap", None])
    {'image': [b'\\xff\\xd8', b''], 'text': ['red wool cap', '']}
    """
    given = {"image": images, "text": texts, "tabular": tabular, **inputs}
    columns = {name: list(values) for name, values in given.items() if values is not None}
    if not columns:
        raise ValueError("Give images, texts or tabular features: the request has no input.")
    counts = {name: len(values) for name, values in columns.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"Give one value per sample of every input. Received: {counts}")
    return {name: [[float(x) for x in row] for row in values] if name == "tabular"
            else encoded_inputs(values, name) for name, values in columns.items()}


def grpc_request(model_name, images=None, texts=None, tabular=None, version=None,
                 signature_name=SIGNATURE, **inputs):
    """A `tensorflow.serving.PredictRequest` for TF Serving's gRPC API (and its warm-up file).

    Args:
        model_name: the served model's name.
        images, texts, tabular, **inputs: the samples, as for `request_columns`.
        version: a version number, or `None` for the newest.
        signature_name: the signature to run.

    Returns:
        the request: `model_spec` (name, version, signature) and one
        `TensorProto` per input (`tf.string` images and texts, `tf.float32`
        tabular `(n, k)`).

    Example:

    >>> request = grpc_request("demo", images=[b"\\xff\\xd8"], texts=["red wool cap"], version=2)
    >>> request.model_spec.name, request.model_spec.version.value, sorted(request.inputs)
    ('demo', 2, ['image', 'text'])
    >>> tf.make_ndarray(request.inputs["text"])
    array([b'red wool cap'], dtype=object)
    """
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    if version is not None:
        request.model_spec.version.value = int(version)
    for name, values in request_columns(images, texts, tabular, **inputs).items():
        dtype = tf.float32 if name == "tabular" else tf.string
        request.inputs[name].CopyFrom(tf.make_tensor_proto(values, dtype))
    return request


def encoded_inputs(values, name):
    """What a request sends for an input: texts as str, images as encoded file bytes.

    Image paths are read from disk; `None` or empty is a sample without
    one (empty bytes, or an empty text).
    """
    if modality_kind(name) == "text":
        return ["" if v is None else str(v) for v in values]
    out = []
    for value in values:
        if not value:  # no image for this sample
            out.append(b"")
        elif isinstance(value, bytes):
            out.append(value)
        else:
            with open(value, "rb") as f:
                out.append(f.read())
    return out
