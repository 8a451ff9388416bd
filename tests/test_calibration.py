"""Temperature scaling: the error it measures, the temperature it fits, and where it is applied."""

import numpy as np
import pytest
import tensorflow as tf

from keras_mmtl.calibration import calibrate, fit_temperature
from keras_mmtl.evaluation import (
    evaluate,
    expected_calibration_error,
    predict_records,
    rescale,
)
from keras_mmtl.data.pipeline import make_dataset
from keras_mmtl.export import export_saved_model
from keras_mmtl.models import build_classifier_for, describe, ensemble
from keras_mmtl.training import train
from keras_mmtl.training.losses import ClassificationLoss

SMALL = dict(image_backbone="small_cnn", image_weights=None, image_size=(16, 16))


def sampled(temperature, n=20000, classes=5, seed=0):
    """Logits, and labels drawn from softmax(logits / temperature): the truth is `temperature`."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, classes))
    truth = softmax(logits / temperature)
    labels = np.array([rng.choice(classes, p=p) for p in truth])
    return labels, softmax(logits), truth


def softmax(logits):
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_the_fitted_temperature_is_the_true_one(temperature):
    labels, probabilities, truth = sampled(temperature)
    assert fit_temperature(labels, probabilities) == pytest.approx(temperature, rel=0.05)
    # Probabilities drawn from are calibrated; the unscaled ones are not (unless T is 1).
    assert expected_calibration_error(labels, truth) < 0.02
    if temperature != 1.0:
        assert expected_calibration_error(labels, probabilities) > 0.05


def test_rescaling_keeps_the_predicted_class():
    _, probabilities, _ = sampled(2.0, n=100)
    for t in (0.3, 4.0):
        np.testing.assert_array_equal(rescale(probabilities, t).argmax(1), probabilities.argmax(1))
    np.testing.assert_allclose(rescale(rescale(probabilities, 3.0), 1 / 3.0), probabilities,
                               atol=1e-9)


@pytest.mark.parametrize("temperature", [0.2, 0.5, 2.0, 10.0])
def test_rescaling_undoes_a_float32_calibration(temperature):
    """Rescaling undoes a float32 calibration exactly while no class underflowed."""
    logits = np.random.default_rng(0).normal(0, 8, (1000, 4))
    calibrated = tf.nn.softmax(tf.constant(logits / temperature, tf.float32)).numpy()
    np.testing.assert_allclose(rescale(calibrated, 1 / temperature), softmax(logits), atol=1e-5)


@pytest.mark.parametrize("temperature", [0.05, 3.0])
def test_the_report_scores_the_served_answers_and_the_same_at_temperature_1(product_records,
                                                                           temperature):
    model = build_classifier_for(product_records, **SMALL)
    head = model.get_layer("head")
    # Classes 5.5 apart in the logits: sharpened by 1/0.05, all but the first underflow in
    # float32, so the served answers alone could not give back those at temperature 1.
    head.dense.bias.assign(5.5 * np.arange(head.dense.bias.shape[0]))
    _, raw = predict_records(model, product_records, "test")
    head.temperature = temperature
    _, served = predict_records(model, product_records, "test")
    report = evaluate(model, product_records, "test")
    labels = product_records.subset("test").labels
    assert report.ece == pytest.approx(expected_calibration_error(labels, served), abs=1e-6)
    assert report.ece_uncalibrated == pytest.approx(expected_calibration_error(labels, raw),
                                                    abs=1e-6)


@pytest.mark.slow
def test_calibration_is_set_in_the_head_and_served(tmp_path, product_records):
    model = build_classifier_for(product_records, **SMALL)
    train(model, product_records, str(tmp_path / "run"), epochs=8, patience=8,
          learning_rate=3e-3, verbose=0, projector=False)
    _, before = predict_records(model, product_records, "test")
    result = calibrate(model, product_records, "val")
    assert model.get_layer("head").temperature == result.temperature != 1.0
    assert result.nll_after <= result.nll_before  # (4 val rows: too few to judge the ECE)
    _, after = predict_records(model, product_records, "test")
    np.testing.assert_allclose(after, rescale(before, result.temperature), atol=1e-5)
    report = evaluate(model, product_records, "test")
    assert report.temperature == result.temperature
    labels = product_records.subset("test").labels
    assert report.ece_uncalibrated == pytest.approx(expected_calibration_error(labels, before),
                                                    abs=1e-4)
    assert report.to_dict()["ece"] == pytest.approx(expected_calibration_error(labels, after),
                                                    abs=1e-4)
    # The temperature travels with the saved model and inside the exported graph.
    model.save(str(tmp_path / "m.keras"))
    import keras

    assert keras.models.load_model(str(tmp_path / "m.keras")).get_layer(
        "head").temperature == result.temperature
    path = export_saved_model(model, str(tmp_path / "saved"))
    test = product_records.subset("test")
    served = tf.saved_model.load(path).signatures["serving_default"](
        image=tf.constant([open(p, "rb").read() for p in test.images]),
        text=tf.constant(list(test.texts)))
    np.testing.assert_allclose(served["probabilities"].numpy(), after, atol=1e-4)
    # Fitting again starts from the uncalibrated logits: the same temperature.
    assert calibrate(model, product_records, "val").temperature == pytest.approx(
        result.temperature, rel=1e-3)


@pytest.mark.parametrize("members", [1, 2])
def test_a_new_temperature_reaches_functions_already_compiled(product_records, members):
    models = [build_classifier_for(product_records, **SMALL) for _ in range(members)]
    model = models[0] if members == 1 else ensemble(models)
    model.compile(loss=ClassificationLoss())
    _, before = predict_records(model, product_records, "test")  # traces predict
    dataset = make_dataset(product_records, "test", **describe(model).dataset_arguments())
    loss = model.evaluate(dataset, verbose=0)  # traces evaluate
    model.get_layer("head").temperature = 4.0
    _, after = predict_records(model, product_records, "test")
    np.testing.assert_allclose(after, rescale(before, 4.0), atol=1e-5)
    assert model.evaluate(dataset, verbose=0) != pytest.approx(loss)
