import io

import numpy as np
import pytest
import tensorflow as tf

from conftest import claimed_size_jpeg
from keras_mmtl.data import decode_image, from_arrays, make_dataset
from keras_mmtl.data.images import decode_pixels, header_size


def test_batches_have_model_input_shapes(product_records):
    features, labels = next(iter(make_dataset(product_records, "train", image_size=(20, 12),
                                              batch_size=5)))
    assert features["image"].shape == (5, 20, 12, 3) and features["image"].dtype == tf.uint8
    assert features["text"].dtype == tf.string and labels.dtype == tf.int32
    assert 0 <= float(tf.reduce_min(features["image"])) <= float(tf.reduce_max(features["image"])) <= 255


@pytest.mark.parametrize("optional", [False, True])
def test_pipeline_uint8_images_are_the_pixels_a_serving_signature_decodes(tmp_path, optional):
    path = tmp_path / "photo.jpg"
    image = np.random.default_rng(0).integers(0, 255, (23, 17, 3), np.uint8)
    path.write_bytes(tf.io.encode_jpeg(image).numpy())
    records = from_arrays(["a", "b"], images=[str(path)] * 2, splits=["train"] * 2)
    batch, _ = next(iter(make_dataset(records, image_size=(20, 12), batch_size=2, shuffle=False,
                                      presence=("image",) if optional else ())))
    served = decode_image(path.read_bytes(), (20, 12))
    assert batch["image"].dtype == tf.uint8 and served.dtype == tf.float32
    assert np.any(served.numpy() != image[:20, :12])  # resized: not the file's own pixels
    np.testing.assert_array_equal(batch["image"][0].numpy().astype(np.float32), served)


def test_decoded_pixels_match_the_file(product_records):
    features, labels = next(iter(make_dataset(product_records, "test", image_size=(16, 16),
                                              batch_size=4)))
    names = [product_records.class_names[i] for i in labels.numpy()]
    for image, name in zip(features["image"].numpy(), names):
        red, blue = image[..., 0].mean(), image[..., 2].mean()
        assert (red > blue) == name.startswith("red")


def test_modalities_select_inputs(product_records):
    features, _ = next(iter(make_dataset(product_records, "val", modalities=("text",))))
    assert set(features) == {"text"}
    text_only = from_arrays(["a", "b"], texts=["x", "y"], splits=["train", "train"])
    with pytest.raises(ValueError, match=r"needs inputs \['image'\]"):
        make_dataset(text_only, modalities=("image",))


def test_train_split_is_shuffled_reproducibly_and_eval_splits_are_not(product_records):
    def order(split, seed):
        ds = make_dataset(product_records, split, image_size=(8, 8), batch_size=100, seed=seed)
        return [t for t in next(iter(ds))[0]["text"].numpy()]

    assert order("train", 1) == order("train", 1)
    assert order("train", 1) != order("train", 2)
    assert order("test", 1) == order("test", 2) == list(product_records.subset("test").texts.astype(bytes))


def test_array_images_are_resized():
    records = from_arrays(["a", "b"], images=np.full((2, 10, 10, 3), 7, np.uint8),
                          splits=["train", "train"])
    features, _ = next(iter(make_dataset(records, image_size=(4, 6))))
    np.testing.assert_allclose(features["image"].numpy(), 7.0)
    assert features["image"].shape == (2, 4, 6, 3)


@pytest.mark.parametrize("encode", [tf.io.encode_png, tf.io.encode_jpeg])
def test_decode_image_handles_grayscale_and_formats(encode):
    gray = tf.fill((6, 6, 1), tf.constant(200, tf.uint8))
    image = decode_image(encode(gray), (3, 3))
    assert image.shape == (3, 3, 3)
    np.testing.assert_allclose(image.numpy(), 200, atol=2)


def _pil(image, fmt, **options):
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, fmt, **options)
    return out.getvalue()


HEADERS = {"jpeg": lambda image: tf.io.encode_jpeg(image).numpy(),
           "png": lambda image: tf.io.encode_png(image).numpy(),
           "gif": lambda image: _pil(image, "GIF"), "bmp": lambda image: _pil(image, "BMP"),
           "webp": lambda image: _pil(image, "WEBP"),
           "webp lossless": lambda image: _pil(image, "WEBP", lossless=True),
           "webp extended": lambda image: _pil(np.dstack([image, image[..., :1]]), "WEBP"),
           "bmp top-down": lambda image: _top_down(_pil(image[::-1], "BMP"))}


def _top_down(bmp):
    """A bottom-up BMP as top-down: its height field negated (rows must come reversed)."""
    data = bytearray(bmp)
    height = int.from_bytes(data[22:26], "little", signed=True)
    data[22:26] = (-height).to_bytes(4, "little", signed=True)
    return bytes(data)


@pytest.mark.parametrize("fmt", HEADERS)
def test_the_header_tells_the_size_the_decoder_finds(fmt):
    image = np.random.default_rng(0).integers(0, 255, (37, 53, 3), np.uint8)
    data = HEADERS[fmt](image)
    assert [int(x) for x in header_size(data)] == [37, 53]
    assert tf.io.decode_image(data, expand_animations=False).shape[:2] == (37, 53)


@pytest.mark.bad_input
@pytest.mark.parametrize("encode", [tf.io.encode_png, tf.io.encode_jpeg])
def test_an_image_over_the_pixel_limit_is_refused_with_its_size(encode):
    data = encode(tf.zeros((200, 300, 3), tf.uint8))
    expected = ("image too large: 300 x 200 pixels = 0.06 megapixels, over the limit of 0.05 "
                r"megapixels; downscale it, or raise the limit \(max_megapixels=, CLI: "
                r"--max-megapixels\)")
    with pytest.raises(tf.errors.InvalidArgumentError, match=expected):
        decode_image(data, (8, 8), max_megapixels=0.05)
    graph = tf.function(lambda data: decode_image(data, (8, 8), max_megapixels=0.05))
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"assertion failed: \\[{expected}"):
        graph(data)
    assert decode_image(data, (8, 8), max_megapixels=0.06).shape == (8, 8, 3)


@pytest.mark.bad_input
def test_a_huge_header_is_refused_before_decoding():
    bomb = claimed_size_jpeg(12000, 12000)  # 631 bytes; decoded, 432 MB
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="image too large: 12000 x 12000 pixels = 144 megapixels"):
        decode_image(bomb, (32, 32))
    png = bytearray(tf.io.encode_png(tf.zeros((4, 4, 3), tf.uint8)).numpy())
    png[16:24] = (65535).to_bytes(4, "big") * 2  # the IHDR width and height
    with pytest.raises(tf.errors.InvalidArgumentError, match="65535 x 65535 pixels = 4294.84"):
        tf.function(lambda data: decode_image(data, (32, 32)))(bytes(png))


def test_large_jpegs_are_downscaled_while_decoding_never_below_the_size():
    rows, columns = np.mgrid[0:64, 0:48]
    image = np.stack([rows * 4, columns * 5, rows + columns], -1).astype(np.uint8)
    data = tf.io.encode_jpeg(image)
    assert decode_pixels(data, (16, 12)).shape == (16, 12, 3)  # 1/4
    assert decode_pixels(data, (17, 12)).shape == (32, 24, 3)  # 1/2
    assert decode_pixels(data, (33, 12)).shape == (64, 48, 3)  # whole
    whole = tf.image.resize(tf.cast(tf.io.decode_jpeg(data), tf.float32), (16, 12))
    np.testing.assert_allclose(decode_image(data, (16, 12)), whole, atol=12)
    # Less than twice the size on a side: decoded whole, as before the pixel budget.
    whole = tf.image.resize(tf.cast(tf.io.decode_jpeg(data), tf.float32), (33, 30))
    np.testing.assert_array_equal(decode_image(data, (33, 30)), np.floor(whole + 0.5))
