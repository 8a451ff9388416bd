"""TF Serving: the warm-up requests every export carries, and the gRPC client over real gRPC."""

import contextlib
import os
from concurrent import futures

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2, prediction_service_pb2_grpc
from tensorflow_serving.config import model_server_config_pb2

from keras_mmtl.export import (
    WARMUP_FILE,
    export_saved_model,
    grpc_request,
    predict,
    write_warmup_requests,
)
from keras_mmtl.grpc_client import grpc_predict, parse_predict_response
from keras_mmtl.models import build_classifier, build_classifier_for
from keras_mmtl.rest import ServingError

SMALL = dict(image_backbone="small_cnn", image_weights=None, image_size=(16, 24))


def run_request(signatures, request):
    """What TF Serving does with a `PredictRequest`: its tensors into the signature, out again."""
    inputs = {name: tf.constant(tf.make_ndarray(proto)) for name, proto in request.inputs.items()}
    return signatures[request.model_spec.signature_name](**inputs)


def test_the_grpc_request_carries_files_texts_and_numbers(tmp_path):
    (tmp_path / "cap.jpg").write_bytes(b"\xff\xd8 a jpeg")
    request = grpc_request("shop", images=[str(tmp_path / "cap.jpg"), None],
                           texts=["red wool", None], tabular=[[1, 2.5], [0, 0]], version=3)
    spec = request.model_spec
    assert (spec.name, spec.version.value, spec.signature_name) == ("shop", 3, "serving_default")
    assert tf.make_ndarray(request.inputs["image"]).tolist() == [b"\xff\xd8 a jpeg", b""]
    assert tf.make_ndarray(request.inputs["text"]).tolist() == [b"red wool", b""]
    tabular = tf.make_ndarray(request.inputs["tabular"])
    assert tabular.dtype == np.float32 and tabular.tolist() == [[1.0, 2.5], [0.0, 0.0]]
    newest = grpc_request("shop", texts=["x"], signature_name="embed").model_spec
    assert not newest.HasField("version") and newest.signature_name == "embed"
    with pytest.raises(ValueError, match="one value per sample of every input"):
        grpc_request("shop", images=[b"a", b"b"], texts=["only one"])


def test_a_predict_response_reads_like_predict():
    response = predict_pb2.PredictResponse()
    outputs = {"colour_top_labels": [["red", "blue"], ["blue", "red"]],
               "colour_top_scores": np.float32([[0.75, 0.25], [0.5, 0.5]]),
               "colour_label": ["red", "blue"], "size_top_labels": [["s"], ["l"]],
               "size_top_scores": np.float32([[1.0], [1.0]])}
    for name, value in outputs.items():
        response.outputs[name].CopyFrom(tf.make_tensor_proto(value))
    assert parse_predict_response(response, top_k=1) == {
        "colour": [[("red", 0.75)], [("blue", 0.5)]], "size": [[("s", 1.0)], [("l", 1.0)]]}


@pytest.mark.parametrize("inputs", ["text and numbers", pytest.param(
    "two images, two texts, numbers, two tasks", marks=pytest.mark.slow)])
def test_the_warmup_requests_run_on_the_export(tmp_path, inputs):
    numbers = {"tabular_statistics": (np.zeros(3), np.ones(3))}
    if inputs == "text and numbers":  # exports in a second; images take several
        tasks = {None: ["red", "blue", "green"]}
        model = build_classifier(tasks[None], image_backbone=None, text_vocabulary=["red"],
                                 **numbers)
    else:
        tasks = {"colour": ["red", "blue", "green"], "size": ["s", "l"]}
        model = build_classifier(tasks, text_vocabulary=["red"], missing_modalities=True,
                                 modalities=("image", "image_2", "text", "text_2", "tabular"),
                                 **numbers, **SMALL)
    path = export_saved_model(model, str(tmp_path / "shop"), warmup_batch_sizes=(1, 3))
    warmup = os.path.join(path, WARMUP_FILE)
    assert os.path.getsize(warmup) < 20_000
    requests = [prediction_log_pb2.PredictionLog.FromString(record.numpy()).predict_log.request
                for record in tf.data.TFRecordDataset(warmup)]
    signatures = tf.saved_model.load(path).signatures
    count = [len(tf.make_ndarray(request.inputs["text"])) for request in requests]
    assert [(r.model_spec.signature_name, n) for r, n in zip(requests, count)] == [
        ("serving_default", 1), ("serving_default", 3), ("embed", 1), ("embed", 3)]
    for request, n in zip(requests, count):
        assert request.model_spec.name == "shop"
        signature = signatures[request.model_spec.signature_name]
        assert sorted(request.inputs) == sorted(signature.structured_input_signature[1])
        for name in ("image", "image_2"):
            if name in request.inputs:  # an encoded image of the model's size
                image = tf.io.decode_jpeg(tf.make_ndarray(request.inputs[name])[0])
                assert image.shape == (16, 24, 3)
        outputs = run_request(signatures, request)
        if request.model_spec.signature_name == "embed":
            assert outputs["embedding"].shape[0] == n
            continue
        for task, names in tasks.items():
            prefix = "" if task is None else f"{task}_"
            assert outputs[f"{prefix}probabilities"].shape == (n, len(names))
            assert outputs[f"{prefix}label"].shape == (n,)
    with pytest.raises(ValueError, match="batch sizes of at least 1. Received: \\(\\)"):
        write_warmup_requests(model, str(tmp_path / "other"), "shop", ())


def test_the_model_server_config_parses():
    serving = os.path.join(os.path.dirname(__file__), "..", "serving")
    with open(os.path.join(serving, "models.config")) as f:
        config = text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    assert model.base_path == f"/models/{model.name}"  # where the docs mount saved_models/
    assert model.model_version_policy.latest.num_versions == 2


class SavedModelServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """TF Serving's gRPC `Predict` for one model version: its SavedModel's signature, really run.

    Like TF Serving, it answers NOT_FOUND for another model or version and
    INVALID_ARGUMENT, with TensorFlow's message, when the signature fails.
    """

    def __init__(self, name, version, path):
        self.name, self.version = name, version
        self.signatures = tf.saved_model.load(path).signatures

    def Predict(self, request, context):
        spec = request.model_spec
        if spec.name != self.name or spec.HasField("version") and spec.version.value != self.version:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {spec}")
        try:
            outputs = run_request(self.signatures, request)
        except tf.errors.InvalidArgumentError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, error.message)
        response = predict_pb2.PredictResponse(model_spec=spec)
        for name, value in outputs.items():
            response.outputs[name].CopyFrom(tf.make_tensor_proto(value.numpy()))
        return response


@contextlib.contextmanager
def serving(servicer):
    """A gRPC server on a free localhost port; yields its `host:port`."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


@pytest.mark.slow
def test_a_served_export_answers_grpc_like_predict(product_records, tmp_path):
    model = build_classifier_for(product_records, missing_modalities=True, **SMALL)
    path = export_saved_model(model, str(tmp_path / "demo"))
    with serving(SavedModelServicer("demo", 1, path)) as target:
        test = product_records.subset("test")
        images, texts = [test.images[0], None, test.images[2]], [test.texts[0], "red", ""]
        served = grpc_predict(target, "demo", images=images, texts=texts, top_k=3, version=1)
        assert served == predict(path, images=images, texts=texts, top_k=3)
        assert grpc_predict(target, "demo", images=images, texts=texts, top_k=3) == served
        with pytest.raises(ServingError, match="NOT_FOUND: Servable not found"):
            grpc_predict(target, "demo", images=images, texts=texts, version=2)
        # An undecodable image fails that request, with the server's message ...
        with pytest.raises(ServingError,
                           match="(?s)INVALID_ARGUMENT: .*items that are not a JPEG/PNG/GIF/BMP"):
            grpc_predict(target, "demo", images=[b"not an image"], texts=["x"])
        # ... and the server goes on answering.
        assert grpc_predict(target, "demo", images=images, texts=texts, top_k=3) == served
    with pytest.raises(ServingError, match=f"at {target} failed with UNAVAILABLE"):
        grpc_predict(target, "demo", images=images, texts=texts, timeout=5)  # server gone
