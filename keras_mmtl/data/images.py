"""Image bytes -> tensors: the one decode used by training, validation and serving."""

import functools

import numpy as np
import tensorflow as tf

from keras_mmtl.progress import Progress

CHANNELS = 3
# Images larger than this are refused before they are decoded: far above any real photo,
# far below what one request may cost a server (a 12000x12000 JPEG decoded whole is 2 GB).
MAX_MEGAPIXELS = 50
LIMIT_HINT = "max_megapixels=, CLI: --max-megapixels"
CHECK_CHUNK = 16_384  # sources per dataset while checking images: bounds their tensor
REFUSALS = ("image too large", "JPEG XL image refused")  # how the budget's errors start
_FORMATS = ("unknown", "jpeg", "png", "gif", "bmp", "webp_vp8x", "webp_vp8", "webp_vp8l", "jxl")
_JPEG_MAGIC = b"\xff\xd8\xff"
_MAGIC = ((_JPEG_MAGIC, "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF8", "gif"),
          (b"BM", "bmp"), (b"\xff\x0a", "jxl"), (b"\x00\x00\x00\x0cJXL ", "jxl"))
_WEBP_CHUNKS = ((b"VP8X", "webp_vp8x"), (b"VP8 ", "webp_vp8"), (b"VP8L", "webp_vp8l"))
_HEADER_BYTES = 32
_JPEG_RATIOS = (1, 2, 4, 8)  # what decode_jpeg can scale by while decoding


def decode_image(data, image_size, max_megapixels=MAX_MEGAPIXELS, dtype="float32"):
    """Decodes one JPEG/PNG/GIF/BMP/WebP image and resizes it for a model.

    The training pipeline, the image check of `read_manifest` and the
    exported serving signature all call this function, so what a served
    model sees is what it was trained on. The image's size is read from its
    header first: one over `max_megapixels` is refused before any pixel is
    decoded (`InvalidArgumentError` saying its size and the limit). A JPEG
    at least twice `image_size` in both sides is downscaled by 2, 4 or 8
    while decoding (never below `image_size`), and the resize reads the
    8-bit pixels, so a large image never exists as float32 at full size.

    Args:
        data: scalar `tf.string` tensor with the encoded image file.
        image_size: `(height, width)` of the output.
        max_megapixels: the largest image accepted, in millions of pixels
            (width x height as the header gives them).
        dtype: `"float32"` or `"uint8"` (see `resize_image`).

    Returns:
        tensor of shape `(height, width, 3)` with whole values in [0, 255].

    Example:

    >>> import tensorflow as tf
    >>> png = tf.io.encode_png(tf.zeros((8, 6, 3), tf.uint8))
    >>> decode_image(png, (4, 4)).shape
    TensorShape([4, 4, 3])
    """
    return resize_image(decode_pixels(data, image_size, max_megapixels), image_size, dtype)


def decode_pixels(data, min_size=None, max_megapixels=MAX_MEGAPIXELS):
    """The uint8 `(h, w, 3)` pixels of an image within the pixel budget (see `decode_image`).

    Args:
        data: scalar `tf.string` tensor with the encoded image file.
        min_size: `(height, width)` the pixels must still cover: a JPEG at
            least twice as large on both sides is decoded downscaled, by the
            largest of 2, 4 or 8 that keeps it at least this large. `None`
            decodes at full size.
        max_megapixels: the largest image accepted, in millions of pixels.

    Returns:
        uint8 tensor `(h, w, 3)`.

    Example:

    >>> import tensorflow as tf
    >>> jpeg = tf.io.encode_jpeg(tf.zeros((64, 48, 3), tf.uint8))
    >>> decode_pixels(jpeg, (16, 12)).shape, decode_pixels(jpeg).shape
    (TensorShape([16, 12, 3]), TensorShape([64, 48, 3]))
    """
    data = tf.convert_to_tensor(data, tf.string)

    def jpeg():  # the common case, on its own path: its header is read by one op
        height, width = tf.unstack(tf.io.extract_jpeg_shape(data, tf.int64)[:2])
        with tf.control_dependencies(_budget_checks(None, height, width, max_megapixels)):
            ratio = tf.constant(0) if min_size is None else _jpeg_ratio(height, width, min_size)
            return tf.switch_case(ratio, [functools.partial(
                tf.io.decode_jpeg, data, channels=CHANNELS, ratio=r) for r in _JPEG_RATIOS])

    def other():
        kind, height, width = _non_jpeg_header(data)
        with tf.control_dependencies(_budget_checks(kind, height, width, max_megapixels)):
            return tf.io.decode_image(data, channels=CHANNELS, expand_animations=False)

    return tf.cond(tf.equal(tf.strings.substr(data, 0, len(_JPEG_MAGIC)), _JPEG_MAGIC), jpeg, other)


def header_size(data):
    """`(height, width)` (int64) of an encoded image, read from its header only.

    JPEG, PNG, GIF, BMP and WebP are read; for other data both are -1 (it
    is left to the decoder to refuse). Of a GIF, this is its logical
    screen: its frames are not read.

    Example:

    >>> import tensorflow as tf
    >>> [int(x) for x in header_size(tf.io.encode_png(tf.zeros((5, 7, 3), tf.uint8)))]
    [5, 7]
    """
    return _header(tf.convert_to_tensor(data, tf.string))[1:]


def _header(data):
    """`(index in _FORMATS, height, width)` of an encoded image, from its first bytes."""
    kind, height, width = _non_jpeg_header(data)
    return (kind, *tf.cond(tf.equal(kind, _FORMATS.index("jpeg")),
                           lambda: tuple(tf.unstack(tf.io.extract_jpeg_shape(data, tf.int64)[:2])),
                           lambda: (height, width)))


def _non_jpeg_header(data):
    """`_header`, but -1 for a JPEG's height and width (its header needs a decoder's parser)."""
    raw = tf.cast(tf.io.decode_raw(_head(data), tf.uint8), tf.int64)
    kind = _format_index(raw)
    return (kind, *_other_size(kind, raw))


def _head(data):
    """The first `_HEADER_BYTES` bytes of `data`, padded with zeros if it is shorter."""
    return tf.strings.substr(tf.strings.join([tf.strings.substr(data, 0, _HEADER_BYTES),
                                              b"\0" * _HEADER_BYTES]), 0, _HEADER_BYTES)


def _magic_table():
    """Per magic (in `_MAGIC`, then the WebP chunks): its format, byte positions and values.

    Positions are padded to one length with position 0 and value -1, which no byte equals.
    """
    magics = [(name, [(0, magic)]) for magic, name in _MAGIC]
    magics += [(name, [(0, b"RIFF"), (8, b"WEBP"), (12, chunk)]) for chunk, name in _WEBP_CHUNKS]
    rows = [[(start + i, byte) for start, magic in parts for i, byte in enumerate(magic)]
            for _, parts in magics]
    width = max(len(row) for row in rows)
    positions = [[p for p, _ in row] + [0] * (width - len(row)) for row in rows]
    values = [[v for _, v in row] + [-1] * (width - len(row)) for row in rows]
    lengths = [len(row) for row in rows]
    return [_FORMATS.index(name) for name, _ in magics], positions, values, lengths


_MAGIC_FORMATS, _MAGIC_POSITIONS, _MAGIC_VALUES, _MAGIC_LENGTHS = _magic_table()


def _format_index(raw):
    """The index in `_FORMATS` of the format an image's first bytes (int64, `_head`) say.

    A few vectorized ops over every magic at once (this runs for every image
    decoded); no two magics match the same bytes.
    """
    equal = tf.cast(tf.equal(tf.gather(raw, _MAGIC_POSITIONS), _MAGIC_VALUES), tf.int32)
    matches = tf.equal(tf.reduce_sum(equal, axis=1), _MAGIC_LENGTHS)
    last = tf.reduce_max(tf.where(matches, tf.range(len(_MAGIC_FORMATS)), -1))
    return tf.gather([0, *_MAGIC_FORMATS], last + 1)  # none matched: 0, "unknown"


# Per format of `_FORMATS` but JPEG: where its height and width lie in the first bytes (the
# positions of their bytes, least significant first), and `(divisor, modulus, offset)`: the
# size is `number // divisor % modulus + offset`. A field of BMP is a signed int32 whose sign
# says the row order: its absolute value is the size. Other formats (JPEG XL...) read -1.
_SIZE_FIELDS = {
    "png": (((23, 22, 21, 20), (1, 2**32, 0)), ((19, 18, 17, 16), (1, 2**32, 0))),
    "gif": (((8, 9), (1, 2**16, 0)), ((6, 7), (1, 2**16, 0))),
    "bmp": (((22, 23, 24, 25), (1, 2**32, 0)), ((18, 19, 20, 21), (1, 2**32, 0))),
    "webp_vp8x": (((27, 28, 29), (1, 2**24, 1)), ((24, 25, 26), (1, 2**24, 1))),
    "webp_vp8": (((28, 29), (1, 2**14, 0)), ((26, 27), (1, 2**14, 0))),
    "webp_vp8l": (((21, 22, 23, 24), (2**14, 2**14, 1)), ((21, 22, 23, 24), (1, 2**14, 1))),
}


def _size_table():
    """`_SIZE_FIELDS` as arrays indexed by format: byte positions, their weights, arithmetic."""
    positions, weights, arithmetic = [], [], []
    for name in _FORMATS:
        fields = _SIZE_FIELDS.get(name, (((), (1, 1, -1)),) * 2)
        positions.append([list(where) + [0] * (4 - len(where)) for where, _ in fields])
        weights.append([[256**i for i in range(len(where))] + [0] * (4 - len(where))
                        for where, _ in fields])
        arithmetic.append([list(numbers) for _, numbers in fields])
    return positions, weights, arithmetic


_SIZE_POSITIONS, _SIZE_WEIGHTS, _SIZE_ARITHMETIC = _size_table()


def _other_size(kind, raw):
    """`(height, width)` of an image of format `kind`, from its first bytes (int64, `_head`)."""
    positions, weights = (tf.gather(tf.constant(table, tf.int64), kind)
                          for table in (_SIZE_POSITIONS, _SIZE_WEIGHTS))
    number = tf.reduce_sum(tf.gather(raw, positions) * weights, axis=-1)
    signed = tf.equal(kind, _FORMATS.index("bmp")) & (number >= 2**31)  # a negative int32
    number = tf.where(signed, 2**32 - number, number)
    divisor, modulus, offset = tf.unstack(
        tf.gather(tf.constant(_SIZE_ARITHMETIC, tf.int64), kind), axis=-1)
    size = number // divisor % modulus + offset
    return size[0], size[1]


def _budget_checks(kind, height, width, max_megapixels):
    """Checks that an image is within `max_megapixels` and of a format whose size is read.

    `kind` is the index in `_FORMATS`, or `None` for a JPEG.
    """
    pixels = height * width

    def too_large():
        megapixels = tf.cast(pixels, tf.float64) / 1e6
        megapixels = tf.where(megapixels < 0.1, megapixels, tf.round(megapixels * 100) / 100)
        return tf.strings.join([
            "image too large: ", tf.strings.as_string(width), " x ",
            tf.strings.as_string(height), " pixels = ",
            tf.strings.as_string(megapixels, shortest=True), " megapixels, over the limit of "
            f"{max_megapixels:g} megapixels; downscale it, or raise the limit ({LIMIT_HINT})"])

    checks = [_require(pixels <= int(max_megapixels * 1e6), too_large)]
    if kind is not None:  # `None`: a JPEG
        checks.append(_require(tf.not_equal(kind, _FORMATS.index("jxl")), lambda: tf.constant(
            "JPEG XL image refused (its size is not read before decoding); convert it to "
            "JPEG, PNG or WebP")))
    return checks


def _require(condition, message):
    """An assertion (graph) or check (eager) raising `InvalidArgumentError(message())`.

    `message` makes the message: in a graph, only when the condition fails.
    """
    if not tf.executing_eagerly():
        def fail():
            with tf.control_dependencies([tf.debugging.Assert(condition, [message()],
                                                              summarize=1)]):
                return tf.identity(condition)

        return tf.cond(condition, lambda: tf.identity(condition), fail)
    if not bool(condition):
        raise tf.errors.InvalidArgumentError(None, None, message().numpy().decode("utf-8"))
    return tf.no_op()


def _jpeg_ratio(height, width, min_size):
    """Index in `_JPEG_RATIOS` of the largest ratio that keeps an image >= `min_size`."""
    fits = [tf.logical_and(height >= ratio * min_size[0], width >= ratio * min_size[1])
            for ratio in _JPEG_RATIOS[1:]]
    return tf.add_n([tf.cast(fit, tf.int32) for fit in fits])


def decode_optional_image(data, image_size, max_megapixels=MAX_MEGAPIXELS,
                          dtype="float32"):
    """`decode_image`, or a black image for empty `data` (a sample without its image).

    A model built with `missing_modalities=True` ignores that image: its
    presence input says it is missing. Training and serving both call this.

    Example:

    >>> float(tf.reduce_max(decode_optional_image(tf.constant(b""), (4, 4))))
    0.0
    """
    return tf.cond(tf.strings.length(data) > 0,
                   lambda: decode_image(data, image_size, max_megapixels, dtype),
                   lambda: tf.zeros((*image_size, CHANNELS), dtype))


def resize_image(image, image_size, dtype="float32"):
    """Resizes a decoded `(h, w, c)` image to `image_size` as RGB pixels rounded to 8 bits.

    The resize reads the pixels in their own type (uint8 from a decoder):
    only the small resized image is float. Its values are rounded to whole
    levels in [0, 255], so the uint8 images of the input pipeline and the
    float32 ones of a serving signature are the same pixels.

    Args:
        image: `(h, w, 1 or 3)` pixels.
        image_size: `(height, width)`.
        dtype: of the output: `"float32"` or `"uint8"` (a quarter of the bytes,
            what the input pipeline yields; the model casts it).
    """
    image = tf.convert_to_tensor(image)
    if image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(image)
    # Bilinear resizing stays within the pixels' range: adding 0.5 and truncating rounds.
    pixels = tf.cast(tf.image.resize(image, image_size) + 0.5, tf.uint8)
    return tf.ensure_shape(tf.cast(pixels, dtype), (*image_size, CHANNELS))


def find_undecodable(sources, read_files=True, max_megapixels=MAX_MEGAPIXELS):
    """Returns the indices of images that cannot be decoded, and why.

    Every distinct image is decoded once, in parallel, by the same function
    as training (`decode_pixels`): an image over `max_megapixels` is refused
    from its header, before it is decoded. Sources are checked in chunks,
    so memory stays bounded however many there are.

    Args:
        sources: sequence of file paths (`read_files=True`) or encoded bytes.
        read_files: whether `sources` are paths to read.
        max_megapixels: the largest image accepted (see `decode_image`).

    Returns:
        dict mapping index -> what is wrong (naming the file) and what to
        do, empty when all images decode.

    Example:

    >>> big = tf.io.encode_png(tf.zeros((300, 400, 3), tf.uint8)).numpy()
    >>> find_undecodable([big, b"junk"], read_files=False, max_megapixels=0.1)[0]
    'image too large: 400 x 300 pixels = 0.12 megapixels, over the limit of 0.1 megapixels; \
downscale it, or raise the limit (max_megapixels=, CLI: --max-megapixels)'
    """
    if len(sources) == 0:
        return {}

    def probe(index, source):
        data = tf.io.read_file(source) if read_files else source
        image = decode_pixels(data, max_megapixels=max_megapixels)
        tf.debugging.assert_positive(tf.size(image), "empty image")
        return index

    first = {}  # each distinct image is decoded once, for all the rows that name it
    for index, source in enumerate(sources):
        first.setdefault(source, index)
    distinct = np.fromiter(first.values(), np.int64, len(first))
    decoded = np.zeros(len(sources), bool)
    with Progress("Checking images", len(distinct), unit="images") as progress:
        for start in range(0, len(distinct), CHECK_CHUNK):  # a bounded tensor of sources
            chunk = distinct[start:start + CHECK_CHUNK]
            ds = tf.data.Dataset.from_tensor_slices((chunk, [sources[i] for i in chunk]))
            ds = ds.map(probe, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
            for batch in ds.ignore_errors().batch(4096):
                decoded[batch.numpy()] = True
                progress.add(len(batch))
            progress.add(int(np.sum(~decoded[chunk])))  # the ones that failed, checked too
    problems = {}
    for index in distinct[~decoded[distinct]].tolist():
        problem = "cannot decode image"
        advice = "replace the file with a JPEG/PNG/GIF/BMP/WebP image"
        try:
            probe(index, tf.constant(sources[index]))
        except (tf.errors.OpError, ValueError) as error:
            reason = getattr(error, "message", str(error)).strip().splitlines()[0]
            if reason.startswith(REFUSALS):  # the budget's own message: what, then what to do
                problem, _, advice = reason.partition("; ")
            else:
                problem += f" ({reason})"
        where = f": {sources[index]}" if read_files else ""
        problems[index] = f"{problem}{where}; {advice}"
    if not problems:
        return {}
    return {index: problems[first[source]] for index, source in enumerate(sources)
            if first[source] in problems}


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
