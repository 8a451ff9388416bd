"""Records -> tf.data: read, decode, resize, shuffle, batch, augment, prefetch."""

import numpy as np
import tensorflow as tf

from keras_mmtl.checks import check_known
from keras_mmtl.data.augmentation import MODALITIES as AUGMENTED_MODALITIES
from keras_mmtl.data.images import decode_image, decode_optional_image, resize_image
from keras_mmtl.data.shards import prepared_batches
from keras_mmtl.modalities import modality_kind

AUTOTUNE = tf.data.AUTOTUNE


def make_dataset(
    records,
    split=None,
    *,
    image_size=None,
    modalities=None,
    batch_size=32,
    shuffle=None,
    seed=0,
    drop_remainder=False,
    features=None,
    augment=None,
    presence=(),
    tasks=None,
):
    """Builds the input pipeline of a model: `({"image", "text"}, label)` batches.

    Images are read and decoded in parallel inside tf.data (no Python runs per
    sample) within the records' pixel budget (`records.max_megapixels`, see
    `decode_image`), resized to `image_size` as uint8 (a quarter of float32's
    bytes; the model casts them and holds its backbone's own preprocessing).
    Texts stay raw strings: the model tokenizes them in its graph.

    Args:
        records: `Records` from `read_manifest`, `from_arrays`, ...
        split: `"train"`, `"val"`, `"test"` or `None` for all rows.
        image_size: `(height, width)` of the model's images (see
            `keras_mmtl.describe(model).image_size`); needed when images are yielded.
        modalities: inputs to yield, e.g. `("text",)`; default what the
            records hold.
        batch_size: samples per batch.
        shuffle: reshuffle every epoch; by default only the train split.
        seed: shuffle seed.
        drop_remainder: drop the last incomplete batch.
        features: more inputs precomputed per row of the split, such as
            cached backbone outputs (`keras_mmtl.training.compute_features`):
            dict of name -> array (or `tf.SparseTensor`, such as n-gram
            counts) whose first axis follows the split's rows.
        augment: training-only augmentation, e.g. from `make_augmentation`:
            dict of modality (`"image"`, `"text"`) -> layer such as
            `ImageAugmentation` (`None` values are off). Each batch is
            augmented with `training=True` after decoding and batching, one
            batch after another so a layer's seed reproduces the run.
            Every input of the kind is augmented (`"image_2"` too);
            modalities the dataset does not yield (images read from cached
            features) are left out. Pass it for the train split only.
        presence: modalities whose presence to yield as `"<modality>_present"`
            (float32, 1 or 0), for a model built with `missing_modalities=True`;
            a missing image is then yielded black. Without it, rows lacking an
            image are an error.
        tasks: for a model with named outputs (several tasks, auxiliary
            heads), a dict of output name -> task (`describe(model).outputs`):
            labels are then a dict of output name -> that task's labels.
            Where a task's labels hold -1 (rows without a label of that task,
            as in joint domain transfer), batches are `(inputs, labels,
            weights)`: each output weighs those rows 0, the others 1.

    Returns:
        a batched, prefetched `tf.data.Dataset`.

    Example:

    >>> import numpy as np
    >>> from keras_mmtl.data import from_arrays
    >>> records = from_arrays(["a", "b"] * 4, images=np.zeros((8, 5, 5, 3), "uint8"),
    ...                       texts=["x y"] * 8, splits=["train"] * 8)
    >>> features, labels = next(iter(make_dataset(records, image_size=(4, 4), batch_size=8)))
    >>> features["image"].shape, features["text"].shape, labels.shape
    (TensorShape([8, 4, 4, 3]), TensorShape([8]), TensorShape([8]))
    """
    if split is not None:
        records = records.subset(split)
    if len(records) == 0:
        raise ValueError(f"No rows in split {split!r}; check the split column or fractions.")
    modalities = tuple(records.modalities if modalities is None else modalities)
    missing = set(modalities) - set(records.modalities)
    if missing:
        raise ValueError(
            f"The model needs inputs {sorted(missing)} that the data does not have. "
            f"Data has: {list(records.modalities)}"
        )
    presence = tuple(presence)
    images = [name for name in modalities if modality_kind(name) == "image"]
    for name in (name for name in images if name not in presence):
        absent = np.flatnonzero(~records.present(name))
        if len(absent):
            raise ValueError(
                f"{len(absent)} rows have no {name} (the first is row {absent[0]} of the "
                f"split). A model for samples that miss a modality is built with "
                "missing_modalities=True; or leave such rows out.")
    if images and image_size is None:
        raise ValueError("Pass image_size=(height, width) (keras_mmtl.describe(model).image_size).")
    augmenters = _augmenters(augment, modalities)
    if shuffle is None:
        shuffle = split == "train"
    inputs = {name: values if isinstance(values, tf.SparseTensor) else np.asarray(values)
              for name, values in (features or {}).items()}
    for name, values in inputs.items():
        count = int(values.dense_shape[0]) if isinstance(values, tf.SparseTensor) else len(values)
        if count != len(records):
            raise ValueError(f"features[{name!r}] has {count} rows; the split has "
                             f"{len(records)}.")
    for name in modalities:
        values, kind = records.inputs(name), modality_kind(name)
        if kind == "text":
            inputs[name] = values.astype(str)
        elif kind == "tabular":
            inputs[name] = values.astype(np.float32)
        else:
            inputs[name] = values if records.image_kind == "array" else list(values)
    for name in presence:
        inputs[f"{name}_present"] = records.present(name).astype(np.float32)

    def load_image(data, optional):
        if records.image_kind == "array":
            return resize_image(data, image_size, tf.uint8)
        if records.image_kind == "path" and optional:  # an empty path is a missing image
            data = tf.cond(tf.strings.length(data) > 0, lambda: tf.io.read_file(data),
                           lambda: tf.constant(b""))
        elif records.image_kind == "path":
            data = tf.io.read_file(data)
        decode = decode_optional_image if optional else decode_image
        return decode(data, image_size, records.max_megapixels, tf.uint8)

    def load_images(row, label):  # per image: only rows that may lack it check for that
        return {**row, **{name: load_image(row[name], name in presence) for name in images}}, label

    labels = records.labels if tasks is None else {
        output: records.task_labels(task) for output, task in tasks.items()}
    if records.image_kind == "prepared" and images:  # decoded already: read from the shards
        memory = {name: values for name, values in inputs.items() if name not in images}
        ds = prepared_batches(records, images, memory, labels, image_size, batch_size, shuffle,
                              seed, drop_remainder)
    else:
        ds = tf.data.Dataset.from_tensor_slices((inputs, labels))
        if shuffle:
            ds = ds.shuffle(len(records), seed=seed, reshuffle_each_iteration=True)
        if images:  # nothing else needs work per sample
            ds = ds.map(load_images, num_parallel_calls=AUTOTUNE)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=AUTOTUNE)
    if augmenters:

        def augment_batch(row, label):
            return {**row, **{name: layer(row[name], training=True)
                              for name, layer in augmenters.items()}}, label

        # Sequential: parallel calls would draw from the layers' seed state in any order.
        ds = ds.map(augment_batch)
    if isinstance(labels, dict) and any((values < 0).any() for values in labels.values()):
        ds = ds.map(lambda row, label: (row, label, {
            output: tf.cast(values >= 0, tf.float32) for output, values in label.items()}))
    return ds.prefetch(AUTOTUNE)


def _augmenters(augment, modalities):
    """The `augment` layers of the modalities the dataset yields."""
    if augment is None:
        return {}
    if not isinstance(augment, dict):
        raise ValueError(f"augment must be None or a dict of modality -> layer "
                         f"(see keras_mmtl.data.make_augmentation). Received: augment={augment!r}")
    check_known(augment, AUGMENTED_MODALITIES, lambda unknown: (
        f"Unknown augment keys {unknown}. Expected some of {list(AUGMENTED_MODALITIES)}. "
        f"Received: augment={augment!r}"))
    for name, layer in augment.items():
        if layer is not None and not callable(layer):
            raise ValueError(f"augment[{name!r}] must be a layer (such as ImageAugmentation) "
                             f"or None. Received: {layer!r}")
    # One layer per kind, applied to every input of that kind (image_2 as image).
    return {name: augment[modality_kind(name)] for name in modalities
            if augment.get(modality_kind(name)) is not None}
