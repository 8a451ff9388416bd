"""Prepared data: checked rows as sharded TFRecord files of resized uint8 images.

`prepare` decodes and resizes every image once, in parallel, and writes each split's
rows round-robin to `shards` TFRecord files (`keras_mmtl.data.shards`) beside a
`prepared.json` that describes them. `prepared_records` reads them back as `Records`
whose images stay in the shards: `make_dataset`, training, the feature cache and
evaluation read them from there, the files interleaved and rows shuffled in a bounded
buffer, so no epoch decodes a JPEG and the images are never all in memory. The folder
may be on any TensorFlow filesystem (`gs://...`).
"""

import json

import numpy as np
import tensorflow as tf

from keras_mmtl.data.manifest import SPLITS, Records
from keras_mmtl.data.pipeline import make_dataset
from keras_mmtl.data.shards import ROW, feature_spec, label_key, present_key, read_rows
from keras_mmtl.files import file_stamp, is_file, join_path, make_folder, read_bytes, write_json
from keras_mmtl.modalities import modality_kind
from keras_mmtl.progress import Progress

PREPARED_FILE = "prepared.json"


def prepare(records, folder, image_size, shards=8, batch_size=256):
    """Writes records as TFRecord shards of resized uint8 images, texts and labels.

    Each split gets `shards` files (`<split>-00000-of-00008.tfrecord`, ...),
    rows dealt round-robin; `prepared.json` (written last, so an interrupted
    run leaves none) records the image size, the inputs, the tasks with their
    class names and each split's rows and files. Images are decoded by
    `make_dataset` (the pixel budget, downscale-on-decode and rounding of
    training and serving alike). A row that lacks an image (an empty path
    in a manifest read with `allow_missing=True`) is written black and
    marked absent, so it reads back as it was: a row without its image.

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
    image_size = [int(side) for side in image_size]
    modalities = tuple(records.modalities)
    images = [name for name in modalities if modality_kind(name) == "image"]
    tasks = records.tasks
    make_folder(folder)
    splits = {}
    for split in (split for split in SPLITS if (records.splits == split).any()):
        rows = records.subset(split)
        files = [f"{split}-{i:05d}-of-{shards:05d}.tfrecord" for i in range(shards)]
        data = make_dataset(rows, image_size=image_size, modalities=modalities,
                            tasks={task: task for task in tasks}, batch_size=batch_size,
                            shuffle=False, presence=images)
        writers = [tf.io.TFRecordWriter(join_path(folder, name)) for name in files]
        written = 0
        with Progress(f"Preparing the {split} split", len(rows)) as progress:
            for inputs, labels, *_ in data:  # (weights, where rows lack a label: kept as -1)
                for example in _examples(written, inputs, labels, modalities, images):
                    writers[written % shards].write(example)
                    written += 1
                progress.add(len(next(iter(labels.values()))))
        for writer in writers:
            writer.close()
        splits[split] = {"rows": written, "files": files}
    info = {"image_size": image_size, "modalities": list(modalities), "tasks": tasks,
            "label_name": records.label_name, "tabular_columns": list(records.tabular_columns),
            "max_megapixels": records.max_megapixels, "splits": splits}
    write_json(join_path(folder, PREPARED_FILE), info)
    return info


def _examples(first_row, inputs, labels, modalities, images):
    """Serialized `tf.train.Example`s of one batch of `make_dataset`, rows from `first_row`."""
    count = len(next(iter(labels.values())))
    columns = {ROW: [_ints([first_row + i]) for i in range(count)]}
    for name in modalities:
        values = inputs[name].numpy()
        if modality_kind(name) == "tabular":
            columns[name] = [_floats(row) for row in values]
        else:
            columns[name] = [_bytes(value.tobytes() if name in images else value)
                             for value in values]
    for name in images:
        columns[present_key(name)] = [_ints([int(value)])
                                      for value in inputs[f"{name}_present"].numpy()]
    for task, values in labels.items():
        columns[label_key(task)] = [_ints([value]) for value in values.numpy()]
    for row in zip(*columns.values()):
        features = tf.train.Features(feature=dict(zip(columns, row)))
        yield tf.train.Example(features=features).SerializeToString()


def _bytes(value):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _floats(values):
    return tf.train.Feature(float_list=tf.train.FloatList(value=list(values)))


def _ints(values):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))


def is_prepared(path):
    """Whether `path` is a folder `prepare` wrote (it holds `prepared.json`)."""
    return is_file(join_path(path, PREPARED_FILE))


def read_prepared(folder):
    """The description `prepare` wrote in `folder`, with `"folder"` and the shards' `"stamp"`."""
    path = join_path(folder, PREPARED_FILE)
    if not is_file(path):
        raise FileNotFoundError(
            f"No prepared data in {folder}: {PREPARED_FILE} is missing (prepare writes it last, "
            "so an interrupted prepare leaves none). Run keras-mmtl prepare (mm.prepare) again.")
    info = json.loads(read_bytes(path).decode("utf-8"))
    stamps = []
    for split in info["splits"].values():
        for name in split["files"]:
            if not is_file(join_path(folder, name)):
                raise FileNotFoundError(f"Prepared data in {folder} lacks {name}; run keras-mmtl "
                                        "prepare (mm.prepare) again.")
            stamps.append(f"{name}:{file_stamp(join_path(folder, name))}")
    return {**info, "folder": folder, "stamp": ";".join(stamps)}


def prepared_records(folder, class_names=None):
    """The `Records` of prepared data: texts, labels and splits in memory, images in the shards.

    Reads every shard once for the rows' other fields (their images are not
    decoded). `make_dataset` (and so training, the feature cache and
    evaluation) then reads the images from the shards, one split at a time.

    Args:
        folder: what `prepare` wrote.
        class_names: a model's classes of the main task (as `read_manifest`
            takes them): they must be the prepared data's.

    Example:

    >>> import tempfile
    >>> import numpy as np
    >>> from keras_mmtl.data import from_arrays
    >>> folder = tempfile.mkdtemp()
    >>> _ = prepare(from_arrays(["a", "b"] * 2, images=np.zeros((4, 5, 5, 3), "uint8"),
    ...                         splits=["train"] * 4), folder, (4, 4))
    >>> records = prepared_records(folder)
    >>> records.image_kind, len(records), records.class_names
    ('prepared', 4, ['a', 'b'])
    """
    info = read_prepared(folder)
    main = info["label_name"]
    if class_names is not None and list(class_names) != info["tasks"][main]:
        raise ValueError(f"The model's classes differ from those of the data prepared in "
                         f"{folder}: {list(class_names)[:5]}... against "
                         f"{info['tasks'][main][:5]}... Prepare the data again from a manifest.")
    images = [name for name in info["modalities"] if modality_kind(name) == "image"]
    names = [ROW, *(m for m in info["modalities"] if m not in images),
             *(label_key(task) for task in info["tasks"]), *map(present_key, images)]
    spec = feature_spec(info, names)
    columns = {name: [] for name in names}
    splits = []
    for split, part in info["splits"].items():
        ds = read_rows(info, split).batch(4096).map(lambda x: tf.io.parse_example(x, spec))
        for batch in ds:
            for name in names:
                columns[name].append(batch[name].numpy())
        splits += [split] * part["rows"]
    values = {name: np.concatenate(parts) for name, parts in columns.items()}
    texts = {name: np.array([text.decode("utf-8") for text in values[name]], dtype=object)
             for name in info["modalities"] if modality_kind(name) == "text"}
    # Each image input holds the row's position in its split, -1 - it where the row lacks one.
    inputs = {**texts, **{name: np.where(values[present_key(name)] == 1, values[ROW],
                                         -1 - values[ROW]) for name in images}}
    tasks = {task: (values[label_key(task)].astype(np.int32), classes)
             for task, classes in info["tasks"].items()}
    labels, class_names = tasks.pop(main)
    return Records(
        images=inputs.pop("image", None), texts=inputs.pop("text", None), extra_inputs=inputs,
        labels=labels, splits=np.array(splits, dtype=object), class_names=class_names,
        image_kind="prepared", label_name=main, extra_tasks=tasks,
        tabular=values.get("tabular"), tabular_columns=tuple(info["tabular_columns"]),
        max_megapixels=info["max_megapixels"], prepared=info)


def prepared_dataset(folder, split, **options):
    """`make_dataset` of one split of prepared data, at the size it was prepared at.

    Each call reads the texts and labels of every split (`prepared_records`);
    for several splits, read the records once and call `make_dataset` on them.

    Args:
        folder: what `prepare` wrote.
        split: `"train"`, `"val"` or `"test"`.
        **options: more `make_dataset` arguments (`batch_size`, `shuffle`,
            `modalities`, `tasks`, ...).
    """
    records = prepared_records(folder)
    return make_dataset(records, split, image_size=records.prepared["image_size"], **options)
