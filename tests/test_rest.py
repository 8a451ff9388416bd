"""The TF Serving REST client: request in the documented row format, answer parsed like predict()."""

import base64
import http.server
import json
import threading

import numpy as np
import pytest
import tensorflow as tf

from keras_mmtl.export import export_saved_model, predict
from keras_mmtl.models import build_classifier_for
from keras_mmtl.rest import (
    ServingError,
    parse_predictions,
    predict_request,
    predict_url,
    rest_predict,
)

SMALL = dict(image_backbone="small_cnn", image_weights=None, image_size=(16, 16))


def test_the_request_follows_the_row_format(product_records):
    paths = list(product_records.images[:2])
    body = json.loads(json.dumps(predict_request(images=[paths[0], None, b"\x89PNG"],
                                                 texts=["red cotton", "", None])))
    assert body["signature_name"] == "serving_default"
    first, missing, raw = body["instances"]
    with open(paths[0], "rb") as f:
        assert base64.b64decode(first["image"]["b64"]) == f.read()
    assert missing == {"image": {"b64": ""}, "text": ""}
    assert base64.b64decode(raw["image"]["b64"]) == b"\x89PNG" and raw["text"] == ""
    assert predict_request(tabular=[[1, 2.5]])["instances"] == [{"tabular": [1.0, 2.5]}]
    with pytest.raises(ValueError, match="one value per sample of every input"):
        predict_request(images=paths, texts=["only one"])
    with pytest.raises(ValueError, match="the request has no input"):
        predict_request()


@pytest.mark.bad_input
def test_answers_and_errors_are_parsed():
    answer = {"predictions": [{"colour_top_labels": ["red", "blue"],
                               "colour_top_scores": [0.8, 0.2],
                               "size_top_labels": ["s", "l"], "size_top_scores": [0.6, 0.4]}]}
    assert parse_predictions(answer, top_k=1) == {"colour": [[("red", 0.8)]],
                                                  "size": [[("s", 0.6)]]}
    with pytest.raises(ServingError, match="Servable not found"):
        parse_predictions('{"error": "Servable not found for request: Latest(half)"}')
    with pytest.raises(ValueError, match="expected 'predictions'"):
        parse_predictions({"outputs": []})


class ServingEmulator(http.server.BaseHTTPRequestHandler):
    """Answers POST /v1/models/<name>:predict as TF Serving's REST API documents it.

    Row format in (`instances`, `{"b64": ...}` for binary values), a list of
    objects out (one per instance, one key per named output), `{"error": ...}`
    with HTTP 400 when the signature fails.
    """

    signature = None
    path_served = None

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != self.path_served:
            return self._answer(404, {"error": f"Servable not found for request: {self.path}"})
        instances = body["instances"]
        inputs = {name: tf.constant([_decode(row[name]) for row in instances])
                  for name in instances[0]}
        try:
            outputs = self.signature(**inputs)
        except tf.errors.InvalidArgumentError as error:
            return self._answer(400, {"error": error.message})
        outputs = {name: value.numpy().tolist() for name, value in outputs.items()}
        predictions = [{name: _encode(values[i]) for name, values in outputs.items()}
                       for i in range(len(instances))]
        self._answer(200, {"predictions": predictions})

    def _answer(self, status, body):
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def _decode(value):
    return base64.b64decode(value["b64"]) if isinstance(value, dict) else value


def _encode(value):
    if isinstance(value, list):
        return [_encode(v) for v in value]
    return value.decode("utf-8") if isinstance(value, bytes) else value


@pytest.mark.slow
def test_a_served_export_answers_the_client_like_predict(product_records, tmp_path):
    model = build_classifier_for(product_records, missing_modalities=True, **SMALL)
    path = export_saved_model(model, str(tmp_path / "demo"))
    ServingEmulator.signature = tf.saved_model.load(path).signatures["serving_default"]
    ServingEmulator.path_served = "/v1/models/demo/versions/1:predict"
    server = http.server.HTTPServer(("127.0.0.1", 0), ServingEmulator)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        host = f"127.0.0.1:{server.server_port}"
        test = product_records.subset("test")
        images, texts = [test.images[0], None, test.images[2]], [test.texts[0], "red", ""]
        served = rest_predict(predict_url(host, "demo", 1), images=images, texts=texts, top_k=3)
        expected = predict(path, images=images, texts=texts, top_k=3)
        for got, want in zip(served, expected):
            assert [label for label, _ in got] == [label for label, _ in want]
            np.testing.assert_allclose([p for _, p in got], [p for _, p in want], atol=1e-6)
        with pytest.raises(ServingError, match="HTTP 404: Servable not found"):
            rest_predict(predict_url(host, "other"), images=images, texts=texts)
        # An undecodable image fails that request, with a message that says why ...
        with pytest.raises(ServingError,
                           match="(?s)HTTP 400: .*items that are not a JPEG/PNG/GIF/BMP/WebP"):
            rest_predict(predict_url(host, "demo", 1), images=[b"not an image"], texts=["x"])
        # ... and the server goes on answering.
        assert rest_predict(predict_url(host, "demo", 1), images=images, texts=texts, top_k=3) \
            == served
    finally:
        server.shutdown()
