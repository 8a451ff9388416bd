"""A third input of numeric (tabular) features: data, model, fusion, export."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import product_rows, write_manifest
from keras_mmtl.data import DataValidationError, from_arrays, read_manifest
from keras_mmtl.export import export_saved_model, latest_version, predict
from keras_mmtl.models import build_classifier_for, describe
from keras_mmtl.training import train


@pytest.fixture
def priced(tmp_path):
    rows = product_rows(str(tmp_path))
    for i, row in enumerate(rows):
        row["price"] = f"{10 + i}.5"
        row["weight"] = str(i % 3)
    return rows


def test_tabular_columns_are_read_and_checked(tmp_path, priced):
    records = read_manifest(write_manifest(str(tmp_path), priced), split_column="split",
                            tabular_columns=["price", "weight"])
    assert records.modalities == ("image", "text", "tabular")
    assert records.tabular.shape == (24, 2) and records.tabular[1, 0] == pytest.approx(11.5)
    priced[3]["price"] = "cheap"
    with pytest.raises(DataValidationError, match="manifest.csv:5: field 'price': 'cheap' is "
                                                  "not a number"):
        read_manifest(write_manifest(str(tmp_path), priced), split_column="split",
                      tabular_columns=["price", "weight"])


@pytest.mark.slow
def test_a_model_on_text_and_numbers_learns_and_exports(tmp_path):
    # The label is in the numbers only; the text says nothing.
    rng = np.random.default_rng(0)
    labels = ["cheap", "dear"] * 40
    tabular = np.array([[rng.normal(0 if label == "cheap" else 5, 1), rng.normal()]
                        for label in labels])
    records = from_arrays(labels, texts=["a thing"] * 80, tabular=tabular,
                          splits=(["train"] * 6 + ["val", "test"]) * 10)
    model = build_classifier_for(records, fusion="hierarchical")
    assert describe(model).modalities == ("text", "tabular")
    history = train(model, records, str(tmp_path / "run"), epochs=10, learning_rate=3e-3,
                    patience=10, verbose=0, projector=False)
    assert max(history["val_accuracy"]) == 1.0
    path = latest_version(export_saved_model(model, str(tmp_path / "export")))
    rows = records.subset("test")
    served = tf.saved_model.load(path).signatures["serving_default"](
        text=tf.constant(list(rows.texts)), tabular=tf.constant(rows.tabular))
    np.testing.assert_allclose(served["probabilities"].numpy(),
                               model({"text": tf.constant(list(rows.texts)),
                                      "tabular": tf.constant(rows.tabular)}), atol=1e-5)
    assert predict(path, texts=["a thing"], tabular=[[5.0, 0.0]], top_k=1)[0][0][0] == "dear"
