"""Prepared data: checked rows as sharded TFRecord files of resized uint8 images.

`prepare` decodes and resizes every image once, in parallel, and writes each split's
rows round-robin to `shards` TFRecord files beside a `prepared.json` that describes
them; `prepared_dataset` reads them back in the batches `make_dataset` gives, with the
files interleaved and a bounded shuffle buffer, so no epoch decodes a JPEG and memory
does not grow with the number of rows. The folder may be on any TensorFlow filesystem
(`gs://...`).
"""

import json

import tensorflow as tf

from keras_mmtl.data.pipeline import make_dataset
from keras_mmtl.files import is_file, join_path, read_bytes, write_json
from keras_mmtl.modalities import modality_kind
from keras_mmtl.progress import Progress

PREPARED_FILE = "prepared.json"
SPLITS = ("train", "val", "test")
# Rows that `prepared_dataset` shuffles among, by default: about 370 MB of 128x96 images.
SHUFFLE_BUFFER = 10_000


def prepare(records, folder, image_size, shards=8, batch_size=256):
    """Writes records as TFRecord shards of resized uint8 images, texts and labels.

    Each split gets `shards` files (`<split>-00000-of-00008.tfrecord`, ...),
    rows dealt round-robin; `prepared.json` records the image size, the inputs,
    the tasks with their class names and each split's rows and files. Images
    are decoded by `make_dataset` (the pixel budget, downscale-on-decode and
    rounding of training and serving alike). A row without an image (records
    read with `allow_missing`) is kept black with its presence 0.

    Args:
        records: `Records` from `read_manifest`, `from_arrays`, ...
        folder: where the files go (created; any TensorFlow filesystem).
        image_size: `(height, width)` of the model that will read them.
        shards: files per split; several let readers interleave them.
        batch_size: rows decoded together while writing.

    Returns:
        the description written to `prepared.json`, as a dict.

    Example:

    >>> import tempfile
    >>> import numpy as np
    >>> from keras_mmtl.data import from_arrays
    >>> records = from_arrays(["a", "b"] * 4, images=np.zeros((8, 5, 5, 3), "uint8"),
    ...                       texts=["x y"] * 8, splits=["train"] * 8)
    >>> info = prepare(records, tempfile.mkdtemp(), (4, 4), shards=2)
    >>> info["splits"]["train"]["rows"], len(info["splits"]["train"]["files"])
    (8, 2)
    """
    if shards < 1:
        raise ValueError(f"shards must be 1 or more. Received: shards={shards}")
    image_size = tuple(int(side) for side in image_size)
    modalities = tuple(records.modalities)
    images = [name for name in modalities if modality_kind(name) == "image"]
    tasks = records.tasks
    tf.io.gfile.makedirs(folder)
    splits = {}
    for split in (split for split in SPLITS if (records.splits == split).any()):
        rows = records.subset(split)
        files = [f"{split}-{i:05d}-of-{shards:05d}.tfrecord" for i in range(shards)]
        data = make_dataset(rows, image_size=image_size, modalities=modalities,
                            presence=images, tasks={task: task for task in tasks},
                            batch_size=batch_size, shuffle=False)
        writers = [tf.io.TFRecordWriter(join_path(folder, name)) for name in files]
        written = 0
        with Progress(f"Preparing the {split} split", len(rows)) as progress:
            for inputs, labels, *_ in data:  # (weights, where rows lack a label: kept as -1)
                for example in _examples(inputs, labels, modalities, images):
                    writers[written % shards].write(example)
                    written += 1
                progress.add(len(next(iter(labels.values()))))
        for writer in writers:
            writer.close()
        splits[split] = {"rows": written, "files": files}
    info = {"image_size": list(image_size), "modalities": list(modalities),
            "tasks": tasks, "label_name": records.label_name,
            "tabular_columns": list(records.tabular_columns), "splits": splits}
    write_json(join_path(folder, PREPARED_FILE), info)  # last: the folder is complete
    return info


def _examples(inputs, labels, modalities, images):
    """Serialized `tf.train.Example`s of one batch of `make_dataset`."""
    columns = {}
    for name in modalities:
        values = inputs[name].numpy()
        if modality_kind(name) == "tabular":
            columns[name] = [_floats(row) for row in values]
        else:
            columns[name] = [_bytes(value.tobytes() if name in images else value)
                             for value in values]
    for name in images:
        columns[f"{name}_present"] = [_floats([v]) for v in inputs[f"{name}_present"].numpy()]
    for task, values in labels.items():
        columns[_label_key(task)] = [_ints([v]) for v in values.numpy()]
    for row in zip(*columns.values()):
        features = tf.train.Features(feature=dict(zip(columns, row)))
        yield tf.train.Example(features=features).SerializeToString()


def _bytes(value):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _floats(values):
    return tf.train.Feature(float_list=tf.train.FloatList(value=list(values)))


def _ints(values):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))


def _label_key(task):
    return f"label/{task}"


def read_prepared(folder):
    """The description `prepare` wrote in `folder` (`prepared.json`), checked to be whole."""
    path = join_path(folder, PREPARED_FILE)
    if not is_file(path):
        raise FileNotFoundError(
            f"No prepared data in {folder}: {PREPARED_FILE} is missing (prepare writes it last, "
            "so an interrupted prepare leaves none). Run keras-mmtl prepare (mm.prepare) again.")
    info = json.loads(read_bytes(path).decode("utf-8"))
    missing = [name for split in info["splits"].values() for name in split["files"]
               if not is_file(join_path(folder, name))]
    if missing:
        raise FileNotFoundError(f"Prepared data in {folder} lacks files {missing}; run "
                                "keras-mmtl prepare (mm.prepare) again.")
    return info


def prepared_dataset(folder, split, *, batch_size=32, shuffle=None, seed=0, modalities=None,
                     presence=(), tasks=None, shuffle_buffer=SHUFFLE_BUFFER):
    """The batches of `make_dataset`, read from files `prepare` wrote.

    The split's files are interleaved (shuffled first when `shuffle`), rows
    are shuffled in a buffer of `shuffle_buffer`, and each batch is parsed at
    once: images come as uint8, at the size they were prepared at. Unshuffled,
    rows come in their order in the records.

    Args:
        folder: what `prepare` wrote.
        split: `"train"`, `"val"` or `"test"`.
        batch_size, shuffle, seed, modalities, presence, tasks: as `make_dataset`.
        shuffle_buffer: rows shuffled among; memory holds this many rows.

    Returns:
        a batched, prefetched `tf.data.Dataset` of `(inputs, labels)`.
    """
    info = read_prepared(folder)
    if split not in info["splits"]:
        raise ValueError(f"Prepared data in {folder} has no {split!r} split; it has "
                         f"{list(info['splits'])}.")
    modalities = tuple(info["modalities"] if modalities is None else modalities)
    unknown = set(modalities) - set(info["modalities"])
    if unknown:
        raise ValueError(f"The model needs inputs {sorted(unknown)} that the prepared data does "
                         f"not have. Data has: {info['modalities']}")
    height, width = info["image_size"]
    spec = {}
    for name in modalities:
        kind = modality_kind(name)
        spec[name] = (tf.io.FixedLenFeature([len(info["tabular_columns"])], tf.float32)
                      if kind == "tabular" else tf.io.FixedLenFeature([], tf.string))
    for name in presence:
        spec[f"{name}_present"] = tf.io.FixedLenFeature([1], tf.float32)
    outputs = {info["label_name"]: info["label_name"]} if tasks is None else dict(tasks)
    for task in outputs.values():
        spec[_label_key(task)] = tf.io.FixedLenFeature([1], tf.int64)

    def parse(serialized):
        row = tf.io.parse_example(serialized, spec)
        inputs = {}
        for name in modalities:
            inputs[name] = row[name]
            if modality_kind(name) == "image":
                pixels = tf.io.decode_raw(row[name], tf.uint8)
                inputs[name] = tf.reshape(pixels, (-1, height, width, 3))
        for name in presence:
            inputs[f"{name}_present"] = row[f"{name}_present"][:, 0]
        labels = {output: tf.cast(row[_label_key(task)][:, 0], tf.int32)
                  for output, task in outputs.items()}
        return inputs, labels if tasks is not None else labels[info["label_name"]]

    shuffle = split == "train" if shuffle is None else shuffle
    files = [join_path(folder, name) for name in info["splits"][split]["files"]]
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=len(files),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=not shuffle)
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)

