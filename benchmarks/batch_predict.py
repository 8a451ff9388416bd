"""Batch prediction: `keras-mmtl predict --manifest` over the fashion test split, beside serving.

The model is the default fused model of the fashion task (../shared/data): MobileNetV2-0.35
(ImageNet weights, ../shared/weights) at the package's default image size (the backbone's
224 px reshaped to the photos' 3:4, 224x168) + the default text encoder on `title_masked`,
concat fusion, 55 classes. Throughput does not depend on training, so the head is left as
built (no epoch). It is exported with `export_saved_model`; the test split's rows (2,648, every
class) are written as a manifest of absolute image paths. Then, alternating, `--repeats` times:

- command: `python -m keras_mmtl predict --model EXPORT --manifest test.csv --output out.csv
  --text-column title_masked --batch-size 32` in a fresh process. Two figures: rows/s of the
  whole command (interpreter start, imports, model load, scoring, writing), and rows/s of the
  scoring as the command reports it (`PredictionSummary.seconds`: a counting pass over the
  manifest, reading the rows and image files, scoring, writing the CSV; the model is loaded
  before the clock starts, as for serving);
- serving: in this process, the export's `serving_default` signature called on the same rows
  in batches of 32, the image files read from disk as bytes per batch, as a client of TF
  Serving would send them (the model is loaded before the clock starts).

The best repeat of each is kept. `batch_predict_fraction_of_serving` is the command's
scoring rows/s over serving's; the target is 0.8 or more. Appends a section to
`benchmarks/RESULTS.md`. About 3 minutes on 2 CPU cores. Run from the repository root:

    python benchmarks/batch_predict.py
"""

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BATCH = 32


def prepare(work, quick):
    """Exports the fused fashion model and writes the test split as a manifest; their paths."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from keras_mmtl import build_classifier_for, export_saved_model, read_manifest
    from transfer import FASHION, WEIGHTS

    records = read_manifest(FASHION, "image", "title_masked", "article_type", "split",
                            min_class_count=20, check_images=False)
    model = build_classifier_for(records, image_backbone="mobilenet_v2_0.35",
                                 image_weights=WEIGHTS)
    saved = os.path.join(work, "saved_models", "fashion")
    export_saved_model(model, saved, custom_ops="error")
    folder = os.path.dirname(FASHION)
    with open(FASHION, newline="", encoding="utf-8") as f:
        rows = [row for row in csv.DictReader(f) if row["split"] == "test"]
    rows = rows[:256] if quick else rows
    for row in rows:
        row["image"] = os.path.join(folder, row["image"])
    manifest = os.path.join(work, "test.csv")
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return model, saved, manifest, rows


def run_command(saved, manifest, output):
    """The CLI in a fresh process: `(whole-command seconds, scoring seconds it reports, rows)`."""
    command = [sys.executable, "-m", "keras_mmtl", "predict", "--model", saved,
               "--manifest", manifest, "--output", output, "--text-column", "title_masked",
               "--batch-size", str(BATCH)]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(f"The predict command failed:\n{result.stderr[-3000:]}")
    said = re.search(r"Scored (\d+) rows in ([\d.]+) s", result.stdout)
    return seconds, float(said.group(2)), int(said.group(1))


def run_serving(signature, rows):
    """Seconds for the export's signature over `rows`, batches of 32, files read as bytes."""
    import tensorflow as tf

    start = time.perf_counter()
    for i in range(0, len(rows), BATCH):
        batch = rows[i:i + BATCH]
        images = []
        for row in batch:
            with open(row["image"], "rb") as f:
                images.append(f.read())
        signature(image=tf.constant(images), text=tf.constant([r["title_masked"] for r in batch]))
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (best kept)")
    parser.add_argument("--work-dir", help="keep the export and outputs here (default: a "
                                           "temporary folder)")
    parser.add_argument("--quick", action="store_true",
                        help="256 rows, one repeat, to check the script; writes nothing")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
    import tensorflow as tf

    from keras_mmtl.export import latest_version

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or tmp
        model, saved, manifest, rows = prepare(work, args.quick)
        load = time.perf_counter()
        signature = tf.saved_model.load(latest_version(saved)).signatures["serving_default"]
        load = time.perf_counter() - load
        commands, serving = [], []
        for repeat in range(args.repeats):
            commands.append(run_command(saved, manifest, os.path.join(work, f"out{repeat}.csv")))
            serving.append(run_serving(signature, rows))
            print(f"repeat {repeat + 1}: command {commands[-1][0]:.1f} s (scoring "
                  f"{commands[-1][1]:.1f} s), serving {serving[-1]:.1f} s", flush=True)
    n = len(rows)
    assert all(scored == n for *_, scored in commands), commands
    whole, scoring = (min(figures) for figures in list(zip(*commands))[:2])
    served = min(serving)
    figures = {"command": n / whole, "scoring": n / scoring, "serving": n / served}
    lines = ["| path | seconds (best of %d) | rows/s |" % args.repeats, "|---|---|---|",
             f"| `keras-mmtl predict --manifest`, whole command | {whole:.1f} "
             f"| {figures['command']:.0f} |",
             f"| `keras-mmtl predict --manifest`, scoring as the command reports it "
             f"| {scoring:.1f} | {figures['scoring']:.0f} |",
             f"| `serving_default` signature, batches of {BATCH}, in process | {served:.1f} "
             f"| {figures['serving']:.0f} |"]
    body = (
        f"The fashion test split ({n} rows) scored by the default fused model "
        f"(MobileNetV2-0.35 ImageNet at {model.input['image'].shape[1]}x"
        f"{model.input['image'].shape[2]} + the default text encoder on `title_masked`, concat, "
        f"{model.output_shape[-1]} classes, untrained head), exported. The command writes a "
        f"CSV of the manifest's columns plus label and top-5; its scoring time is what it "
        f"reports (a counting pass, reading, scoring, writing; the model already loaded); its "
        f"whole time adds Python start-up, imports and loading the export "
        f"({whole - scoring:.1f} s; the load alone took {load:.1f} s in this process). Serving "
        f"calls the loaded signature (the load not counted) on the same rows, image files read "
        f"as bytes. Best of "
        f"{args.repeats} alternating repeats; the other engineers' tests and jobs shared the 2 "
        f"cores during the run. Wall time of the benchmark: "
        f"{(time.perf_counter() - started) / 60:.1f} min.\n\n" + "\n".join(lines))
    print(body)
    headline = {
        "batch_predict_rows_per_s": round(figures["scoring"], 1),
        "batch_predict_fraction_of_serving": round(figures["scoring"] / figures["serving"], 3),
        "batch_predict_command_rows_per_s": round(figures["command"], 1),
        "batch_predict_command_fraction_of_serving":
            round(figures["command"] / figures["serving"], 3),
        "batch_predict_serving_rows_per_s": round(figures["serving"], 1),
        "batch_predict_startup_seconds": round(whole - scoring, 1),
    }
    print("\n".join(f"{key}: {value}" for key, value in headline.items()))
    if not args.quick:
        from results import append_section

        append_section("batch_predict", body, headline)


if __name__ == "__main__":
    main()
