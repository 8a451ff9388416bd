import os

import numpy as np
import pytest
import tensorflow as tf

from keras_mmtl.data import make_dataset
from keras_mmtl.models import build_classifier_for
from keras_mmtl.training.cache import cache_key, compute_features, split_model

FROZEN = dict(image_backbone="small_cnn", image_weights=None, image_size=(16, 16),
              freeze_backbone=True)


def test_top_on_cached_features_equals_the_full_model(product_records):
    model = build_classifier_for(product_records, **FROZEN)
    extractors, top, _ = split_model(model)
    features = compute_features(extractors, product_records, "test")
    assert set(features) == {"image_features", "text_features"}
    ds = make_dataset(product_records, "test", modalities=(), batch_size=100, features=features)
    inputs, labels = next(iter(ds))
    test = product_records.subset("test")
    images = tf.stack([tf.image.resize(tf.io.decode_jpeg(tf.io.read_file(p)), (16, 16))
                       for p in test.images])
    expected = model({"image": images, "text": tf.constant(list(test.texts))})
    np.testing.assert_allclose(top(inputs).numpy(), expected.numpy(), atol=1e-5)
    np.testing.assert_array_equal(labels.numpy(), test.labels)


def test_cache_is_reused_then_invalidated_by_weights_or_data(tmp_path, product_records,
                                                             monkeypatch):
    model = build_classifier_for(product_records, **FROZEN)
    extractors, _, _ = split_model(model)
    cache = str(tmp_path / "cache")
    first = compute_features(extractors, product_records, "train", cache)
    assert len(os.listdir(cache)) == 2  # one file per frozen branch

    extractor = extractors["image"]
    for each in extractors.values():
        monkeypatch.setattr(each, "predict", lambda *a, **k: pytest.fail("recomputed"))
    again = compute_features(extractors, product_records, "train", cache)
    np.testing.assert_array_equal(again["image_features"], first["image_features"])

    key = cache_key(extractor, product_records, "train")
    other = build_classifier_for(product_records, **FROZEN)  # other random weights
    assert cache_key(split_model(other)[0]["image"], product_records, "train") != key
    other.set_weights(model.get_weights())  # the same backbone, built again
    assert cache_key(split_model(other)[0]["image"], product_records, "train") == key
    os.utime(product_records.images[0], ns=(1, 1))  # an image file was replaced
    assert cache_key(extractor, product_records, "train") != key
