import concurrent.futures
import os
import uuid

import numpy as np
import pytest
import tensorflow as tf

from keras_mmtl.data import make_dataset
from keras_mmtl.models import build_classifier_for
from keras_mmtl.models.backbones import (
    build_image_backbone,
    split_frozen_bottom,
    unfreeze_top_blocks,
)
from keras_mmtl.training import cache as cache_module
from keras_mmtl.training import cache_frozen_features, train
from keras_mmtl.training.cache import cache_key, compute_features, split_model

FROZEN = dict(image_backbone="small_cnn", image_weights=None, image_size=(16, 16),
              freeze_backbone=True)


@pytest.mark.parametrize("text_encoder, names", [
    ("scratch", {"image_features", "text_features"}),  # token ids
    ("ngrams", {"image_features", "text_features_0", "text_features_1"}),  # n-gram counts
])
def test_top_on_cached_features_equals_the_full_model(product_records, text_encoder, names):
    model = build_classifier_for(product_records, text_encoder=text_encoder, **FROZEN)
    extractors, top, _ = split_model(model)
    features = compute_features(extractors, product_records, "test")
    assert set(features) == names
    # n-gram counts stay sparse: dense, each would be as wide as its bag's vocabulary
    assert {name for name, t in top.input.items() if t.sparse} == {
        name for name in names if name.startswith("text_features_")}
    inputs, labels = _cached_test_batch(product_records, features)
    np.testing.assert_allclose(top(inputs).numpy(), _full_model_output(model, product_records),
                               atol=1e-5)
    np.testing.assert_array_equal(labels.numpy(), product_records.subset("test").labels)


def test_n_gram_counts_stay_sparse_and_out_of_the_cache_folder(tmp_path, product_records):
    model = build_classifier_for(product_records, text_encoder="ngrams", **FROZEN)
    extractors, _, _ = split_model(model)
    cache = str(tmp_path / "cache")
    features = compute_features(extractors, product_records, "train", cache)
    assert all(isinstance(features[f"text_features_{i}"], tf.SparseTensor) for i in (0, 1))
    assert len(os.listdir(cache)) == 1  # the image features' file only


def _cached_test_batch(records, features):
    """The test split's cached features (and labels) as one batch."""
    ds = make_dataset(records, "test", modalities=(), batch_size=100, features=features)
    return next(iter(ds))


def _full_model_output(model, records):
    """The classifier's output on the test split's decoded images and texts."""
    test = records.subset("test")
    images = tf.stack([tf.image.resize(tf.io.decode_jpeg(tf.io.read_file(p)), (16, 16))
                       for p in test.images])
    return model({"image": images, "text": tf.constant(list(test.texts))}).numpy()


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


@pytest.mark.parametrize("name", ["small_cnn", "mobilenet_v2_0.35", "mobilenet_v3_small",
                                  "efficientnet_b0"])
def test_frozen_bottom_and_trained_top_compose_to_the_backbone(name):
    backbone = build_image_backbone(name, weights=None, image_size=(32, 32))
    unfreeze_top_blocks(backbone, 2)
    bottom, top = split_frozen_bottom(backbone)
    images = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(top(bottom(images)), backbone(images), atol=1e-5)
    assert not bottom.trainable_weights
    assert {w.path for w in top.trainable_weights} == {
        w.path for w in backbone.trainable_weights}


@pytest.mark.parametrize("blocks", [0, "all"])
def test_nothing_to_split_without_a_frozen_bottom_below_trained_blocks(blocks):
    backbone = build_image_backbone("mobilenet_v2_0.35", weights=None, image_size=(32, 32))
    if blocks == 0:
        backbone.trainable = False
    else:
        unfreeze_top_blocks(backbone, blocks)
    assert split_frozen_bottom(backbone) is None


def test_fine_tuning_top_on_cached_frozen_bottom_equals_the_full_model(product_records):
    model = build_classifier_for(product_records, **FROZEN)
    unfreeze_top_blocks(model, 1)
    extractors, top, _ = split_model(model)
    features = compute_features(extractors, product_records, "test")
    assert features["image_features"].shape[1:] == (2, 2, 128)  # below block4, not pooled
    inputs, _ = _cached_test_batch(product_records, features)
    np.testing.assert_allclose(top(inputs).numpy(), _full_model_output(model, product_records),
                               atol=1e-5)
    assert {w.path for w in top.trainable_weights} >= {
        w.path for w in model.get_layer("image_backbone").trainable_weights}


def test_two_phases_run_the_frozen_bottom_once_per_split(tmp_path, product_records,
                                                         monkeypatch):
    model = build_classifier_for(product_records, **FROZEN)
    whole = {"image": split_model(model)[0]["image"]}  # phase 1's: the whole frozen backbone
    expected = compute_features(whole, product_records, "train")
    passes, compute = [], cache_module._compute

    def counted(extractor, rows, *args, **kwargs):
        passes.append(extractor.output_shape if extractor.name == "frozen_image_features" else None)
        return compute(extractor, rows, *args, **kwargs)

    monkeypatch.setattr(cache_module, "_compute", counted)
    train(model, product_records, str(tmp_path), epochs=1, fine_tune_epochs=1, unfreeze_blocks=1,
          batch_size=8, verbose=0, projector=False)
    # Train and val once each, below the fine-tuned block; phase 1's pooled features come
    # from those maps through the frozen top, under phase 1's key.
    assert [shape for shape in passes if shape] == [(None, 2, 2, 128)] * 2
    cached = compute_features(whole, product_records, "train", cache_dir=str(tmp_path / "cache"))
    assert len(passes) == 2 + passes.count(None)  # read from the cache, not computed
    np.testing.assert_allclose(cached["image_features"], expected["image_features"], atol=1e-5)


def test_a_merged_split_is_read_from_the_features_cached_for_its_splits(tmp_path, product_records,
                                                                        monkeypatch):
    records = product_records.select(np.r_[0:8, 16:20, 8:16, 20:24])  # val amid train rows
    model = build_classifier_for(records, **FROZEN)
    weights, cache = model.get_weights(), str(tmp_path / "cache")
    settings = dict(epochs=1, fine_tune_epochs=1, unfreeze_blocks=1, batch_size=8, verbose=0,
                    projector=False, cache_dir=cache)
    train(model, records, str(tmp_path / "held_out"), **settings)
    passes, compute = [], cache_module._compute

    def counted(extractor, rows, *args, **kwargs):
        passes.append(extractor.name)
        return compute(extractor, rows, *args, **kwargs)

    monkeypatch.setattr(cache_module, "_compute", counted)
    merged = records.merge_splits("val", into="train")  # as a refit trains
    again = build_classifier_for(records, **FROZEN)
    again.set_weights(weights)
    train(again, merged, str(tmp_path / "refit"), **settings)
    assert "frozen_image_features" not in passes  # neither phase's image features computed
    fresh = build_classifier_for(records, **FROZEN)
    fresh.set_weights(weights)
    whole = {"image": split_model(fresh)[0]["image"]}
    cached = compute_features(whole, merged, "train", cache_dir=cache)["image_features"]
    assert "frozen_image_features" not in passes and len(cached) == 20
    np.testing.assert_allclose(cached, compute_features(whole, merged, "train")["image_features"],
                               atol=1e-5)


@pytest.mark.parametrize("fine_tune_epochs", [0, 1])
def test_features_cached_before_training_are_all_that_training_reads(tmp_path, product_records,
                                                                     monkeypatch,
                                                                     fine_tune_epochs):
    model = build_classifier_for(product_records, **FROZEN)
    cache = str(tmp_path / "cache")
    cache_frozen_features(model, product_records, cache, fine_tune_epochs=fine_tune_epochs,
                          unfreeze_blocks=1)
    passes, compute = [], cache_module._compute

    def counted(extractor, *args, **kwargs):
        passes.append(extractor.name)
        return compute(extractor, *args, **kwargs)

    monkeypatch.setattr(cache_module, "_compute", counted)
    train(model, product_records, str(tmp_path / "run"), epochs=1,
          fine_tune_epochs=fine_tune_epochs, unfreeze_blocks=1, cache_dir=cache, batch_size=8,
          verbose=0, projector=False)
    assert passes == []  # both phases read what was computed before


def test_augmented_images_are_not_cached_in_fine_tuning(product_records):
    model = build_classifier_for(product_records, **FROZEN)
    unfreeze_top_blocks(model, 1)
    extractors, _, _ = split_model(model, exclude=("image",))
    assert sorted(extractors) == ["text"]


@pytest.mark.parametrize("split,more_workers_than_rows", [("train", False), ("test", True)])
def test_workers_compute_a_shard_each_and_read_the_whole_cache_on_remote_storage(
        product_records, split, more_workers_than_rows, monkeypatch):
    monkeypatch.setattr(cache_module, "SHARD_WAIT_SECONDS", 30)  # a missing shard fails soon
    model = build_classifier_for(product_records, **FROZEN)
    extractors, _, _ = split_model(model)
    whole = compute_features(extractors, product_records, split)
    # Three workers of a cluster, or so many that the last one's shard is empty.
    workers = len(product_records.subset(split)) + 1 if more_workers_than_rows else 3
    cache = f"ram://cache-{uuid.uuid4().hex}"  # TensorFlow's in-memory filesystem
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        found = list(pool.map(lambda rank: compute_features(
            extractors, product_records, split, cache, shard=(rank, workers)), range(workers)))
    for features in found:
        assert set(features) == set(whole)
        for name in whole:
            np.testing.assert_allclose(features[name], whole[name], atol=1e-6)
    names = tf.io.gfile.listdir(cache)
    assert len([n for n in names if ".shard" in n]) == workers * len(whole)  # a shard per branch
    assert len([n for n in names if n.endswith(".npz") and ".shard" not in n]) == len(whole)


def test_a_worker_that_never_sees_the_others_shards_says_the_folder_must_be_shared(
        tmp_path, product_records, monkeypatch):
    model = build_classifier_for(product_records, **FROZEN)
    extractors, _, _ = split_model(model)
    monkeypatch.setattr(cache_module, "SHARD_WAIT_SECONDS", 0.2)
    with pytest.raises(TimeoutError, match="shard1of2.*same run folder.*no-cache-features"):
        compute_features(extractors, product_records, "train", str(tmp_path), shard=(0, 2))
