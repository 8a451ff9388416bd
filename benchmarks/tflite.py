"""TFLite variants of the fashion model: accuracy against the SavedModel, and size.

The default model of the fashion benchmark task (../shared/data), trained as in
`benchmarks/calibration.py` (phase 1 only), is exported as a SavedModel (raw JPEG bytes and
titles in) and converted to TFLite in float32, float16 and dynamic-range int8
(`keras_mmtl.tflite`; decoded images and token ids in, TFLite built-in ops only). Each is run
over the test split (the SavedModel through its `serving_default` signature, the TFLite
models through `tf.lite.Interpreter`) and scored; sizes are the files' bytes. Also listed:
the ops a TFLite model on raw strings would need beyond the built-ins. Appends a section
with the headline figures to `benchmarks/RESULTS.md`. About 4 minutes on 2 CPU cores. Run
from the repository root:

    python benchmarks/tflite.py
"""

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_mmtl import export_saved_model  # noqa: E402
from keras_mmtl.tflite import QUANTIZATIONS, export_tflite, string_ops, tflite_predict  # noqa: E402
from results import append_section  # noqa: E402
from training import trained_from_command_line  # noqa: E402


def saved_model_accuracy(path, records, batch=64):
    serve = tf.saved_model.load(path).signatures["serving_default"]
    test = records.subset("test")
    predicted = []
    for start in range(0, len(test), batch):
        images = [open(p, "rb").read() for p in test.images[start:start + batch]]
        out = serve(image=tf.constant(images), text=tf.constant(list(test.texts[start:start + batch])))
        predicted.append(out["probabilities"].numpy().argmax(axis=1))
    return float((np.concatenate(predicted) == test.labels).mean())


def folder_size(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main():
    args, records, model = trained_from_command_line(__doc__)
    rows = {}
    with tempfile.TemporaryDirectory() as work:
        saved = export_saved_model(model, os.path.join(work, "fashion"), custom_ops="error")
        rows["SavedModel"] = (saved_model_accuracy(saved, records), folder_size(saved))
        for quantization in QUANTIZATIONS:
            path = export_tflite(model, os.path.join(work, f"fashion.{quantization}.tflite"),
                                 quantization)
            labels, probabilities = tflite_predict(path, model, records, "test")
            rows[f"TFLite {quantization}"] = (float((probabilities.argmax(1) == labels).mean()),
                                             os.path.getsize(path))
    base_accuracy = rows["SavedModel"][0]
    float32_size = rows["TFLite float32"][1]
    table = ["| model | test accuracy | delta (points) | size (MiB) | size / TFLite float32 |",
             "|---|---|---|---|---|"]
    table += [f"| {name} | {accuracy:.4f} | {100 * (accuracy - base_accuracy):+.2f} "
              f"| {size / 2**20:.2f} | {size / float32_size:.3f} |"
              for name, (accuracy, size) in rows.items()]
    flex = string_ops(model)
    body = (f"Fashion benchmark task ({len(records.subset('test'))} test rows, "
            f"{len(records.class_names)} classes); the default model (MobileNetV2-0.35 at 128x96 "
            "+ scratch text, concat), phase 1 only. The SavedModel takes JPEG bytes and titles; "
            "the TFLite models take decoded images and token ids (built-in ops only; the "
            "SavedModel folder holds variables and both signatures' graphs). With raw strings "
            f"in, TFLite would need these TensorFlow (Flex) ops: {', '.join(flex)}.\n\n"
            + "\n".join(table))
    print(body)
    headline = {
        **{f"tflite_{q}_accuracy_delta_points":
           round(100 * (rows[f"TFLite {q}"][0] - base_accuracy), 2) for q in QUANTIZATIONS},
        "tflite_int8_size_ratio": round(rows["TFLite int8"][1] / float32_size, 3),
        "tflite_float16_size_ratio": round(rows["TFLite float16"][1] / float32_size, 3),
    }
    print("\n".join(f"{key}: {value}" for key, value in headline.items()))
    if not args.quick:
        append_section("tflite", body, headline)


if __name__ == "__main__":
    main()
