"""Training-only augmentation of image and text batches, applied in tf.data.

The layers run on whole batches in the train split's pipeline
(`make_dataset(..., augment=...)`); they are never part of a model, so an
exported model has no trace of them.
"""

import inspect
import numbers

import keras
import tensorflow as tf

from keras_mmtl.checks import check_known

FLIPS = (None, "horizontal", "vertical", "horizontal_and_vertical")
MODALITIES = ("image", "text")


def _fraction(name, value, upper=1.0, upper_included=True):
    """`value` as a float in [0, upper] (or [0, upper)); `None` -> 0."""
    value = 0.0 if value is None else value
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not number or not (0 <= value <= upper if upper_included else 0 <= value < upper):
        bracket = "]" if upper_included else ")"
        raise ValueError(f"{name} must be a number in [0, {upper:g}{bracket} (0 or None "
                         f"disables it). Received: {name}={value!r}")
    return float(value)


def _seed(seed, offset):
    """A distinct seed for each random part, or `None` for a random one."""
    return None if seed is None else seed + offset


def _uniform(shape, generator, minval=0.0, maxval=1.0):
    """float32 uniform draws from a Keras `SeedGenerator` (advances its state)."""
    return keras.random.uniform(shape, minval, maxval, dtype="float32", seed=generator)


def _random_index(lengths, generator):
    """One uniform random position in `[0, length)` per row (int64)."""
    draws = _uniform(tf.shape(lengths), generator)
    index = tf.cast(tf.floor(draws * tf.cast(lengths, tf.float32)), tf.int64)
    return tf.minimum(index, lengths - 1)  # float rounding can reach `length`


@keras.saving.register_keras_serializable(package="keras_mmtl")
class ImageAugmentation(keras.layers.Layer):
    """Random crop, flip, rotation, zoom and contrast of an image batch.

    Each image of the batch gets its own random transformation, in that
    order, and values are clipped to [0, 255]. The crop keeps `1 - crop` of
    the height and width at a random position and resizes it back, so the
    output has the input's shape. Rotation and zoom fill the borders by
    reflection (`keras.layers.RandomRotation`, `keras.layers.RandomZoom`).
    The layer computes in float32 whatever the global dtype policy.

    Args:
        flip: `None`, `"horizontal"`, `"vertical"` or
            `"horizontal_and_vertical"`.
        rotation: maximum rotation either way, as a fraction of a full turn.
        zoom: maximum zoom in or out, as a fraction of the size.
        crop: fraction of the height and width cropped away, in [0, 1).
        contrast: contrast factor drawn in `[1 - contrast, 1 + contrast]`.
        seed: integer seed, or `None` for a random one.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Each of `flip`, `rotation`, `zoom`, `crop` and `contrast` is disabled by
    `0` or `None`. Call with `training=True` to augment; otherwise the
    input comes back unchanged.

    Example:

    >>> import numpy as np
    >>> images = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    >>> augment = ImageAugmentation(seed=1)
    >>> bool((augment(images) == images).numpy().all())  # inference: identity
    True
    >>> augmented = augment(images, training=True)
    >>> augmented.shape, augmented.dtype.name
    (TensorShape([2, 8, 8, 3]), 'float32')
    """

    def __init__(self, flip="horizontal", rotation=0.05, zoom=0.1, crop=0.1, contrast=0.1,
                 seed=None, **kwargs):
        if kwargs.get("dtype") is None:
            kwargs["dtype"] = "float32"  # pixel arithmetic, even under mixed_float16
        super().__init__(**kwargs)
        flip = None if flip is False else flip
        if flip not in FLIPS:
            raise ValueError(f"Unknown flip {flip!r}. Expected one of {list(FLIPS)}. "
                             f"Received: flip={flip!r}")
        self.flip = flip
        self.rotation = _fraction("rotation", rotation)
        self.zoom = _fraction("zoom", zoom)
        self.crop = _fraction("crop", crop, upper_included=False)
        self.contrast = _fraction("contrast", contrast)
        self.seed = seed
        policy = self.dtype_policy
        self._crop_generator = keras.random.SeedGenerator(_seed(seed, 0)) if self.crop else None
        self._augmenters = []
        if flip:
            self._augmenters.append(keras.layers.RandomFlip(flip, seed=_seed(seed, 1),
                                                            dtype=policy))
        if self.rotation:
            self._augmenters.append(keras.layers.RandomRotation(self.rotation,
                                                                seed=_seed(seed, 2), dtype=policy))
        if self.zoom:
            self._augmenters.append(keras.layers.RandomZoom(self.zoom, seed=_seed(seed, 3),
                                                            dtype=policy))
        if self.contrast:
            # A pair: a single number would only ever raise the contrast.
            self._augmenters.append(keras.layers.RandomContrast(
                (self.contrast, self.contrast), value_range=(0, 255), seed=_seed(seed, 4),
                dtype=policy))

    def build(self, input_shape):
        for augmenter in self._augmenters:
            augmenter.build(input_shape)

    def call(self, images, training=None):
        if not training:
            return images
        images = tf.cast(images, self.compute_dtype)
        if self.crop:
            images = self._random_crop(images)
        for augmenter in self._augmenters:
            images = augmenter(images, training=True)
        return tf.clip_by_value(images, 0.0, 255.0)

    def _random_crop(self, images):
        """Crops `1 - crop` of each image at a random position, resized back."""
        shape = tf.shape(images)
        size = tf.cast(shape[1:3] - 1, tf.float32)  # (h - 1, w - 1)
        corners = _uniform(tf.stack([shape[0], 2]), self._crop_generator,
                           maxval=self.crop) * size  # top-left (y, x) in pixels
        scale = tf.fill([shape[0], 1], 1.0 - self.crop)
        zero = tf.zeros_like(scale)
        # Output pixel (x, y) reads input (scale * x + left, scale * y + top).
        transform = tf.concat([scale, zero, corners[:, 1:], zero, scale, corners[:, :1],
                               zero, zero], axis=1)
        return keras.ops.image.affine_transform(images, transform, fill_mode="nearest")

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "flip": self.flip, "rotation": self.rotation,
                "zoom": self.zoom, "crop": self.crop, "contrast": self.contrast,
                "seed": self.seed}


@keras.saving.register_keras_serializable(package="keras_mmtl")
class TextAugmentation(keras.layers.Layer):
    """Random word deletion and swap (EDA) in a batch of texts.

    Words are split on whitespace. Each word is deleted with probability
    `delete`, but a text that had words keeps at least one (a random one).
    Then the remaining `n` words of a text undergo `swap * n` swaps of two
    random positions, rounded stochastically (`floor(swap * n + u)`, `u`
    uniform in [0, 1)): the expected number of swaps is exactly `swap * n`,
    so short texts are sometimes left in order. Augmented texts are joined
    with single spaces; an empty text stays empty. Only TensorFlow ops are
    used, so the layer runs inside a tf.data pipeline.

    Args:
        delete: probability of deleting each word, in [0, 1].
        swap: swaps per word, in [0, 1].
        seed: integer seed, or `None` for a random one.
        **kwargs: base `keras.layers.Layer` arguments (`name`, ...).

    `0` or `None` disables each part. Call with `training=True` to augment;
    otherwise (or with both parts disabled) the input comes back unchanged.

    Example:

    >>> import tensorflow as tf
    >>> augment = TextAugmentation(delete=0.0, swap=0.5, seed=0)
    >>> texts = tf.constant(["red cotton shirt", ""])
    >>> [t.decode() for t in augment(texts).numpy()]  # inference: identity
    ['red cotton shirt', '']
    >>> augmented = augment(texts, training=True).numpy()
    >>> sorted(augmented[0].decode().split()), augmented[1].decode()
    (['cotton', 'red', 'shirt'], '')
    """

    def __init__(self, delete=0.1, swap=0.1, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.delete = _fraction("delete", delete)
        self.swap = _fraction("swap", swap)
        self.seed = seed
        self._generator = keras.random.SeedGenerator(seed)

    def call(self, texts, training=None):
        if not training or not (self.delete or self.swap):
            return texts
        words = tf.strings.split(tf.convert_to_tensor(texts, tf.string))
        if self.delete:
            words = self._delete(words)
        if self.swap:
            words = self._swap(words)
        return tf.strings.reduce_join(words, axis=-1, separator=" ")

    def _delete(self, words):
        """Drops words with probability `delete`; a non-empty text keeps one."""
        keep = _uniform(tf.shape(words.flat_values), self._generator) >= self.delete
        lengths = words.row_lengths()
        emptied = tf.logical_and(lengths > 0,
                                 tf.logical_not(tf.reduce_any(words.with_flat_values(keep),
                                                              axis=1)))
        rescued = tf.boolean_mask(words.row_starts() + _random_index(lengths, self._generator),
                                  emptied)
        keep = tf.tensor_scatter_nd_update(keep, rescued[:, None],
                                           tf.ones_like(rescued, tf.bool))
        return tf.ragged.boolean_mask(words, words.with_flat_values(keep))

    def _swap(self, words):
        """Applies `floor(swap * n + u)` random transpositions to each text's words."""
        lengths = words.row_lengths()
        starts = words.row_starts()
        swaps = tf.cast(tf.floor(self.swap * tf.cast(lengths, tf.float32)
                                 + _uniform(tf.shape(lengths), self._generator)), tf.int64)
        rounds = tf.reduce_max(tf.concat([swaps, tf.zeros([1], tf.int64)], axis=0))
        draws = _uniform(tf.stack([tf.size(lengths, tf.int64), rounds, 2]), self._generator)
        lengths = lengths[:, None, None]
        positions = tf.cast(tf.floor(draws * tf.cast(lengths, tf.float32)), tf.int64)
        # (texts, rounds, 2) indices into flat_values; float rounding can reach `length`.
        positions = starts[:, None, None] + tf.minimum(positions, lengths - 1)

        def transpose(i, order):
            active = i < swaps  # rows with no swaps left (or no words) stay put
            a = tf.boolean_mask(positions[:, i, 0], active)
            b = tf.boolean_mask(positions[:, i, 1], active)
            # Rows never share positions; a == b writes the same value twice.
            order = tf.tensor_scatter_nd_update(order, tf.concat([a, b], 0)[:, None],
                                                tf.gather(order, tf.concat([b, a], 0)))
            return i + 1, order

        order = tf.range(tf.size(words.flat_values, tf.int64), dtype=tf.int64)
        _, order = tf.while_loop(lambda i, _: i < rounds, transpose,
                                 (tf.constant(0, tf.int64), order))
        return words.with_flat_values(tf.gather(words.flat_values, order))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "delete": self.delete, "swap": self.swap,
                "seed": self.seed}


LAYERS = {"image": ImageAugmentation, "text": TextAugmentation}


def make_augmentation(image=False, text=False, seed=0):
    """Turns augmentation settings into `make_dataset`'s `augment` argument.

    Args:
        image: `True` (default `ImageAugmentation`), a dict of its arguments,
            an `ImageAugmentation`, or `False`/`None` (off).
        text: the same for `TextAugmentation`.
        seed: seed of the layers (the text layer gets `seed + 1`), unless the
            dict gives its own; `None` for random ones.

    Returns:
        dict of modality -> layer holding only the modalities to augment
        (`{}` when none), so `"image" in augment` says whether images are.

    Example:

    >>> augment = make_augmentation(image={"flip": None, "crop": 0.2}, text=True, seed=0)
    >>> sorted(augment), augment["image"].crop, augment["text"].delete
    (['image', 'text'], 0.2, 0.1)
    >>> make_augmentation(image=False, text=None)
    {}
    """
    augment = {}
    for offset, (modality, value) in enumerate((("image", image), ("text", text))):
        layer_class = LAYERS[modality]
        if value is None or value is False:
            continue
        if isinstance(value, layer_class):
            augment[modality] = value
            continue
        if value is True:
            value = {}
        if not isinstance(value, dict):
            raise ValueError(f"{modality} augmentation must be True, False, None, a dict of "
                             f"{layer_class.__name__} arguments, or a {layer_class.__name__} layer. "
                             f"Received: {modality}={value!r}")
        allowed = [name for name in inspect.signature(layer_class).parameters
                   if name != "kwargs"]
        check_known(value, allowed, lambda unknown: (
            f"Unknown {layer_class.__name__} arguments {unknown}. Expected some of "
            f"{allowed}. Received: {modality}={value!r}"))
        augment[modality] = layer_class(**{"seed": _seed(seed, offset), **value})
    return augment
