"""A client for TF Serving's REST `predict` API: the request for (image, text) pairs, the answer.

TF Serving takes JSON (https://www.tensorflow.org/tfx/serving/api_rest): in the row format,
`{"signature_name": ..., "instances": [{"image": {"b64": ...}, "text": ...}, ...]}`, binary
values (image files) base64-encoded in a `{"b64": ...}` object. A model with several named
outputs answers `{"predictions": [{"probabilities": [...], "label": ..., ...}, ...]}`, one
object per instance, and `{"error": ...}` when it fails. These functions build that request
for the signature `export_saved_model` writes, and read the answer back into what
`keras_mmtl.predict` returns, so a served model is queried like a local one.
"""

import base64
import json
import urllib.error
import urllib.request

from keras_mmtl.export import SIGNATURE, request_columns
from keras_mmtl.modalities import modality_kind


class ServingError(RuntimeError):
    """TF Serving answered with an error (its `{"error": ...}` message is kept)."""


def predict_url(host, model_name, version=None):
    """The REST `predict` URL of a served model, e.g. `http://localhost:8501/v1/models/demo:predict`.

    Args:
        host: `host:port` of TF Serving's REST API (`--rest_api_port`, 8501
            in its docker image), optionally with `http://` or `https://`.
        model_name: the served model's name (`MODEL_NAME`).
        version: a version number, or `None` for the newest.

    Example:

    >>> predict_url("localhost:8501", "demo", version=2)
    'http://localhost:8501/v1/models/demo/versions/2:predict'
    """
    base = host if host.startswith(("http://", "https://")) else f"http://{host}"
    versioned = "" if version is None else f"/versions/{int(version)}"
    return f"{base.rstrip('/')}/v1/models/{model_name}{versioned}:predict"


def predict_request(images=None, texts=None, tabular=None, signature_name=SIGNATURE, **inputs):
    """The JSON body of a REST `predict` request, in TF Serving's row format.

    Args:
        images: image file paths or encoded image bytes, one per sample;
            `None` or `""`/`b""` for a sample without one (models built with
            `missing_modalities=True`). Leave it `None` for a text-only model.
        texts: one string per sample (`""`: no text); `None` for an
            image-only model.
        tabular: numeric features, one list per sample, for a model with a
            tabular input.
        signature_name: the signature to run.
        **inputs: more image or text columns by input name (`image_2=`,
            `text_2=`, ...).

    Returns:
        a dict, ready for `json.dumps`: `{"signature_name": ..., "instances":
        [{"image": {"b64": ...}, "text": ...}, ...]}`.

    Example:

    >>> predict_request(images=[b"\\xff\\xd8"], texts=["red wool cap"])
    {'signature_name': 'serving_default', 'instances': [{'image': {'b64': '/9g='}, 'text': 'red wool cap'}]}
    """
    columns = request_columns(images, texts, tabular, **inputs)
    for name, values in columns.items():
        if modality_kind(name) == "image":  # binary values travel base64-encoded
            columns[name] = [{"b64": base64.b64encode(value).decode("ascii")} for value in values]
    instances = [dict(zip(columns, row)) for row in zip(*columns.values())]
    return {"signature_name": signature_name, "instances": instances}


def parse_predictions(body, top_k=None):
    """Top classes per sample from a REST `predict` answer, as `keras_mmtl.predict` gives them.

    Args:
        body: the answer, as JSON text or the decoded dict.
        top_k: classes kept per sample (default all the answer has, at most 5).

    Returns:
        one list of `(label, probability)` per sample, most probable first;
        for a multi-task model, a dict of task -> such lists.

    Raises:
        ServingError: the answer is TF Serving's `{"error": ...}`.

    Example:

    >>> parse_predictions('{"predictions": [{"top_labels": ["wool", "silk"], '
    ...                   '"top_scores": [0.9, 0.1], "label": "wool"}]}')
    [[('wool', 0.9), ('silk', 0.1)]]
    """
    if isinstance(body, (str, bytes)):
        body = json.loads(body)
    if "error" in body:
        raise ServingError(f"TF Serving answered with an error: {body['error']}")
    if "predictions" not in body:
        raise ValueError(f"Not a REST predict answer: expected 'predictions', found {sorted(body)}")
    rows = body["predictions"]
    keys = set(rows[0]) if rows else set()
    tasks = [None] if "top_labels" in keys else sorted(
        key.removesuffix("_top_labels") for key in keys if key.endswith("_top_labels"))
    if not tasks:
        raise ValueError("The answer has no top_labels: was the model exported by "
                         f"keras_mmtl.export_saved_model? Outputs: {sorted(keys)}")
    answers = {}
    for task in tasks:
        prefix = "" if task is None else f"{task}_"
        answers[task] = [list(zip(row[f"{prefix}top_labels"][:top_k],
                                  map(float, row[f"{prefix}top_scores"][:top_k])))
                         for row in rows]
    return answers[None] if tasks == [None] else answers


def rest_predict(url, images=None, texts=None, tabular=None, top_k=None, timeout=30, **inputs):
    """Sends one REST `predict` request to TF Serving and returns its parsed answer.

    Args:
        url: the model's predict URL (`predict_url`).
        images, texts, tabular, **inputs: the samples, as for `predict_request`.
        top_k: classes kept per sample.
        timeout: seconds to wait for the answer.

    Returns:
        as `parse_predictions`.

    Raises:
        ServingError: the server answered with an error (its message and
            HTTP status are in the exception's text).

    Example:

    >>> rest_predict(predict_url("localhost:8501", "demo"),
    ...              images=["bag.jpg"], texts=["Urban wool cap"])  # doctest: +SKIP
    [[('red wool', 0.97), ('blue wool', 0.02), ...]]
    """
    body = json.dumps(predict_request(images, texts, tabular, **inputs)).encode("utf-8")
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return parse_predictions(answer.read(), top_k)
    except urllib.error.HTTPError as error:  # TF Serving's errors come as JSON too
        text = error.read().decode("utf-8", "replace")
        try:
            message = json.loads(text).get("error", text)
        except json.JSONDecodeError:
            message = text
        raise ServingError(f"{url} answered HTTP {error.code}: {message}") from None

