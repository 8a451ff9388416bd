"""Samples without their image or text: data, model, training, export and the modality report."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import COLOURS, product_rows, write_image, write_manifest
from keras_mmtl import evaluation
from keras_mmtl.data import DataValidationError, from_arrays, make_dataset, read_manifest
from keras_mmtl.evaluation import modality_report
from keras_mmtl.export import export_saved_model, latest_version
from keras_mmtl.models import ModalityDropout, build_classifier_for, describe
from keras_mmtl.training import train

SMALL = dict(image_backbone="small_cnn", image_weights=None, image_size=(16, 16))


@pytest.fixture
def gappy(tmp_path):
    """The products manifest with some images and some texts left out."""
    rows = product_rows(str(tmp_path))
    for i, row in enumerate(rows):
        if i % 6 == 1:
            row["image"] = ""
        elif i % 6 == 2:
            row["text"] = ""
    return write_manifest(str(tmp_path), rows)


def test_rows_may_lack_one_modality_but_not_both(gappy, tmp_path):
    with pytest.raises(DataValidationError, match="empty image path"):
        read_manifest(gappy, split_column="split")
    records = read_manifest(gappy, split_column="split", allow_missing=True)
    assert (~records.present("image")).sum() == 4 and (~records.present("text")).sum() == 4
    rows = product_rows(str(tmp_path / "both"))
    rows[0].update(image="", text="")
    with pytest.raises(DataValidationError, match="manifest.csv:2: field .image and text.: no input at all"):
        read_manifest(write_manifest(str(tmp_path / "both"), rows), split_column="split",
                      allow_missing=True)


def test_the_pipeline_yields_presence_and_black_images(gappy):
    records = read_manifest(gappy, split_column="split", allow_missing=True)
    with pytest.raises(ValueError, match="4 rows have no image.*missing_modalities=True"):
        make_dataset(records, image_size=(8, 8))
    features, _ = next(iter(make_dataset(records, image_size=(8, 8), batch_size=24,
                                         presence=("image", "text"))))
    image_present = features["image_present"].numpy()
    np.testing.assert_array_equal(image_present, records.present("image"))
    np.testing.assert_array_equal(features["text_present"].numpy(), records.present("text"))
    assert float(tf.reduce_max(features["image"][image_present == 0])) == 0.0


def test_a_missing_modality_is_replaced_by_the_learned_embedding(product_records):
    model = build_classifier_for(product_records, missing_modalities=True, **SMALL)
    assert set(model.input) == {"image", "text", "image_present", "text_present"}
    rng = np.random.default_rng(0)
    texts = np.array(["a nice cotton thing", "wool"])
    probabilities = [model({"image": rng.uniform(0, 255, (2, 16, 16, 3)), "text": texts,
                            "image_present": np.zeros(2), "text_present": np.ones(2)})
                     for _ in range(2)]
    np.testing.assert_allclose(*probabilities, atol=1e-6)  # the image is not looked at


@pytest.mark.parametrize("cache", [True, False])
def test_training_with_modality_dropout_saves_and_reloads(tmp_path, gappy, cache):
    records = read_manifest(gappy, split_column="split", allow_missing=True)
    model = build_classifier_for(records, modality_dropout=0.3, **SMALL)
    train(model, records, str(tmp_path / "run"), epochs=2, fine_tune_epochs=0, batch_size=8,
          cache_features=cache, verbose=0, projector=False)
    loaded = keras.models.load_model(str(tmp_path / "run" / "model.keras"))
    assert isinstance(loaded.get_layer("modality_dropout"), ModalityDropout)
    data = make_dataset(records, "test", **describe(model).dataset_arguments(), batch_size=8)
    features = next(iter(data))[0]
    np.testing.assert_allclose(model(features), loaded(features), atol=1e-5)


def test_the_export_answers_requests_without_image_or_text(tmp_path, gappy):
    records = read_manifest(gappy, split_column="split", allow_missing=True)
    model = build_classifier_for(records, missing_modalities=True, **SMALL)
    path = latest_version(export_saved_model(model, str(tmp_path / "export")))
    serve = tf.saved_model.load(path).signatures["serving_default"]
    image = tf.io.encode_jpeg(tf.fill((16, 16, 3), tf.constant(200, tf.uint8))).numpy()
    answers = serve(image=tf.constant([image, b"", image]),
                    text=tf.constant(["", "a nice wool thing", "  "]))["probabilities"].numpy()
    expected = model({"image": np.stack([np.full((16, 16, 3), 200.0), np.zeros((16, 16, 3)),
                                         np.full((16, 16, 3), 200.0)]),
                      "text": np.array(["", "a nice wool thing", ""]),
                      "image_present": np.array([1.0, 0.0, 1.0]),
                      "text_present": np.array([0.0, 1.0, 0.0])})
    np.testing.assert_allclose(answers, expected, atol=1e-4)


@pytest.mark.slow
def test_modality_dropout_keeps_a_model_accurate_without_its_text(tmp_path, monkeypatch):
    # Image and text both tell the colour; text is easier, so a model trained
    # with both leans on it. Modality dropout makes it use the image too.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 240)
    names = list(COLOURS)
    images = []
    for i, label in enumerate(labels):
        path = str(tmp_path / f"{i}.png")
        write_image(path, COLOURS[names[label]], fmt="png")
        images.append(path)
    texts = [f"item {names[label]} {i}" for i, label in enumerate(labels)]
    splits = ["train"] * 160 + ["val"] * 40 + ["test"] * 40
    records = from_arrays([names[label] for label in labels], images=images, texts=texts,
                          splits=splits)
    model = build_classifier_for(records, modality_dropout=0.5, **SMALL)
    train(model, records, str(tmp_path / "run"), epochs=8, fine_tune_epochs=0, batch_size=16,
          learning_rate=3e-3, patience=8, verbose=0, projector=False)
    report = modality_report(model, records, "test", out_dir=str(tmp_path / "eval"))
    assert set(report.rows) == {"all inputs", "without image", "without text"}
    assert report.rows["all inputs"]["accuracy"] >= 0.95
    assert report.rows["without text"]["accuracy"] >= 0.9
    assert report.rows["without image"]["accuracy"] >= 0.9
    assert os.path.exists(tmp_path / "eval" / "modalities.json")
    # With evaluate's report of the split, the model runs once per condition in all.
    passes, predict = [], evaluation.predict_records
    monkeypatch.setattr(evaluation, "predict_records",
                        lambda *args, **kwargs: passes.append(1) or predict(*args, **kwargs))
    again = modality_report(model, records, "test", scored=evaluation.evaluate(model, records))
    assert len(passes) == 3
    for condition, row in report.rows.items():
        assert again.rows[condition] == pytest.approx(row)


@pytest.mark.parametrize("layer", [ModalityDropout(0.3, seed=2)])
def test_modality_dropout_round_trips_and_keeps_one_modality(layer):
    copy = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert copy.get_config() == layer.get_config()
    masks = [np.ones(1000, "float32"), np.ones(1000, "float32")]
    kept = np.stack([m.numpy() for m in layer(masks, training=True)])
    assert kept.sum(axis=0).min() == 1  # never both hidden
    # Each modality is hidden about rate of the time (less: one is always kept).
    assert 0.15 < 1 - kept[0].mean() < 0.3


def test_a_model_with_one_modality_cannot_miss_it(product_records):
    with pytest.raises(ValueError, match="need two or more inputs"):
        build_classifier_for(product_records, modalities=("text",), missing_modalities=True)
