"""Training throughput of the default model: samples/s of phase 1 and phase 2, CPU and GPU.

On the benchmark task of ../shared/data (article_type from the photo and `title_masked`,
55 classes, fixed splits), the model `keras-mmtl train` builds by default (image + text
from scratch, concatenated), with the offline ImageNet MobileNetV2-0.35 of ../shared/weights
at 128x96, trained by `keras_mmtl.train` with its defaults but a short budget:

1. the default run: phase 1 on cached backbone features (3 epochs), then phase 2,
   fine-tuning the backbone's top blocks (2 epochs); the features of train and val are
   extracted once before it, and that extraction is timed on its own;
2. phase 1 without the cache (`cache_features=False`, 2 epochs).

A callback times the training part of each epoch only, from the start of its first batch
to the end of its last (validation, checkpoints and feature extraction left out; Keras
hands each batch's logs to the callbacks as Python numbers, so a batch has finished on the
device when its end is timed). Figures are training samples per second: the median over
the epochs after the first (the first one traces the graph), and the first epoch's.

Each device and precision runs in a subprocess of its own (a Keras dtype policy cannot be
switched cleanly once models are built): float32 on the CPU and, where a GPU is present,
float32 and mixed_float16 on it, side by side (`keras_mmtl.training.setup_precision`).
Prints a table and appends a section to `benchmarks/RESULTS.md`; `--quick` (a few hundred
rows, 2 epochs a run) only checks that the script works and writes nothing. Run from the
repository root:

    python benchmarks/training.py
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

# Epochs of (phase 1 cached, phase 2, phase 1 not cached); --quick shortens them.
EPOCHS = (3, 2, 2)
QUICK_EPOCHS = (2, 2, 2)
QUICK_ROWS = {"train": 320, "val": 64}
PHASES = (("phase1", "phase 1, cached features"), ("phase1_uncached", "phase 1, not cached"),
          ("phase2", "phase 2, top blocks fine-tuned"))


class TrainingTimer(keras.callbacks.Callback):
    """Seconds of the training part of each epoch, per `fit` call (phase).

    From the start of the epoch's first training batch to the end of its
    last: validation, which Keras runs after the last batch, is left out.
    """

    def __init__(self):
        super().__init__()
        self.phases = []  # per fit call: the seconds of each epoch

    def on_train_begin(self, logs=None):
        self.phases.append([])

    def on_epoch_begin(self, epoch, logs=None):
        self._start = self._end = None

    def on_train_batch_begin(self, batch, logs=None):
        if self._start is None:
            self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self._end = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.phases[-1].append(self._end - self._start)


def throughput(seconds, samples):
    """`{"epochs", "first", "steady"}`: samples/s of the first epoch and median of the others."""
    rates = [samples / s for s in seconds]
    return dict(epochs=len(rates), first=rates[0],
                steady=statistics.median(rates[1:]) if len(rates) > 1 else None)


def fashion_records(quick, rows=QUICK_ROWS, label_column="article_type"):
    """The fashion benchmark task's records; with `quick`, a seeded sample of `rows` per split.

    `label_column` may list more label columns (tasks) after `article_type`.
    """
    import numpy as np

    from keras_mmtl import read_manifest
    from transfer import FASHION

    records = read_manifest(FASHION, "image", "title_masked", label_column, "split",
                            min_class_count=20)
    if not quick:
        return records
    rng = np.random.default_rng(0)
    keep = np.concatenate([rng.permutation(np.flatnonzero(records.splits == split))[:count]
                           for split, count in rows.items()])
    return records.select(np.sort(keep))


def trained_default_model(quick, epochs=30):
    """The fashion task's records and its default model after phase 1 (frozen backbone, cached).

    MobileNetV2-0.35 (ImageNet, local file) at 128x96 + scratch text, concat fusion, `train`'s
    defaults, no phase 2; with `quick`, a few hundred rows and 2 epochs.
    """
    import tempfile

    import keras

    from keras_mmtl import build_classifier_for, train
    from transfer import IMAGE

    records = fashion_records(quick, rows={"train": 320, "val": 64, "test": 128})
    keras.utils.set_random_seed(0)
    model = build_classifier_for(records, **IMAGE)
    with tempfile.TemporaryDirectory() as work:
        train(model, records, work, epochs=2 if quick else epochs, fine_tune_epochs=0,
              projector=False, verbose=0)
    return records, model


def trained_from_command_line(doc):
    """`--epochs` and `--quick` of a benchmark on the trained default model: `(args, records, model)`."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="phase-1 epochs at most")
    parser.add_argument("--quick", action="store_true",
                        help="a few hundred rows and 2 epochs, to check the script; writes nothing")
    args = parser.parse_args()
    return (args, *trained_default_model(args.quick, args.epochs))


def measure(device, precision, work, quick):
    """One device and precision, in this process: the figures of the two runs."""
    import tensorflow as tf

    from keras_mmtl import build_classifier_for, train
    from keras_mmtl.training import setup_precision
    from transfer import IMAGE, extract

    gpus = tf.config.list_physical_devices("GPU")
    if (device == "gpu") != bool(gpus):
        raise RuntimeError(f"Asked for the {device} but TensorFlow sees {len(gpus)} GPUs.")
    setup_precision(precision)
    records = fashion_records(quick)
    samples = len(records.subset("train"))
    extracted = samples + len(records.subset("val"))
    cached_epochs, fine_tune_epochs, uncached_epochs = QUICK_EPOCHS if quick else EPOCHS
    figures = dict(device=device, precision=precision, train_rows=samples,
                   device_name=(tf.config.experimental.get_device_details(gpus[0])
                                .get("device_name", "GPU") if gpus else "CPU"))

    # The default run: cached phase 1, then phase 2.
    model = build_classifier_for(records, **IMAGE)
    cache_dir = os.path.join(work, "cache")
    figures["extraction_s"] = extract(model, records, cache_dir)
    figures["extraction_samples_per_s"] = extracted / figures["extraction_s"]
    timer = TrainingTimer()
    patience = max(EPOCHS + QUICK_EPOCHS)  # never stops early
    train(model, records, os.path.join(work, "default"), epochs=cached_epochs,
          fine_tune_epochs=fine_tune_epochs, patience=patience, cache_dir=cache_dir,
          callbacks=[timer], verbose=2)
    figures["phase1"] = throughput(timer.phases[0], samples)
    figures["phase2"] = throughput(timer.phases[1], samples)

    # Phase 1 without the cache: every step runs the frozen backbone.
    model = build_classifier_for(records, **IMAGE)
    timer = TrainingTimer()
    train(model, records, os.path.join(work, "uncached"), epochs=uncached_epochs,
          fine_tune_epochs=0, patience=patience, cache_features=False, callbacks=[timer],
          verbose=2)
    figures["phase1_uncached"] = throughput(timer.phases[0], samples)
    return figures


def run_in_subprocess(device, precision, work, quick):
    """`measure` in a fresh Python process (the GPU hidden for the CPU run)."""
    folder = os.path.join(work, f"{device}-{precision}")
    os.makedirs(folder)
    out = os.path.join(folder, "figures.json")
    env = dict(os.environ)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = "-1"
    command = [sys.executable, os.path.abspath(__file__), "--measure", f"{device}:{precision}",
               "--work-dir", folder, "--out", out] + (["--quick"] if quick else [])
    print(f"== {device}, {precision}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True)
    with open(out) as f:
        figures = json.load(f)
    figures["wall_s"] = time.perf_counter() - start
    return figures


def _rate(value):
    return "-" if value is None else f"{value:,.0f}"


def table(runs, epochs):
    """Phases down, runs across: 'median of later epochs (first epoch)' samples/s."""
    names = [f"{r['device']} {r['precision']}" for r in runs]
    lines = [f"| samples/s: median of epochs 2+ (epoch 1) | {' | '.join(names)} |",
             "|---" * (len(runs) + 1) + "|"]
    for (key, title), count in zip(PHASES, (epochs[0], epochs[2], epochs[1])):
        cells = [f"{_rate(r[key]['steady'])} ({_rate(r[key]['first'])})" for r in runs]
        lines.append(f"| {title}, {count} epochs | {' | '.join(cells)} |")
    cells = [f"{r['extraction_s']:.1f} ({_rate(r['extraction_samples_per_s'])} samples/s)"
             for r in runs]
    lines.append(f"| feature extraction, train + val once: seconds | {' | '.join(cells)} |")
    minutes = [f"{r['wall_s'] / 60:.1f}" for r in runs]
    lines.append(f"| wall time of the run (min) | {' | '.join(minutes)} |")
    return "\n".join(lines)


def headline(runs):
    """`key: value` lines: `_cpu` for CPU float32, `_<device>_<precision>` otherwise."""
    lines, by_run = {}, {(r["device"], r["precision"]): r for r in runs}
    for r in runs:
        suffix = "cpu" if (r["device"], r["precision"]) == ("cpu", "float32") else (
            f"{r['device']}_{r['precision']}")
        for key, _ in PHASES:
            lines[f"{key}_samples_per_s_{suffix}"] = _rate(r[key]["steady"]).replace(",", "")
        lines[f"feature_extraction_s_{suffix}"] = f"{r['extraction_s']:.1f}"
    gpu32, gpu16 = by_run.get(("gpu", "float32")), by_run.get(("gpu", "mixed_float16"))
    if gpu32 and gpu16:
        lines["gpu_mixed_float16_speedup"] = (
            f"{gpu16['phase2']['steady'] / gpu32['phase2']['steady']:.2f}")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", help="keep the runs here, in a new subfolder "
                                           "(default: a temporary folder)")
    parser.add_argument("--precision", help="comma-separated Keras policies of every device's "
                                            "runs (default: float32 on the CPU; float32,"
                                            "mixed_float16 on a GPU)")
    parser.add_argument("--no-cpu", action="store_true",
                        help="where a GPU is present, skip the CPU runs")
    parser.add_argument("--quick", action="store_true",
                        help="a few hundred rows, 2 epochs a run: checks the script; "
                             "RESULTS.md is left alone")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # DEVICE:PRECISION, in a child
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        device, precision = args.measure.split(":")
        figures = measure(device, precision, args.work_dir, args.quick)
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=2)
        return

    import tensorflow as tf

    from results import append_section

    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    asked = args.precision and args.precision.split(",")
    runs_wanted = ([] if has_gpu and args.no_cpu else
                   [("cpu", p) for p in asked or ["float32"]])
    if has_gpu:
        runs_wanted += [("gpu", p) for p in asked or ["float32", "mixed_float16"]]
    epochs = QUICK_EPOCHS if args.quick else EPOCHS
    if args.work_dir:
        os.makedirs(args.work_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = tempfile.mkdtemp(prefix="training-", dir=args.work_dir or tmp)
        start = time.perf_counter()
        runs = [run_in_subprocess(device, precision, work, args.quick)
                for device, precision in runs_wanted]
        total = (time.perf_counter() - start) / 60
    first = runs[0]
    body = (
        f"Fashion benchmark task, {first['train_rows']} train rows"
        f"{' (--quick subset)' if args.quick else ''}; the default model (image + text from "
        f"scratch, concat) with MobileNetV2-0.35 (ImageNet, local file) at 128x96, `train` "
        f"defaults (batch 32, fine-tuning the top 3 blocks) but {epochs[0]} + {epochs[1]} "
        f"epochs, and {epochs[2]} epochs of phase 1 without the feature cache. "
        f"Devices: {', '.join(sorted({r['device_name'] for r in runs}))}. {total:.0f} minutes "
        f"in all.\n\nTraining samples per second, the training part of each epoch only (first "
        f"batch start to last batch end: no validation, no feature extraction); median of the "
        f"epochs after the first, the first epoch (graph tracing) in brackets. Feature "
        f"extraction is the one-off pass of the frozen backbone over train + val before the "
        f"cached phase 1.\n\n{table(runs, epochs)}")
    if any(r["device"] == "gpu" for r in runs):
        body += ("\n\n`gpu_mixed_float16_speedup`: phase 2 samples/s with mixed_float16 over "
                 "float32 on the GPU.")
    lines = headline(runs)
    print(body + "\n\n" + "\n".join(f"{k}: {v}" for k, v in lines.items()))
    if args.quick:
        print("--quick: nothing written to RESULTS.md.")
    else:
        append_section("training", body, lines)


if __name__ == "__main__":
    main()
