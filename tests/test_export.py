import os
import time
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_mmtl.export
from conftest import product_rows, write_manifest
from keras_mmtl.data import make_dataset, read_manifest
from keras_mmtl.evaluation import predict_records
from keras_mmtl.export import export_saved_model, predict, serving_function
from keras_mmtl.models import build_classifier_for, describe, embedding_model
from keras_mmtl.op_audit import OpAuditError, custom_ops, saved_model_ops


def _model(records, modalities, **kwargs):
    return build_classifier_for(records, modalities=modalities, image_backbone="mobilenet_v2_0.35",
                                image_weights=None, image_size=(32, 32), **kwargs)


def test_versions_increase_and_are_never_overwritten(tmp_path, product_records):
    model = _model(product_records, ("text",))
    base = str(tmp_path / "products")
    assert export_saved_model(model, base).endswith(os.path.join("products", "1"))
    assert export_saved_model(model, base).endswith(os.path.join("products", "2"))
    with pytest.raises(FileExistsError, match="never overwritten"):
        export_saved_model(model, base, version=1)
    assert sorted(os.listdir(base)) == ["1", "2"]


@pytest.mark.parametrize("step", ["write_out", "write_warmup_requests"])
def test_crash_while_writing_leaves_no_version(tmp_path, product_records, monkeypatch, step):
    def crash(*args, **kwargs):
        if step == "write_out":  # a half-written SavedModel
            os.makedirs(os.path.join(args[1], "variables"))
        raise OSError("disk full")

    where = type(keras.export.ExportArchive()) if step == "write_out" else keras_mmtl.export
    monkeypatch.setattr(where, step, crash)
    with pytest.raises(OSError, match="disk full"):
        export_saved_model(_model(product_records, ("text",)), str(tmp_path / "m"))
    assert os.listdir(tmp_path / "m") == []


def test_a_killed_exports_staging_folder_is_removed_by_the_next_export(tmp_path,
                                                                      product_records):
    base = tmp_path / "m"
    killed, writing = base / ".tmp-1-killed", base / ".tmp-1-another-export-writing"
    for folder in (killed, writing):
        (folder / "variables").mkdir(parents=True)
    hours_ago = time.time() - 2 * 3600
    os.utime(killed, (hours_ago, hours_ago))
    export_saved_model(_model(product_records, ("text",)), str(base))
    assert sorted(os.listdir(base)) == [".tmp-1-another-export-writing", "1"]


@pytest.mark.bad_input
def test_serving_refuses_an_image_over_the_pixel_limit(tmp_path, products, product_records):
    serve, signature = serving_function(_model(product_records, ("image", "text")),
                                        max_megapixels=0.0002)  # the 16x16 images: 0.000256
    serve = tf.function(serve, input_signature=signature)
    image = open(os.path.join(os.path.dirname(products), "images", "000.jpg"), "rb").read()
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="image too large: 16 x 16 pixels = 0.000256 megapixels, over the "
                             "limit of 0.0002 megapixels"):
        serve(tf.constant([image]), tf.constant(["a nice wool thing"]))


JPEG = tf.io.encode_jpeg(tf.fill((16, 16, 3), tf.constant(90, tf.uint8))).numpy()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The serving functions (traced, as in a SavedModel) of a model that needs both inputs
    and of one that takes them missing."""
    folder = str(tmp_path_factory.mktemp("products"))
    records = read_manifest(write_manifest(folder, product_rows(folder)), split_column="split")
    functions = {}
    for missing in (False, True):
        serve, signature = serving_function(_model(records, ("image", "text"),
                                                   missing_modalities=missing))
        functions[missing] = tf.function(serve, input_signature=signature)
    return functions


@pytest.mark.bad_input
@pytest.mark.parametrize("missing, images, texts, message", [
    (False, [], [], "The request has no samples"),
    (False, [JPEG, JPEG], ["wool cap"], "Inputs image and text have different numbers"),
    (False, [JPEG, b"<html>", JPEG, b"\x89PN"], ["a"] * 4,
     "Input image: items that are not a JPEG/PNG/GIF/BMP/WebP image (0-based):] [1 3]"),
    (False, [JPEG] * 3, ["wool cap", " ", ""],
     "Input text: items that are empty or not UTF-8 text (0-based):] [1 2]"),
    (False, [JPEG] * 2, [b"wool \xff cap", "cap"],
     "Input text: items that are empty or not UTF-8 text (0-based):] [0]"),
    (True, [JPEG, b"", b"GIF"], ["", "cap", "wool"],
     "Input image: items that are not a JPEG/PNG/GIF/BMP/WebP image (0-based):] [2]"),
    (True, [JPEG] * 2, ["", b"\xc3("], "Input text: items that are not UTF-8 text (0-based):] [1]"),
])
def test_a_request_that_cannot_be_answered_names_its_items(served, missing, images, texts,
                                                           message):
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        served[missing](tf.constant(images, tf.string), tf.constant(texts, tf.string))
    assert message in error.value.message


def test_empty_inputs_are_missing_samples_for_a_model_that_takes_them(served):
    answer = served[True](tf.constant([JPEG, b""]), tf.constant(["", "wool cap"]))
    assert answer["probabilities"].shape[0] == 2


FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    import tensorflow as tf  # alone: the default export needs core ops only
    for path, request in json.load(open(sys.argv[1])):
        signatures = tf.saved_model.load(path).signatures
        inputs = {}
        if "images" in request:
            inputs["image"] = tf.constant([open(p, "rb").read() for p in request["images"]])
        if "texts" in request:
            inputs["text"] = tf.constant(request["texts"])
        out = signatures["serving_default"](**inputs)
        print(json.dumps({
            "probabilities": out["probabilities"].numpy().tolist(),
            "label": [x.decode() for x in out["label"].numpy()],
            "embedding": signatures["embed"](**inputs)["embedding"].numpy().tolist(),
            "modules": sorted(m for m in sys.modules if m.startswith("tensorflow_"))}))
""")


@pytest.mark.slow
def test_export_answers_like_the_keras_model_in_a_fresh_process(tmp_path, product_records):
    import json

    test = product_records.subset("test")
    models, requests = [], []
    for modalities in (("image", "text"), ("image",), ("text",)):
        model = _model(product_records, modalities)
        path = export_saved_model(model, str(tmp_path / "+".join(modalities)))
        request = {}
        if "image" in modalities:
            request["images"] = list(test.images)
        if "text" in modalities:
            request["texts"] = list(test.texts)
        models.append(model)
        requests.append([path, request])
    (tmp_path / "requests.json").write_text(json.dumps(requests))
    (tmp_path / "serve.py").write_text(FRESH_PROCESS)
    result = subprocess.run(  # one fresh process serves the three exports
        [sys.executable, str(tmp_path / "serve.py"), str(tmp_path / "requests.json")],
        capture_output=True, text=True, check=True, cwd=str(tmp_path))
    answers = [json.loads(line) for line in result.stdout.strip().splitlines()[-3:]]
    for model, served in zip(models, answers):
        assert "tensorflow_text" not in served["modules"]
        _, expected = predict_records(model, product_records, "test")
        np.testing.assert_allclose(served["probabilities"], expected, atol=1e-4)
        names = [model.get_layer("head").class_names[i] for i in expected.argmax(axis=1)]
        assert served["label"] == names
        features = make_dataset(product_records, "test", **describe(model).dataset_arguments(),
                                batch_size=64)
        embeddings = embedding_model(model).predict(features.map(lambda x, y: x), verbose=0)
        np.testing.assert_allclose(served["embedding"], embeddings, atol=1e-4)


@pytest.mark.slow
def test_saved_model_cli_lists_the_serving_signature(tmp_path, product_records):
    # The signature, not the backbone, is listed: a small CNN exports in seconds.
    model = build_classifier_for(product_records, image_backbone="small_cnn", image_weights=None,
                                 image_size=(16, 16))
    path = export_saved_model(model, str(tmp_path / "m"))
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    result = subprocess.run([cli, "show", "--dir", path, "--all"], capture_output=True,
                            text=True, check=True)
    out = result.stdout
    assert "signature_def['serving_default']" in out
    for name in ("inputs['image']", "inputs['text']", "outputs['probabilities']",
                 "outputs['label']", "outputs['top_labels']"):
        assert name in out
    assert "dtype: DT_STRING" in out


@pytest.mark.slow
def test_predict_from_keras_model_and_export_agree(tmp_path, product_records):
    model = _model(product_records, ("image", "text"))
    test = product_records.subset("test")
    path = export_saved_model(model, str(tmp_path / "m"))
    with open(test.images[0], "rb") as f:
        image = f.read()
    from_model = predict(model, [image], [test.texts[0]], top_k=3)
    from_export = predict(os.path.dirname(path), [test.images[0]], [test.texts[0]], top_k=3)
    assert [name for name, _ in from_model[0]] == [name for name, _ in from_export[0]]
    np.testing.assert_allclose([p for _, p in from_model[0]], [p for _, p in from_export[0]],
                               atol=1e-5)
    with pytest.raises(ValueError, match="missing: \\['text'\\]"):
        predict(model, [image])


@pytest.mark.parametrize("tokenizer", ["core", "unicode_script"])
def test_the_op_audit_finds_ops_stock_serving_lacks(tmp_path, product_records, tokenizer):
    model = _model(product_records, ("text",), text_tokenizer=tokenizer)
    base = str(tmp_path / "m")
    if tokenizer == "core":  # the default: core TensorFlow ops only
        path = export_saved_model(model, base, custom_ops="error")
        assert custom_ops(path) == []
        assert {"StringLower", "StaticRegexReplace", "StringSplitV2"} <= set(saved_model_ops(path))
        return
    with pytest.raises(OpAuditError, match="CaseFoldUTF8, UnicodeScriptTokenizeWithOffsets"):
        export_saved_model(model, base, custom_ops="error")
    assert os.listdir(base) == []  # nothing landed
    with pytest.warns(UserWarning, match="text_tokenizer='core'"):
        path = export_saved_model(model, base)
    assert custom_ops(path) == ["CaseFoldUTF8", "UnicodeScriptTokenizeWithOffsets"]
