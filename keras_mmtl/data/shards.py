"""The TFRecord shards `keras_mmtl.prepare` writes, and reading their images into batches.

Each example holds one row: its position in its split (`"row"`), each image input's
resized uint8 pixels (raw bytes; black where the row lacks the image) and whether the row
has it (`"present/<image>"`), each text, the tabular numbers and one label per task
(`"label/<task>"`). Rows are dealt round-robin to a split's files, so reading the files
interleaved one row at a time gives the rows back in order.
"""

import numpy as np
import tensorflow as tf

from keras_mmtl.files import join_path
from keras_mmtl.modalities import modality_kind

ROW = "row"
# Rows shuffled among when reading prepared shards: about 370 MB of 128x96 images.
SHUFFLE_BUFFER = 10_000


def label_key(task):
    """The feature holding a task's label."""
    return f"label/{task}"


def present_key(image):
    """The feature telling whether a row has an image input (1) or lacks it (0)."""
    return f"present/{image}"


def feature_spec(info, names):
    """The `tf.io.parse_example` spec of the features `names` of prepared data."""
    spec = {}
    for name in names:
        if name == ROW or name.startswith(label_key("")):
            spec[name] = tf.io.FixedLenFeature([], tf.int64)
        elif name.startswith(present_key("")):  # (data prepared before rows could lack one)
            spec[name] = tf.io.FixedLenFeature([], tf.int64, default_value=1)
        elif modality_kind(name) == "tabular":
            spec[name] = tf.io.FixedLenFeature([len(info["tabular_columns"])], tf.float32)
        else:
            spec[name] = tf.io.FixedLenFeature([], tf.string)
    return spec


def split_files(info, split):
    """The paths of one split's shards."""
    return [join_path(info["folder"], name) for name in info["splits"][split]["files"]]


def read_rows(info, split, shuffle=False, seed=0, shuffle_buffer=SHUFFLE_BUFFER):
    """A split's serialized rows: in order, or shuffled (files, then rows in a buffer)."""
    files = split_files(info, split)
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=len(files),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=not shuffle)
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    return ds


def prepared_batches(records, images, memory, labels, image_size, batch_size, shuffle, seed,
                     drop_remainder):
    """`make_dataset`'s batches for records of prepared data (`records.prepared`).

    Images come from the shards of the records' split, the rows they hold
    (the records may be a selection of the split); `memory` (inputs by name)
    and `labels` (an array, or a dict of them) are per records row, gathered
    into each batch.
    """
    info = records.prepared
    splits = sorted(set(records.splits.tolist()))
    if len(splits) != 1:
        raise ValueError(f"Prepared data is read one split at a time; these records hold rows "
                         f"of {splits}. Pass split= (make_dataset(records, 'train', ...)).")
    if list(image_size) != list(info["image_size"]):
        height, width = info["image_size"]
        raise ValueError(
            f"The data in {info['folder']} was prepared at {height}x{width}; the model takes "
            f"{image_size[0]}x{image_size[1]} images. Prepare it again with --image-size "
            f"{image_size[0]}x{image_size[1]}, or build the model with image_size=({height}, "
            f"{width}).")
    rows = np.asarray(records.images, np.int64)  # each row's position in its split
    rows = np.where(rows >= 0, rows, -1 - rows)  # (negative: the row made to lack its image)
    blank = {name: tf.constant(records.inputs(name) < 0) for name in images
             if (records.inputs(name) < 0).any()}
    if not shuffle and np.any(np.diff(rows) <= 0):
        raise ValueError("Prepared rows are read in their order: the records must keep it.")
    position = np.full(info["splits"][splits[0]]["rows"], -1, np.int64)
    position[rows] = np.arange(len(rows))
    position = tf.constant(position)
    memory = {name: _sparse_rows(values) if isinstance(values, tf.SparseTensor) else
              tf.constant(values) for name, values in memory.items()}
    labels = tf.nest.map_structure(tf.constant, labels)
    height, width = image_size
    spec = feature_spec(info, [ROW, *images])

    def parse(serialized):  # one row, or a batch of them
        row = tf.io.parse_example(serialized, spec)
        return tf.gather(position, row[ROW]), {name: row[name] for name in images}

    def assemble(where, pixels):
        inputs = {name: _gather(values, where) for name, values in memory.items()}
        for name, data in pixels.items():
            inputs[name] = tf.reshape(tf.io.decode_raw(data, tf.uint8), (-1, height, width, 3))
            if name in blank:  # a missing image is black, as make_dataset yields it
                keep = tf.cast(~tf.gather(blank[name], where), tf.uint8)
                inputs[name] *= keep[:, None, None, None]
        return inputs, tf.nest.map_structure(lambda values: tf.gather(values, where), labels)

    ds = read_rows(info, splits[0], shuffle, seed)
    if np.array_equal(rows, np.arange(len(position))):  # the whole split: parsed by the batch
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
        ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    else:  # some of its rows (a worker's share...): the others are left out row by row
        ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.filter(lambda where, _: where >= 0)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    batches = len(rows) // batch_size if drop_remainder else -(-len(rows) // batch_size)
    ds = ds.apply(tf.data.experimental.assert_cardinality(batches))  # for fit's progress
    return ds.map(assemble, num_parallel_calls=tf.data.AUTOTUNE)


def _sparse_rows(values):
    """A sparse matrix (n-gram counts) as `_gather` takes it: ragged rows of columns and values."""
    rows, count = values.indices[:, 0], values.dense_shape[0]
    return (tf.RaggedTensor.from_value_rowids(values.indices[:, 1], rows, count),
            tf.RaggedTensor.from_value_rowids(values.values, rows, count), values.dense_shape[1])


def _gather(values, where):
    """Rows `where` of an array, or of a sparse matrix held as `_sparse_rows`."""
    if not isinstance(values, tuple):
        return tf.gather(values, where)
    columns, counts, width = values
    columns, counts = tf.gather(columns, where), tf.gather(counts, where)
    indices = tf.stack([columns.value_rowids(), columns.flat_values], axis=1)
    return tf.SparseTensor(indices, counts.flat_values,
                           tf.stack([tf.shape(where, tf.int64)[0], width]))
