"""Ensembles of trained classifiers: averaged probabilities, saved, calibrated and served as one."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_mmtl.calibration import calibrate
from keras_mmtl.evaluation import evaluate, predict_records
from keras_mmtl.export import export_saved_model
from keras_mmtl.models import build_classifier, build_classifier_for, embedding_model, ensemble

SMALL = dict(image_backbone="small_cnn", image_weights=None, image_size=(16, 16))


@pytest.fixture
def members(product_records):
    models = []
    for seed, fusion in ((1, "concat"), (2, "gated")):
        keras.utils.set_random_seed(seed)
        models.append(build_classifier_for(product_records, fusion=fusion, **SMALL))
    return models


def test_the_ensemble_averages_its_members(members, product_records, tmp_path):
    combined = ensemble(members)
    _, expected = zip(*(predict_records(m, product_records, "test") for m in members))
    _, probabilities = predict_records(combined, product_records, "test")
    np.testing.assert_allclose(probabilities, np.mean(expected, axis=0), atol=1e-6)
    assert evaluate(combined, product_records, "test").accuracy >= 0
    widths = [embedding_model(m).output_shape[-1] for m in members]  # concat 512, gated 256
    assert embedding_model(combined).output_shape == (None, sum(widths))
    path = str(tmp_path / "ensemble.keras")
    combined.save(path)
    _, again = predict_records(keras.models.load_model(path), product_records, "test")
    np.testing.assert_allclose(again, probabilities, atol=1e-6)
    # A copy: the members can change without changing it.
    members[0].get_layer("head").dense.kernel.assign(
        np.zeros_like(members[0].get_layer("head").dense.kernel))
    _, after = predict_records(combined, product_records, "test")
    np.testing.assert_allclose(after, probabilities, atol=1e-6)


def test_members_must_match():
    text_only = build_classifier(["a", "b"], image_backbone=None, text_vocabulary=["x"])
    other_classes = build_classifier(["a", "c"], image_backbone=None, text_vocabulary=["x"])
    with pytest.raises(ValueError, match="differs from .* in \\['classes'\\]"):
        ensemble([text_only, other_classes])
    with pytest.raises(ValueError, match="two or more models"):
        ensemble([text_only])
    two_tasks = build_classifier({"a": ["x", "y"], "b": ["u", "v"]}, image_backbone=None,
                                 text_vocabulary=["x"])
    with pytest.raises(ValueError, match="one task each"):
        ensemble([text_only, two_tasks])
    with pytest.raises(ValueError, match="combine must be one of"):
        ensemble([text_only, text_only], combine="median")


def test_a_fused_model_and_a_model_of_one_input_combine_geometrically(product_records,
                                                                     tmp_path):
    keras.utils.set_random_seed(4)
    fused = build_classifier_for(product_records, **SMALL)
    image_only = build_classifier_for(product_records, modalities=("image",), **SMALL)
    combined = ensemble([fused, image_only], combine="geometric")
    assert sorted(combined.input) == ["image", "text"]
    _, first = predict_records(fused, product_records, "test")
    _, second = predict_records(image_only, product_records, "test")
    _, probabilities = predict_records(combined, product_records, "test")
    geometric = np.sqrt(first * second)
    np.testing.assert_allclose(probabilities, geometric / geometric.sum(1, keepdims=True),
                               atol=1e-5)
    combined.save(tmp_path / "ensemble.keras")
    _, again = predict_records(keras.models.load_model(tmp_path / "ensemble.keras"),
                               product_records, "test")
    np.testing.assert_allclose(again, probabilities, atol=1e-6)


def test_members_with_auxiliary_heads_take_part_with_their_main_head(product_records):
    keras.utils.set_random_seed(3)
    plain = build_classifier_for(product_records, **SMALL)
    deep = build_classifier_for(product_records, auxiliary_heads=True, **SMALL)
    combined = ensemble([plain, deep])
    assert not isinstance(combined.output, dict)  # one output: the auxiliary heads are left out
    _, first = predict_records(plain, product_records, "test")
    _, second = predict_records(deep, product_records, "test")
    _, probabilities = predict_records(combined, product_records, "test")
    np.testing.assert_allclose(probabilities, (first + second["label"]) / 2, atol=1e-6)


@pytest.mark.slow
def test_the_ensemble_is_calibrated_and_served_as_one_model(members, product_records, tmp_path):
    combined = ensemble(members)
    result = calibrate(combined, product_records, "val")
    assert combined.get_layer("head").temperature == result.temperature
    _, expected = predict_records(combined, product_records, "test")
    path = export_saved_model(combined, str(tmp_path / "saved"), custom_ops="error")
    signatures = tf.saved_model.load(path).signatures
    test = product_records.subset("test")
    inputs = {"image": tf.constant([open(p, "rb").read() for p in test.images]),
              "text": tf.constant(list(test.texts))}
    np.testing.assert_allclose(signatures["serving_default"](**inputs)["probabilities"].numpy(),
                               expected, atol=1e-4)
    width = embedding_model(combined).output_shape[-1]
    assert signatures["embed"](**inputs)["embedding"].shape == (len(test), width)
