"""TFLite export: the graph after the tokenizer, three quantizations, the ops raw strings need."""

import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_mmtl.data.pipeline import make_dataset
from keras_mmtl.evaluation import predict_records
from keras_mmtl.models import build_classifier, build_classifier_for, describe, mirror_averaged
from keras_mmtl.tflite import (
    convert,
    export_tflite,
    interpreter,
    string_ops,
    tflite_graph,
    tflite_predict,
)
from keras_mmtl.training.trainer import compile_classifier

SMALL = dict(image_backbone="mobilenet_v2_0.35", image_weights=None, image_size=(32, 32))


@pytest.fixture
def model(product_records):
    return build_classifier_for(product_records, missing_modalities=True, **SMALL)


def test_the_tflite_graph_takes_token_ids(model):
    graph = tflite_graph(model)
    assert sorted(graph.input) == ["image", "image_present", "text_ids", "text_present"]
    assert graph.input["text_ids"].shape[1:] == (128,) and graph.input["text_ids"].dtype == "int32"
    with pytest.raises(ValueError, match="needs the 'scratch' text encoder"):
        tflite_graph(build_classifier(["a", "b"], image_backbone=None, text_encoder="tfidf",
                                      text_vocabulary={"x": 1.0}))
    with pytest.raises(ValueError, match="one output"):
        tflite_graph(build_classifier({"a": ["x", "y"], "b": ["u", "v"]}, image_backbone=None,
                                      text_vocabulary=["x"]))
    with pytest.raises(ValueError, match="inside members"):
        tflite_graph(mirror_averaged(model))


def test_raw_strings_would_need_the_flex_ops_of_the_tokenizer(product_records):
    # The text branch's ops: a small CNN for the image converts in seconds.
    model = build_classifier_for(product_records, missing_modalities=True,
                                 image_backbone="small_cnn", image_weights=None,
                                 image_size=(16, 16))
    assert string_ops(model) == ["RaggedTensorToTensor", "StaticRegexReplace", "StringLower",
                                 "StringSplitV2"]


def _trained_on_products(records):
    """A small classifier trained on the products, whose classes need both inputs.

    The label is the colour (image) and the word (text), so a TFLite model that
    misreads the pixels or the token ids picks other classes. A small CNN converts
    in 2 s where MobileNetV2 takes 18 s.
    """
    keras.utils.set_random_seed(0)
    model = build_classifier_for(records, missing_modalities=True, image_backbone="small_cnn",
                                 image_weights=None, image_size=(16, 16))
    compile_classifier(model, 3e-3)
    model.fit(make_dataset(records, "train", **describe(model).dataset_arguments(), batch_size=8),
              epochs=8, shuffle=False, verbose=0)
    return model


@pytest.mark.slow
def test_each_quantization_answers_like_the_keras_model(product_records, tmp_path):
    model = _trained_on_products(product_records)
    labels, expected = predict_records(model, product_records, None)  # all 24 rows
    # The known answer: right where an image-only or a text-only model is right on half.
    assert (expected.argmax(1) == labels).mean() >= 0.9
    sizes = {}
    # quantization -> (probability tolerance, share of rows whose top class must agree)
    for quantization, (tolerance, agreement) in {
            "float32": (1e-5, 1.0), "float16": (5e-3, 1.0), "int8": (2e-2, 0.9)}.items():
        path = export_tflite(model, str(tmp_path / f"m.{quantization}.tflite"), quantization)
        sizes[quantization] = (tmp_path / f"m.{quantization}.tflite").stat().st_size
        _, probabilities = tflite_predict(path, model, product_records, None)
        agree = (probabilities.argmax(1) == expected.argmax(1)).mean()
        assert agree >= agreement, (quantization, agree)
        np.testing.assert_allclose(probabilities, expected, atol=tolerance, err_msg=quantization)
    assert sizes["int8"] < 0.4 * sizes["float32"] and sizes["float16"] < 0.6 * sizes["float32"]
    vocabulary = (tmp_path / "m.int8.vocab.txt").read_text(encoding="utf-8").splitlines()
    assert vocabulary == model.get_layer("text_tokenizer").vocabulary
    with pytest.raises(ValueError, match="Unknown quantization 'int4'"):
        convert(model, "int4")


TF_LITE_DEPRECATED = "tf.lite.Interpreter is deprecated"


@pytest.mark.slow
def test_litert_runs_the_model_when_installed_and_answers_like_keras(model, product_records,
                                                                      monkeypatch):
    litert = pytest.importorskip("ai_edge_litert.interpreter")
    flatbuffer = convert(model)
    assert isinstance(interpreter(flatbuffer), litert.Interpreter)
    _, expected = predict_records(model, product_records, "test")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, probabilities = tflite_predict(flatbuffer, model, product_records, "test")
    assert not [w for w in caught if TF_LITE_DEPRECATED in str(w.message)]
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    # Without LiteRT (no wheel for the platform), TensorFlow's interpreter answers the same.
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    with pytest.warns(UserWarning, match=TF_LITE_DEPRECATED):
        assert type(interpreter(flatbuffer)) is tf.lite.Interpreter
    with pytest.warns(UserWarning, match=TF_LITE_DEPRECATED):
        _, fallback = tflite_predict(flatbuffer, model, product_records, "test")
    np.testing.assert_allclose(fallback, expected, atol=1e-5)
