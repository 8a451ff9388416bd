"""Serving latency: an exported SavedModel in a fresh process, beside the Keras model called directly.

The default model of the fashion task (../shared/data): MobileNetV2-0.35 (ImageNet weights,
../shared/weights) at 128x96 + scratch text, concat fusion, 55 classes; latency does not depend
on training, so the head is left as built. It is exported with `export_saved_model` and saved as
`.keras`. Then, each in a fresh process:

- SavedModel: `tf.saved_model.load` with only TensorFlow imported, calling `serving_default`
  with raw JPEG bytes and raw titles, as TF Serving does (decoding and tokenizing included);
- Keras: `keras.models.load_model` (keras_mmtl imported for its layers), on images decoded and
  resized beforehand: called directly as a notebook does (`model(inputs, training=False)`,
  eager: this is `keras_direct`), and through Keras' compiled `model.predict_on_batch`.

Each measures single requests (one product; 20 warm-up calls, then `--requests` timed calls
over distinct test products: p50 and p99 in ms) and batches of 32 (samples per second over
`--batches` batches). Appends a section with the headline figures to `benchmarks/RESULTS.md`.
About 3 minutes on 2 CPU cores. Run from the repository root:

    python benchmarks/serving.py
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

WARMUP = 20
BATCH = 32


def measure(kind, path, requests, count, batches):
    """In this (fresh) process: load the model, time single requests and batches."""
    import numpy as np
    import tensorflow as tf

    with open(requests) as f:
        request = json.load(f)
    images = [open(p, "rb").read() for p in request["images"]]
    texts = request["texts"]
    if kind == "savedmodel":
        serve = tf.saved_model.load(path).signatures["serving_default"]

        def call(rows):
            return serve(image=tf.constant([images[i] for i in rows]),
                         text=tf.constant([texts[i] for i in rows]))
    else:
        import keras

        import keras_mmtl  # noqa: F401  (registers the layers)
        from keras_mmtl.data.images import decode_image

        model = keras.models.load_model(path)
        size = tuple(model.input["image"].shape[1:3])
        decoded = tf.stack([decode_image(tf.constant(data), size) for data in images])

        def call(rows):
            inputs = {"image": tf.gather(decoded, rows),
                      "text": tf.constant([texts[i] for i in rows])}
            if kind == "keras_predict":  # Keras' compiled predict function
                return model.predict_on_batch(inputs)
            return model(inputs, training=False)  # eager, as a notebook calls it
    n = len(texts)
    for i in range(WARMUP):
        call([i % n])
    seconds = []
    for i in range(count):
        start = time.perf_counter()
        call([i % n])
        seconds.append(time.perf_counter() - start)
    call(list(range(BATCH)))
    start = time.perf_counter()
    for b in range(batches):
        call([(b * BATCH + j) % n for j in range(BATCH)])
    throughput = batches * BATCH / (time.perf_counter() - start)
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "batch32_samples_per_s": float(throughput)}


def run_fresh(kind, path, requests, args):
    """`measure` in a new Python process; its figures."""
    command = [sys.executable, __file__, "--measure", kind, path, requests,
               "--requests", str(args.requests), "--batches", str(args.batches)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"Measuring the {kind} model failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def prepare(work, quick):
    """Exports the default fashion model and writes the test requests; their paths."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from keras_mmtl import build_classifier_for, export_saved_model
    from training import fashion_records
    from transfer import IMAGE

    records = fashion_records(quick, rows={"train": 320, "val": 64, "test": 256})
    model = build_classifier_for(records, **IMAGE)
    saved = export_saved_model(model, os.path.join(work, "saved_models", "fashion"),
                               custom_ops="error")
    keras_path = os.path.join(work, "model.keras")
    model.save(keras_path)
    test = records.subset("test")
    requests = os.path.join(work, "requests.json")
    with open(requests, "w") as f:
        json.dump({"images": list(test.images[:256]), "texts": list(test.texts[:256])}, f)
    return saved, keras_path, requests, model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", nargs=3, metavar=("KIND", "PATH", "REQUESTS"),
                        help=argparse.SUPPRESS)  # the fresh process's part
    parser.add_argument("--requests", type=int, default=300, help="timed single requests")
    parser.add_argument("--batches", type=int, default=20, help="timed batches of 32")
    parser.add_argument("--work-dir", help="keep the exports here (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true",
                        help="few requests and batches, to check the script; writes nothing")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, args.requests, args.batches)))
        return
    if args.quick:
        args.requests, args.batches = 30, 3
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or tmp
        saved, keras_path, requests, model = prepare(work, args.quick)
        figures = {"SavedModel (fresh process, TensorFlow only)":
                   run_fresh("savedmodel", saved, requests, args),
                   "Keras model called directly, `model(x)` (fresh process)":
                   run_fresh("keras", keras_path, requests, args),
                   "Keras `model.predict_on_batch(x)` (fresh process)":
                   run_fresh("keras_predict", keras_path, requests, args)}
        size_mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(saved)
                      for f in files) / 2**20
    lines = ["| model | single request p50 (ms) | p99 (ms) | mean (ms) | batch 32 (samples/s) |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_ms']:.1f} "
              f"| {r['batch32_samples_per_s']:.0f} |" for name, r in figures.items()]
    body = (f"The default fashion model (MobileNetV2-0.35 at 128x96 + scratch text, concat, "
            f"{len(model.get_layer('head').class_names)} classes, {model.count_params():,} "
            f"parameters; SavedModel {size_mb:.1f} MiB). {args.requests} single requests after "
            f"{WARMUP} warm-up calls, {args.batches} batches of {BATCH}. The SavedModel decodes "
            "the JPEG bytes and tokenizes in its graph; the Keras model gets decoded images.\n\n"
            + "\n".join(lines))
    print(body)
    served, direct, compiled = figures.values()
    headline = {"serving_p50_ms": round(served["p50_ms"], 2),
                "serving_p99_ms": round(served["p99_ms"], 2),
                "serving_batch32_samples_per_s": round(served["batch32_samples_per_s"], 1),
                "keras_direct_p50_ms": round(direct["p50_ms"], 2),
                "keras_direct_p99_ms": round(direct["p99_ms"], 2),
                "keras_direct_batch32_samples_per_s": round(direct["batch32_samples_per_s"], 1),
                "keras_predict_on_batch_p50_ms": round(compiled["p50_ms"], 2)}
    print("\n".join(f"{key}: {value}" for key, value in headline.items()))
    if not args.quick:
        from results import append_section

        append_section("serving", body, headline)


if __name__ == "__main__":
    main()
