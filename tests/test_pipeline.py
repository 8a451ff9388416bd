import numpy as np
import pytest
import tensorflow as tf

from keras_mmtl.data import decode_image, from_arrays, make_dataset


def test_batches_have_model_input_shapes(product_records):
    features, labels = next(iter(make_dataset(product_records, "train", image_size=(20, 12),
                                              batch_size=5)))
    assert features["image"].shape == (5, 20, 12, 3) and features["image"].dtype == tf.float32
    assert features["text"].dtype == tf.string and labels.dtype == tf.int32
    assert 0 <= float(tf.reduce_min(features["image"])) <= float(tf.reduce_max(features["image"])) <= 255


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
