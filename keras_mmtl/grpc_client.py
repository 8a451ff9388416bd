"""A client for TF Serving's gRPC `Predict` API: the request for raw inputs, the answer.

TF Serving listens for gRPC on `--port` (8500 in its docker image) and serves
`tensorflow.serving.PredictionService` (https://www.tensorflow.org/tfx/serving/api_rest has
its REST twin). A `PredictRequest` names the model, version and signature in its `model_spec`
and carries one `TensorProto` per input: image files travel as raw bytes, with none of the
REST API's base64 and JSON, so gRPC is the cheaper way to send images. The `PredictResponse`
holds one batched `TensorProto` per output. `grpc_predict` builds the request with
`keras_mmtl.export.grpc_request` (the one the export's warm-up file holds too) and reads the
answer into what `keras_mmtl.predict` and `keras_mmtl.rest.rest_predict` return.
"""

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import prediction_service_pb2_grpc

from keras_mmtl.export import SIGNATURE, grpc_request
from keras_mmtl.rest import ServingError, parse_predictions


def grpc_predict(target, model_name, images=None, texts=None, tabular=None, top_k=None,
                 version=None, signature_name=SIGNATURE, timeout=30, **inputs):
    """Sends one gRPC `Predict` request to TF Serving and returns its parsed answer.

    Args:
        target: `host:port` of TF Serving's gRPC API (`--port`, 8500 in its
            docker image).
        model_name: the served model's name (`MODEL_NAME`).
        images, texts, tabular, **inputs: the samples, as for
            `keras_mmtl.rest.predict_request`: image file paths or encoded
            bytes, strings, numeric rows; more columns by input name
            (`image_2=`, `text_2=`, ...).
        top_k: classes kept per sample (default all the answer has, at most 5).
        version: a version number, or `None` for the newest.
        signature_name: the signature to run.
        timeout: seconds to wait for the answer.

    Returns:
        one list of `(label, probability)` per sample, most probable first;
        for a multi-task model, a dict of task -> such lists.

    Raises:
        ServingError: the call failed: the server's status code and message
            (e.g. `INVALID_ARGUMENT: ... items that are not a JPEG/PNG/GIF/BMP/WebP
            image`, or
            `UNAVAILABLE` when nothing answers at `target`).

    Example:

    >>> grpc_predict("localhost:8500", "demo", images=["bag.jpg"],
    ...              texts=["Urban wool cap"])  # doctest: +SKIP
    [[('red wool', 0.97), ('blue wool', 0.02), ...]]
    """
    request = grpc_request(model_name, images, texts, tabular, version=version,
                           signature_name=signature_name, **inputs)
    with grpc.insecure_channel(target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            response = stub.Predict(request, timeout=timeout)
        except grpc.RpcError as error:
            raise ServingError(f"gRPC Predict at {target} failed with "
                               f"{error.code().name}: {error.details()}") from None
    return parse_predict_response(response, top_k)


def parse_predict_response(response, top_k=None):
    """Top classes per sample from a `PredictResponse`, as `keras_mmtl.predict` gives them.

    Args:
        response: a `tensorflow.serving.PredictResponse` of a model exported
            by `keras_mmtl.export_saved_model`.
        top_k: classes kept per sample (default all the answer has).

    Returns:
        as `keras_mmtl.rest.parse_predictions`.

    Example:

    >>> from tensorflow_serving.apis import predict_pb2
    >>> response = predict_pb2.PredictResponse()
    >>> response.outputs["top_labels"].CopyFrom(tf.make_tensor_proto([[b"wool", b"silk"]]))
    >>> response.outputs["top_scores"].CopyFrom(tf.make_tensor_proto([[0.75, 0.25]]))
    >>> parse_predict_response(response)
    [[('wool', 0.75), ('silk', 0.25)]]
    """
    outputs = {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}
    count = len(next(iter(outputs.values()))) if outputs else 0
    rows = [{name: _plain(values[i]) for name, values in outputs.items()} for i in range(count)]
    return parse_predictions({"predictions": rows}, top_k)  # the REST answer's row format


def _plain(value):
    """A value of an output tensor as the REST API's JSON carries it: lists, text for bytes."""
    if isinstance(value, np.ndarray):
        return [_plain(item) for item in value]
    return value.decode("utf-8") if isinstance(value, bytes) else value
