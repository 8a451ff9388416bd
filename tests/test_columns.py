"""Several image or text columns: shared branches, one fusion input each, served by name."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import product_rows, write_image, write_manifest
from keras_mmtl.data import DataValidationError, make_dataset, read_manifest
from keras_mmtl.evaluation import evaluate, modality_report
from keras_mmtl.export import export_saved_model, predict
from keras_mmtl.models import build_classifier, build_classifier_for, describe
from keras_mmtl.training import train
from keras_mmtl.training.cache import cacheable_outputs

SMALL = dict(image_backbone="small_cnn", image_weights=None, image_size=(16, 16))
COLUMNS = dict(image_column=["front", "back"], text_column=["title", "description"],
               split_column="split")
INPUTS = ["image", "image_2", "text", "text_2"]


def two_sided_rows(folder, n=48):
    """Products whose label is the colour of the *back* photo + the material in the *description*.

    The front photo and the title are the same for every class: a model must read the
    second column of each kind.
    """
    grey = "images/front.jpg"
    rows = product_rows(folder, n)
    write_image(os.path.join(folder, grey), (128, 128, 128))
    return [{"front": grey, "back": row.pop("image"), "title": "a nice thing",
             "description": row.pop("text"), **row} for row in rows]


@pytest.fixture
def two_sided(tmp_path):
    return write_manifest(str(tmp_path), two_sided_rows(str(tmp_path)))


@pytest.fixture
def records(two_sided):
    return read_manifest(two_sided, **COLUMNS)


def test_more_columns_are_more_inputs(records, two_sided):
    assert records.modalities == tuple(INPUTS)
    assert records.inputs("text_2")[0] == "a nice cotton thing"
    assert records.inputs("image_2")[0].endswith("000.jpg")
    test = records.subset("test")
    assert len(test.inputs("image_2")) == len(test) == 8
    without = test.without("text_2", np.arange(8) < 3)
    assert without.present("text_2").tolist() == [False] * 3 + [True] * 5
    assert without.present("text").all()
    features, _ = next(iter(make_dataset(records, "train", image_size=(8, 8), batch_size=4)))
    assert sorted(features) == sorted(INPUTS) and features["image_2"].shape == (4, 8, 8, 3)


@pytest.mark.bad_input
def test_bad_rows_name_the_column(tmp_path):
    rows = two_sided_rows(str(tmp_path), 12)
    rows[2]["back"] = "images/nothing.jpg"
    rows[4]["description"] = ""
    path = write_manifest(str(tmp_path), rows)
    with pytest.raises(DataValidationError) as error:
        read_manifest(path, **COLUMNS)
    assert "manifest.csv:4: field 'back': image file not found" in str(error.value)
    assert "manifest.csv:6: field 'description': empty text" in str(error.value)
    rows[2]["back"] = rows[3]["back"]
    for name in ("front", "back", "title"):
        rows[4][name] = ""
    with pytest.raises(DataValidationError, match="field 'front and back and title and "
                                                  "description': no input at all"):
        read_manifest(write_manifest(str(tmp_path), rows), **COLUMNS, allow_missing=True)
    rows[4]["title"] = "a title alone"
    gappy = read_manifest(write_manifest(str(tmp_path), rows), **COLUMNS, allow_missing=True)
    assert (~gappy.present("image_2")).sum() == 1 and (~gappy.present("text_2")).sum() == 1


def test_inputs_of_a_kind_share_their_branch(records, tmp_path):
    model = build_classifier_for(records, **SMALL)
    assert list(model.input) == INPUTS
    layers = {layer.name: layer for layer in model.layers}
    assert len(layers["image_backbone"]._inbound_nodes) == 2
    assert len(layers["text_embedding"]._inbound_nodes) == 2
    assert len(model.get_layer("fusion").projections) == 4
    # One vocabulary for both text columns.
    assert {"nice", "cotton", "wool"} <= set(layers["text_tokenizer"].vocabulary)
    assert cacheable_outputs(model) == {"text": ("text_tokenizer",), "text_2": ("text_tokenizer",)}
    features, _ = next(iter(make_dataset(records, "test", **describe(model).dataset_arguments())))
    path = str(tmp_path / "m.keras")
    model.save(path)
    np.testing.assert_allclose(keras.models.load_model(path).predict(features, verbose=0),
                               model.predict(features, verbose=0), atol=1e-6)


def test_the_builder_checks_the_input_names():
    with pytest.raises(ValueError, match="numbered from 1 without gaps"):
        build_classifier(["a", "b"], image_backbone=None, text_vocabulary=["x"],
                         modalities=["text", "text_3"])
    with pytest.raises(ValueError, match="need the branches"):
        build_classifier(["a", "b"], image_backbone=None, text_vocabulary=["x"],
                         modalities=["text", "image"])


@pytest.mark.slow
def test_the_second_columns_are_learned_scored_and_served(records, tmp_path):
    model = build_classifier_for(records, missing_modalities=True, **SMALL)
    train(model, records, str(tmp_path / "run"), epochs=12, patience=12, learning_rate=1e-2,
          verbose=0, projector=False)
    assert evaluate(model, records, "test").accuracy == 1.0
    report = modality_report(model, records, "test")
    assert list(report.rows) == ["all inputs", *(f"without {name}" for name in INPUTS)]
    assert report.rows["without text"]["accuracy"] == 1.0  # the title tells nothing
    assert report.rows["without text_2"]["accuracy"] < 0.8
    path = export_saved_model(model, str(tmp_path / "saved"))
    signature = tf.saved_model.load(path).signatures["serving_default"]
    assert sorted(signature.structured_input_signature[1]) == INPUTS
    test = records.subset("test")
    images, back = list(test.images[:4]), list(test.inputs("image_2")[:4])
    texts, description = list(test.texts[:4]), ["", *test.inputs("text_2")[1:4]]
    served = predict(path, images=images, texts=texts, image_2=back, text_2=description)
    local = predict(model, images=images, texts=texts, image_2=back, text_2=description)
    for got, want in zip(served, local):
        assert [label for label, _ in got] == [label for label, _ in want]
        np.testing.assert_allclose([p for _, p in got], [p for _, p in want], atol=1e-4)
    with pytest.raises(ValueError, match=r"no inputs \['text_3'\]"):
        predict(model, images=images, texts=texts, text_3=texts)


def test_config_and_cli_take_several_columns():
    from keras_mmtl.cli import build_parser
    from keras_mmtl.config import from_arguments

    args = build_parser().parse_args(["train", "--image-column", "front", "back",
                                      "--text-column", "title", "--label-column", "label"])
    config = from_arguments(args)
    assert config.data.image_column == ["front", "back"] and config.data.text_column == "title"
    args = build_parser().parse_args(["train", "--image-column", "none"])
    assert from_arguments(args).data.image_column is None
