"""TFLite export for phones: float32, float16 and dynamic-range int8 flatbuffers.

TFLite's built-in ops have no string ops, so the TFLite model starts after the text
tokenizer: it takes decoded images (float32 `(batch, h, w, 3)` in [0, 255], as
`keras_mmtl.data.decode_image` gives them) and token ids (int32 `(batch, sequence_length)`,
input `"<text input>_ids"`), and returns the class probabilities. The app tokenizes with the
vocabulary written next to the model (`<name>.vocab.txt`, one token per line, id = line + 2;
0 is padding, 1 unknown) and the model's rule (`keras_mmtl.models.tokenize`). Run with raw
strings instead, the graph would need TensorFlow ops that TFLite only has through its Flex
delegate: `string_ops` lists them.
"""

import os
import re
import tempfile
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_mmtl.data.pipeline import make_dataset
from keras_mmtl.modalities import is_input_name, modality_kind
from keras_mmtl.models.builder import clone_classifier
from keras_mmtl.models.spec import describe
from keras_mmtl.models.text import TOKENIZER
from keras_mmtl.training.cache import branch_outputs

QUANTIZATIONS = ("float32", "float16", "int8")


def ids_input(modality):
    """The TFLite model's input for the token ids of a text input, e.g. `"text_ids"`."""
    return f"{modality}_ids"


def tflite_graph(model):
    """The classifier from decoded images and token ids to probabilities: what TFLite runs.

    A copy of `model` (sharing nothing with it) cut after its text tokenizer.
    Only the `"scratch"` text encoder tokenizes into one tensor of ids; the
    TF-IDF and pretrained encoders are refused.
    """
    spec = describe(model)
    if spec.multi_output:
        raise ValueError("TFLite export takes a classifier with one output; this one has "
                         f"{list(model.output)}.")
    texts = [name for name in spec.modalities if modality_kind(name) == "text"]
    if texts and not spec.tokenizers and any(
            isinstance(layer, keras.Model) and TOKENIZER in {inner.name for inner in layer.layers}
            for layer in model.layers):
        raise ValueError("TFLite export cuts a classifier after its text tokenizer, and this "
                         "one holds its tokenizer inside members (an ensemble or a "
                         "mirror-averaged model): export a single trained classifier, "
                         "such as a run's fused member (RUN_DIR/member1/model.keras).")
    if any(name not in spec.tokenizers for name in texts):
        raise ValueError("TFLite export needs the 'scratch' text encoder (its tokenizer "
                         "gives token ids the app can compute); this model's text "
                         "encoder tokenizes inside its graph.")
    clone = clone_classifier(model)
    inputs = {}
    for name in clone.input:  # modalities and presence masks
        if name in spec.tokenizers:
            inputs[ids_input(name)] = branch_outputs(clone, spec.tokenizers[name], name)[0]
        else:
            inputs[name] = clone.input[name]
    with warnings.catch_warnings():  # the ids keys differ from the tensors' own names
        warnings.simplefilter("ignore", UserWarning)
        return keras.Model(inputs, clone.output, name=f"{model.name}_tflite")


def convert(model, quantization="float32"):
    """The TFLite flatbuffer of `tflite_graph(model)`, TFLite built-in ops only.

    Args:
        model: a classifier (one output; scratch text encoder if it has text).
        quantization: `"float32"`; `"float16"` (weights stored in float16,
            half the size); `"int8"` (dynamic-range: weights in int8, about
            a quarter of the size, activations in float).

    Returns:
        the flatbuffer as `bytes`.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"Unknown quantization {quantization!r}. Expected one of "
                         f"{QUANTIZATIONS}. Received: quantization={quantization!r}")
    return _flatbuffer(tflite_graph(model), quantization)


def export_tflite(model, path, quantization="float32"):
    """Writes the TFLite model (`convert`) to `path` and its vocabulary beside it.

    Returns:
        `path`.

    Example:

    >>> export_tflite(model, "saved_models/products.int8.tflite", "int8")  # doctest: +SKIP
    """
    flatbuffer = convert(model, quantization)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(flatbuffer)
    tokenizer = _tokenizer(model)
    if tokenizer is not None:
        with open(f"{os.path.splitext(path)[0]}.vocab.txt", "w", encoding="utf-8") as f:
            f.writelines(f"{token}\n" for token in tokenizer.vocabulary)
    return path


def _tokenizer(model):
    """The classifier's in-graph tokenizer (one, shared by its text inputs), or `None`."""
    tokenizers = describe(model).tokenizers
    return model.get_layer(next(iter(tokenizers.values()))) if tokenizers else None


def string_ops(model):
    """The TensorFlow ops a TFLite model on raw strings would need beyond TFLite's built-ins.

    Converts the classifier itself (decoded images and raw texts in) with
    built-in ops only, and returns the ops the converter names as missing
    (they would run through TFLite's Flex delegate), e.g.
    `["RaggedTensorToTensor", "StaticRegexReplace", "StringLower", "StringSplitV2"]`.
    """
    try:
        _flatbuffer(model, "float32")
    except Exception as error:  # the converter raises its own ConverterError
        return sorted(set(re.findall(r"\btf\.(\w+)\(", str(error))))
    return []


def _flatbuffer(graph, quantization):
    """`graph` (named inputs -> probabilities) as TFLite, built-in ops only.

    The graph goes through a SavedModel, the path TensorFlow documents for Keras 3 models
    (converting a concrete function directly loses Keras 3's variables: the model answers NaN).
    """
    names = list(graph.input)
    specs = [tf.TensorSpec(tensor.shape, tensor.dtype, name=name)
             for name, tensor in graph.input.items()]
    archive = keras.export.ExportArchive()
    archive.track(graph)
    archive.add_endpoint("serving_default", tf.function(lambda *inputs: {
        "probabilities": graph(dict(zip(names, inputs)), training=False)}),
        input_signature=specs)
    with tempfile.TemporaryDirectory() as folder:
        archive.write_out(folder, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(folder)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if quantization != "float32":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantization == "float16":
            converter.target_spec.supported_types = [tf.float16]
        return converter.convert()


def interpreter(flatbuffer):
    """A TFLite interpreter of `flatbuffer`: LiteRT's when `ai-edge-litert` is installed.

    LiteRT (`pip install ai-edge-litert`) is the runtime that replaces the
    deprecated `tf.lite.Interpreter`, with the same API; where it is not
    installed (a platform without its wheel), TensorFlow's interpreter runs
    the model.

    Args:
        flatbuffer: a TFLite model (`convert`'s bytes).

    Returns:
        an interpreter, e.g. for `interpreter(flatbuffer).get_signature_runner()`.
    """
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = tf.lite.Interpreter
    return Interpreter(model_content=flatbuffer)


def tflite_predict(flatbuffer, model, records, split="test", batch_size=32):
    """Runs a TFLite model over records: `(labels, probabilities)`, as `predict_records`.

    Images are decoded by the training pipeline and texts tokenized by the
    model's own tokenizer, which is what the app must reproduce.

    Args:
        flatbuffer: `convert`'s bytes, or the path of a `.tflite` file.
        model: the Keras classifier it was converted from (for the tokenizer).
        records, split, batch_size: the samples to run.
    """
    if isinstance(flatbuffer, (str, os.PathLike)):
        with open(flatbuffer, "rb") as f:
            flatbuffer = f.read()
    runner = interpreter(flatbuffer).get_signature_runner()
    tokenizer = _tokenizer(model)
    arguments = describe(model).dataset_arguments()
    arguments["presence"] += tuple(m for m in arguments["modalities"] if modality_kind(m) ==
                                   "image" and m not in arguments["presence"])
    probabilities = []
    for features, _ in make_dataset(records, split, **arguments, batch_size=batch_size):
        inputs = {}
        for name in model.input:
            if is_input_name(name) and modality_kind(name) == "text":
                inputs[ids_input(name)] = tokenizer(features[name]).numpy()
            elif is_input_name(name) and modality_kind(name) == "image":  # the pipeline's uint8
                inputs[name] = features[name].numpy().astype(np.float32)
            else:
                inputs[name] = features[name].numpy()
        probabilities.append(runner(**inputs)["probabilities"])
    rows = records if split is None else records.subset(split)
    return rows.labels, np.concatenate(probabilities)
