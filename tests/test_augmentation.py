import collections

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_mmtl.data import (
    ImageAugmentation,
    TextAugmentation,
    from_arrays,
    make_augmentation,
    make_dataset,
)

TEXTS = ["a red cotton shirt with long sleeves", "blue wool hat", "x", "",
         "one two three four five six seven eight"]
OFF = {"flip": None, "rotation": 0, "zoom": 0, "crop": 0, "contrast": 0}


def images(n=4, size=16):
    return np.random.default_rng(0).uniform(0, 255, (n, size, size, 3)).astype("float32")


def texts():
    return tf.constant(TEXTS)


def decoded(tensor):
    return [t.decode() for t in tensor.numpy()]


@pytest.fixture
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"], indirect=True)
@pytest.mark.parametrize("training", [True, False])
def test_image_shape_and_dtype_are_kept(policy, training):
    out = ImageAugmentation(seed=0)(images(size=12), training=training)
    assert out.shape == (4, 12, 12, 3) and out.dtype == tf.float32


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"], indirect=True)
def test_text_shape_and_dtype_are_kept(policy):
    out = TextAugmentation(delete=0.3, swap=0.3, seed=0)(texts(), training=True)
    assert out.shape == (len(TEXTS),) and out.dtype == tf.string


@pytest.mark.parametrize("training", [False, None])
def test_image_identity_at_inference(training):
    x = images()
    np.testing.assert_array_equal(ImageAugmentation(seed=0)(x, training=training).numpy(), x)


@pytest.mark.parametrize("training", [False, None])
def test_text_identity_at_inference(training):
    layer = TextAugmentation(delete=0.5, swap=0.5, seed=0)
    assert decoded(layer(texts(), training=training)) == TEXTS


def test_training_changes_images_within_range():
    x = images()
    out = ImageAugmentation(seed=0)(x, training=True).numpy()
    assert np.abs(out - x).max() > 1
    assert out.min() >= 0 and out.max() <= 255


def test_training_changes_texts():
    out = decoded(TextAugmentation(seed=0, delete=0.2, swap=0.2)(texts(), training=True))
    assert out != TEXTS
    assert out[3] == ""


@pytest.mark.parametrize("part", ["flip", "rotation", "zoom", "crop", "contrast"])
def test_each_image_part_works_alone(part):
    settings = {**OFF, part: "horizontal" if part == "flip" else 0.3}
    x = images(n=8)
    out = ImageAugmentation(seed=0, **settings)(x, training=True).numpy()
    assert np.abs(out - x).max() > 1


def test_image_parts_all_off_is_identity_in_training():
    x = images()
    np.testing.assert_array_equal(ImageAugmentation(**OFF)(x, training=True).numpy(), x)


def test_crop_keeps_the_asked_fraction_resized_back():
    ramp = np.broadcast_to(np.arange(21, dtype="float32")[None, None, :, None], (6, 21, 21, 3))
    out = ImageAugmentation(seed=0, **{**OFF, "crop": 0.5})(ramp, training=True).numpy()
    assert out.shape == ramp.shape
    steps = np.diff(out[:, 10, :, 0], axis=1)  # a 20-pixel ramp spans 10 pixels: step 0.5
    np.testing.assert_allclose(steps, 0.5, atol=1e-4)
    assert len(np.unique(out[:, 10, 0, 0].round(3))) > 1  # each image its own position


@pytest.mark.parametrize("delete", [0.5, 0.99])
def test_deletion_keeps_order_and_at_least_one_word(delete):
    out = decoded(TextAugmentation(delete=delete, swap=0, seed=0)(texts(), training=True))
    for before, after in zip(TEXTS, out):
        if not before:
            assert after == ""
            continue
        words = after.split(" ")
        assert 1 <= len(words) <= len(before.split())
        remaining = iter(before.split())
        assert all(word in remaining for word in words)  # an ordered subsequence


def test_swap_only_permutes_words():
    out = decoded(TextAugmentation(delete=0, swap=0.5, seed=0)(texts(), training=True))
    for before, after in zip(TEXTS, out):
        assert collections.Counter(after.split()) == collections.Counter(before.split())
    assert out != TEXTS


def test_text_parts_all_off_is_identity_in_training():
    layer = TextAugmentation(delete=0, swap=None)
    assert decoded(layer(tf.constant(["  spaced   text ", ""]), training=True)) == [
        "  spaced   text ", ""]


def test_text_augmentation_runs_in_a_graph():
    ds = tf.data.Dataset.from_tensor_slices(TEXTS).batch(5)
    layer = TextAugmentation(delete=0.3, swap=0.3, seed=0)
    out = next(iter(ds.map(lambda t: layer(t, training=True))))
    assert out.shape == (5,) and out.numpy()[3] == b""


@pytest.mark.parametrize("layer", [
    ImageAugmentation(flip="vertical", rotation=0.1, zoom=0, crop=0.2, contrast=0.3, seed=3),
    TextAugmentation(delete=0.25, swap=0.5, seed=3),
], ids=["image", "text"])
def test_config_and_serialization_round_trip(layer):
    config = layer.get_config()
    assert type(layer).from_config(config).get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is type(layer) and restored.get_config() == config


def test_same_seed_gives_same_augmentation():
    x = images()
    first, second = (ImageAugmentation(seed=5)(x, training=True).numpy() for _ in range(2))
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("make, match", [
    (lambda: ImageAugmentation(flip="diagonal"), "Unknown flip 'diagonal'"),
    (lambda: ImageAugmentation(crop=1.0), r"crop must be a number in \[0, 1\)"),
    (lambda: ImageAugmentation(rotation="a"), "Received: rotation='a'"),
    (lambda: TextAugmentation(delete=1.5), r"delete must be a number in \[0, 1\]"),
])
@pytest.mark.bad_input
def test_bad_arguments_are_rejected(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def records(n=8):
    return from_arrays(["a", "b"] * (n // 2), images=images(n).astype("uint8"),
                       texts=[TEXTS[0]] * n, splits=["train"] * n)


def batches(augment, **kwargs):
    ds = make_dataset(records(), "train", image_size=(16, 16), batch_size=4, shuffle=False,
                      augment=augment, **kwargs)
    return list(ds)


def test_make_dataset_augments_train_batches():
    plain = batches(None)
    augmented = batches(make_augmentation(image=True, text={"delete": 0.3}, seed=0))
    for (x, y), (ax, ay) in zip(plain, augmented):
        np.testing.assert_array_equal(ay.numpy(), y.numpy())
        assert ax["image"].shape == x["image"].shape
        assert np.abs(ax["image"].numpy() - x["image"].numpy()).max() > 1
    texts = [t for ax, _ in augmented for t in decoded(ax["text"])]
    assert any(t != TEXTS[0] for t in texts)


def test_make_dataset_skips_modalities_it_does_not_yield():
    augment = make_augmentation(image=True, text=False)
    (features, _), *_ = batches(augment, modalities=("text",))
    assert set(features) == {"text"} and decoded(features["text"]) == [TEXTS[0]] * 4


@pytest.mark.parametrize("augment, match", [
    ({"audio": None}, r"Unknown augment keys \['audio'\]"),
    ("image", "augment must be None or a dict"),
    ({"image": 3}, r"augment\['image'\] must be a layer"),
])
@pytest.mark.bad_input
def test_make_dataset_rejects_bad_augment(augment, match):
    with pytest.raises(ValueError, match=match):
        make_dataset(records(), image_size=(16, 16), augment=augment)


def test_make_augmentation_settings():
    assert make_augmentation() == {} and make_augmentation(image=None, text=False) == {}
    augment = make_augmentation(image=True, text={"swap": 0.3, "seed": 9}, seed=4)
    assert isinstance(augment["image"], ImageAugmentation) and augment["image"].seed == 4
    assert augment["text"].swap == 0.3 and augment["text"].seed == 9
    assert make_augmentation(text=True, seed=4)["text"].seed == 5
    layer = ImageAugmentation()
    assert make_augmentation(image=layer) == {"image": layer}


@pytest.mark.parametrize("kwargs, match", [
    ({"image": "yes"}, "Received: image='yes'"),
    ({"text": {"drop": 0.1}}, r"Unknown TextAugmentation arguments \['drop'\]"),
    ({"text": ImageAugmentation()}, "dict of TextAugmentation arguments"),
])
@pytest.mark.bad_input
def test_make_augmentation_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_augmentation(**kwargs)
