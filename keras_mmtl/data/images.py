"""Image bytes -> tensors: the one decode used by training, validation and serving."""

import numpy as np
import tensorflow as tf

CHANNELS = 3


def decode_image(data, image_size):
    """Decodes one JPEG/PNG/GIF/BMP image and resizes it for a model.

    The training pipeline and the exported serving signature both call this
    function, so what a served model sees is what it was trained on.

    Args:
        data: scalar `tf.string` tensor with the encoded image file.
        image_size: `(height, width)` of the output.

    Returns:
        float32 tensor of shape `(height, width, 3)` with values in [0, 255].

    Example:

    >>> import tensorflow as tf
    >>> png = tf.io.encode_png(tf.zeros((8, 6, 3), tf.uint8))
    >>> decode_image(png, (4, 4)).shape
    TensorShape([4, 4, 3])
    """
    image = tf.io.decode_image(data, channels=CHANNELS, expand_animations=False)
    return resize_image(image, image_size)


def decode_optional_image(data, image_size):
    """`decode_image`, or a black image for empty `data` (a sample without its image).

    A model built with `missing_modalities=True` ignores that image: its
    presence input says it is missing. Training and serving both call this.

    Example:

    >>> float(tf.reduce_max(decode_optional_image(tf.constant(b""), (4, 4))))
    0.0
    """
    return tf.cond(tf.strings.length(data) > 0, lambda: decode_image(data, image_size),
                   lambda: tf.zeros((*image_size, CHANNELS), tf.float32))


def resize_image(image, image_size):
    """Resizes a decoded `(h, w, c)` image to `image_size` as float32 RGB."""
    image = tf.convert_to_tensor(image)
    if image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(image)
    image = tf.image.resize(tf.cast(image, tf.float32), image_size)
    return tf.ensure_shape(image, (*image_size, CHANNELS))


def find_undecodable(sources, read_files=True):
    """Returns the indices of images that cannot be decoded, and why.

    Every image is decoded once, in parallel, by the same op as training.

    Args:
        sources: sequence of file paths (`read_files=True`) or encoded bytes.
        read_files: whether `sources` are paths to read.

    Returns:
        dict mapping index -> error message, empty when all images decode.
    """
    if len(sources) == 0:
        return {}

    def probe(index, source):
        data = tf.io.read_file(source) if read_files else source
        image = tf.io.decode_image(data, channels=CHANNELS, expand_animations=False)
        tf.debugging.assert_positive(tf.size(image), "empty image")
        return index

    ds = tf.data.Dataset.from_tensor_slices((np.arange(len(sources)), list(sources)))
    ds = ds.map(probe, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    ds = ds.ignore_errors().batch(4096)
    decoded = set()
    for batch in ds:
        decoded.update(batch.numpy().tolist())
    failures = {}
    for index in sorted(set(range(len(sources))) - decoded):
        try:
            probe(index, tf.constant(sources[index]))
            failures[index] = "cannot decode image"
        except (tf.errors.OpError, ValueError) as error:
            reason = getattr(error, "message", str(error)).strip().splitlines()[0]
            failures[index] = f"cannot decode image ({reason})"
    return failures


def median_aspect_ratio(images, image_kind="path", sample=256, seed=0):
    """The median height / width of (a seeded sample of) some images.

    Only a sample is decoded, so this is quick on any dataset. Empty paths or
    bytes (samples without an image) are skipped.

    Args:
        images: file paths, encoded bytes or a uint8 array `(n, h, w, c)`,
            as `Records.images` holds them.
        image_kind: `"path"`, `"bytes"` or `"array"`.
        sample: images decoded at most.
        seed: seed of the sample.

    Returns:
        float, or `None` when there is no image.

    Example:

    >>> import numpy as np
    >>> median_aspect_ratio(np.zeros((2, 80, 60, 3), "uint8"), "array")
    1.3333333333333333
    """
    if image_kind == "array":
        return images.shape[1] / images.shape[2] if len(images) else None
    present = [source for source in images if len(source)]
    if not present:
        return None
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(present), min(sample, len(present)), replace=False)
    ratios = []
    for index in chosen:
        data = tf.io.read_file(present[index]) if image_kind == "path" else present[index]
        height, width = tf.io.decode_image(data, channels=CHANNELS,
                                           expand_animations=False).shape[:2]
        ratios.append(height / width)
    return float(np.median(ratios))
