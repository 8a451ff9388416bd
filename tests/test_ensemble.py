"""Ensembles of trained classifiers: averaged probabilities, saved, calibrated and served as one."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_mmtl.calibration import calibrate
from keras_mmtl.data.pipeline import make_dataset
from keras_mmtl.evaluation import evaluate, predict_records, rescale
from keras_mmtl.export import export_saved_model
from keras_mmtl.models import (
    build_classifier,
    build_classifier_for,
    embedding_model,
    ensemble,
    mirror_averaged,
)
from keras_mmtl.models.builder import head_name

SMALL = dict(image_backbone="small_cnn", image_weights=None, image_size=(16, 16))


@pytest.fixture
def inputs(product_records):
    """All the products as one batch of decoded inputs, in order (one pipeline for the test)."""
    (batch, _), = make_dataset(product_records, image_size=SMALL["image_size"],
                               batch_size=len(product_records))
    return batch


def _answers(model, inputs):
    """`model`'s outputs on the inputs it takes, from one eager call (nothing to trace)."""
    outputs = model({name: inputs[name] for name in model.input}, training=False)
    return ({name: output.numpy() for name, output in outputs.items()}
            if isinstance(outputs, dict) else outputs.numpy())


def _fit_head(model, records, inputs, scale=3.0, head="head"):
    """Fits the head to the train rows by least squares on the model's own features.

    A trained member in a tenth of a second: right on the train rows, unsure and unlike
    the other members elsewhere, so a mean of the members differs from each of them and
    from their geometric mean.
    """
    train = records.splits == "train"
    features = _answers(embedding_model(model), inputs)[train]
    features = np.concatenate([features, np.ones((len(features), 1))], axis=1)  # the bias
    targets = scale * np.eye(len(records.class_names))[records.labels[train]]
    solution = np.linalg.lstsq(features, targets, rcond=None)[0]
    model.get_layer(head).dense.kernel.assign(solution[:-1])
    model.get_layer(head).dense.bias.assign(solution[-1])
    return model


def _geometric(*probabilities):
    geometric = np.exp(np.mean(np.log(probabilities), axis=0))
    return geometric / geometric.sum(axis=1, keepdims=True)


@pytest.fixture
def members(product_records, inputs):
    models = []
    # A sure member and an unsure one: they disagree by 0.4-0.5 and their mean is 0.04-0.08
    # from their geometric mean, over seeds (a clean-clone run varied them by a few hundredths).
    for seed, fusion, scale in ((1, "concat", 3.0), (2, "gated", 1.0)):
        keras.utils.set_random_seed(seed)
        models.append(_fit_head(build_classifier_for(product_records, fusion=fusion, **SMALL),
                                product_records, inputs, scale=scale))
    return models


def test_the_ensemble_averages_its_members(members, product_records, inputs, tmp_path):
    combined = ensemble(members)
    first, second = (_answers(m, inputs) for m in members)  # all 24 rows
    # The members disagree, and their mean is not their geometric mean: the check below
    # tells the mean from either member and from the other combination.
    assert np.abs(first - second).max() > 0.2
    mean = (first + second) / 2
    assert np.abs(mean - _geometric(first, second)).max() > 0.01
    _, probabilities = predict_records(combined, product_records)
    np.testing.assert_allclose(probabilities, mean, atol=1e-6)
    test = product_records.splits == "test"
    assert evaluate(combined, product_records, "test").accuracy == pytest.approx(
        np.mean(mean[test].argmax(axis=1) == product_records.labels[test]))
    widths = [embedding_model(m).output_shape[-1] for m in members]  # concat 512, gated 256
    assert embedding_model(combined).output_shape == (None, sum(widths))
    path = str(tmp_path / "ensemble.keras")
    combined.save(path)
    _, again = predict_records(keras.models.load_model(path), product_records)
    np.testing.assert_allclose(again, probabilities, atol=1e-6)
    # A copy: the members can change without changing it.
    members[0].get_layer("head").dense.kernel.assign(
        np.zeros_like(members[0].get_layer("head").dense.kernel))
    _, after = predict_records(combined, product_records)
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


def test_a_fused_model_and_a_model_of_one_input_combine_geometrically(product_records, inputs,
                                                                     tmp_path):
    keras.utils.set_random_seed(4)
    fused = _fit_head(build_classifier_for(product_records, **SMALL), product_records, inputs)
    image_only = _fit_head(build_classifier_for(product_records, modalities=("image",), **SMALL),
                           product_records, inputs)
    combined = ensemble([fused, image_only], combine="geometric")
    assert sorted(combined.input) == ["image", "text"]
    first, second = (_answers(m, inputs) for m in (fused, image_only))
    _, probabilities = predict_records(combined, product_records)
    geometric = _geometric(first, second)
    assert np.abs(geometric - (first + second) / 2).max() > 0.01  # not the plain mean
    np.testing.assert_allclose(probabilities, geometric, atol=1e-5)
    combined.save(tmp_path / "ensemble.keras")
    _, again = predict_records(keras.models.load_model(tmp_path / "ensemble.keras"),
                               product_records)
    np.testing.assert_allclose(again, probabilities, atol=1e-6)


def test_members_with_auxiliary_heads_take_part_with_their_main_head(product_records, inputs):
    keras.utils.set_random_seed(3)
    plain = _fit_head(build_classifier_for(product_records, **SMALL), product_records, inputs)
    deep = build_classifier_for(product_records, auxiliary_heads=True, **SMALL)
    # The main head fitted, the auxiliary ones left random: each answers differently.
    deep = _fit_head(deep, product_records, inputs, head=head_name("label"))
    second = _answers(deep, inputs)
    auxiliary = [name for name in second if name != "label"]
    assert auxiliary and all(np.abs(second[name] - second["label"]).max() > 0.2
                             for name in auxiliary)
    combined = ensemble([plain, deep])
    assert not isinstance(combined.output, dict)  # one output: the auxiliary heads are left out
    expected = (_answers(plain, inputs) + second["label"]) / 2
    np.testing.assert_allclose(_answers(combined, inputs), expected, atol=1e-6)


@pytest.mark.slow
def test_the_ensemble_is_calibrated_and_served_as_one_model(members, product_records, inputs,
                                                            tmp_path):
    combined = ensemble(members)
    # The members are right on the val rows, by small margins that vary between CPUs: one
    # label set to the class the ensemble finds least likely gives the temperature a sure
    # mistake to soften (else it sharpens to its bound, and the served probabilities would
    # be 0 and 1 whatever the export did).
    labels = product_records.labels.copy()
    (wrong, *_) = np.flatnonzero(product_records.splits == "val")
    labels[wrong] = _answers(combined, inputs)[wrong].argmin()
    result = calibrate(combined, dataclasses.replace(product_records, labels=labels), "val")
    assert 0.06 < result.temperature < 19  # inside the search's bounds (0.05, 20)
    assert combined.get_layer("head").temperature == result.temperature
    first, second = (_answers(m, inputs) for m in members)  # all 24 rows
    expected = rescale((first + second) / 2, result.temperature)
    assert expected.max(axis=1).min() < 0.9  # unsure on some rows: room to differ
    path = export_saved_model(combined, str(tmp_path / "saved"), custom_ops="error")
    signatures = tf.saved_model.load(path).signatures
    request = {"image": tf.constant([open(p, "rb").read() for p in product_records.images]),
               "text": tf.constant(list(product_records.texts))}
    np.testing.assert_allclose(signatures["serving_default"](**request)["probabilities"].numpy(),
                               expected, atol=1e-4)
    width = embedding_model(combined).output_shape[-1]
    assert signatures["embed"](**request)["embedding"].shape == (len(product_records), width)


def test_the_mirror_averaged_model_averages_each_image_and_its_mirror(members, tmp_path):
    model = members[0]
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (6, *SMALL["image_size"], 3)).astype("float32")
    inputs = {"image": tf.constant(images),
              "text": tf.constant(["a nice cotton thing", "wool", "", "silk", "x", "a b c"])}
    mirror = {**inputs, "image": tf.constant(images[:, :, ::-1])}
    plain, flipped = _answers(model, inputs), _answers(model, mirror)
    assert np.abs(plain - flipped).max() > 1e-3  # the model tells an image from its mirror
    averaged = mirror_averaged(model)
    assert averaged.name == model.name and sorted(averaged.input) == ["image", "text"]
    np.testing.assert_allclose(_answers(averaged, inputs), (plain + flipped) / 2, atol=1e-6)
    path = str(tmp_path / "mirrored.keras")
    averaged.save(path)
    np.testing.assert_allclose(_answers(keras.models.load_model(path), inputs),
                               (plain + flipped) / 2, atol=1e-6)
    # A copy, and one copy of the trunk: twice the head, not twice the model.
    model.get_layer("head").dense.bias.assign(np.full(model.get_layer("head").dense.bias.shape, 5.))
    np.testing.assert_allclose(_answers(averaged, inputs), (plain + flipped) / 2, atol=1e-6)
    assert len(averaged.weights) == len(model.weights) + len(model.get_layer("head").weights)


def test_only_a_classifier_of_images_and_one_task_is_mirrored():
    with pytest.raises(ValueError, match="takes no image"):
        mirror_averaged(build_classifier(["a", "b"], image_backbone=None, text_vocabulary=["x"]))
    two_tasks = build_classifier({"a": ["x", "y"], "b": ["u", "v"]}, **SMALL,
                                 text_vocabulary=["x"])
    with pytest.raises(ValueError, match="one task"):
        mirror_averaged(two_tasks)
