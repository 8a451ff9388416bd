"""Fusion types and modality dropout on the fashion task, with a test set that loses modalities.

On the benchmark task of ../shared/data (article_type from the photo and `title_masked`,
55 classes, fixed splits), every fusion of `keras_mmtl.models.FUSIONS` is trained with the
same backbones and budget: MobileNetV2-0.35 (ImageNet, ../shared/weights) at 128x96 and
text from scratch, `missing_modalities=True`, `train`'s defaults for phase 1 (frozen image
backbone, cached features, early stopping) and no phase 2, so that the comparison is about
the fusion and not the fine-tuning. Each is trained twice: without modality dropout and
with `modality_dropout=0.3`. Each model is scored on the test split as is, and on a
degraded copy in which 30% of the samples lose their text and another 30% lose their image
(disjoint, seeded). The accuracy drop is `accuracy(test) - accuracy(degraded test)`.

Prints a table and appends a section with the headline figures to `benchmarks/RESULTS.md`.
About 15 minutes on 2 CPU cores. Run from the repository root:

    python benchmarks/fusion.py
"""

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_mmtl import build_classifier_for, evaluate, train  # noqa: E402
from keras_mmtl.models import FUSIONS  # noqa: E402
from results import append_section  # noqa: E402
from training import fashion_records  # noqa: E402
from transfer import IMAGE  # noqa: E402

DROPOUT = 0.3
LOST = 0.3  # fraction of test samples that lose their text, and (others) their image


def degrade(records, fraction=LOST, seed=0):
    """The test split with `fraction` of its samples without text and as many others without image."""
    test = records.subset("test")
    order = np.random.default_rng(seed).permutation(len(test))
    count = int(round(fraction * len(test)))
    no_text, no_image = (np.isin(np.arange(len(test)), order[a:b])
                         for a, b in ((0, count), (count, 2 * count)))
    return test.without("text", no_text).without("image", no_image)


def run(records, degraded, fusion, modality_dropout, work, cache_dir, epochs):
    keras.utils.set_random_seed(0)
    model = build_classifier_for(records, fusion=fusion, missing_modalities=True,
                                 modality_dropout=modality_dropout, **IMAGE)
    start = time.perf_counter()
    history = train(model, records, os.path.join(work, f"{fusion}-{modality_dropout}"),
                    epochs=epochs, fine_tune_epochs=0, cache_dir=cache_dir, verbose=0)
    seconds = time.perf_counter() - start
    full = evaluate(model, records, "test")
    lost = evaluate(model, degraded, None)
    print(f"{fusion:<13} dropout {modality_dropout:.1f}: test acc {full.accuracy:.4f} "
          f"F1 {full.macro_f1:.4f}; degraded acc {lost.accuracy:.4f}; "
          f"{len(history['loss'])} epochs, {seconds:.0f} s", flush=True)
    return {"fusion": fusion, "dropout": modality_dropout, "accuracy": full.accuracy,
            "macro_f1": full.macro_f1, "degraded_accuracy": lost.accuracy,
            "degraded_macro_f1": lost.macro_f1, "epochs": len(history["loss"]),
            "seconds": seconds}


def table(results):
    lines = ["| fusion | modality dropout | test accuracy | test macro-F1 | degraded accuracy "
             "| degraded macro-F1 | accuracy drop (points) | epochs | train time (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        drop = 100 * (r["accuracy"] - r["degraded_accuracy"])
        lines.append(f"| {r['fusion']} | {r['dropout']:.1f} | {r['accuracy']:.4f} "
                     f"| {r['macro_f1']:.4f} | {r['degraded_accuracy']:.4f} "
                     f"| {r['degraded_macro_f1']:.4f} | {drop:.2f} | {r['epochs']} "
                     f"| {r['seconds']:.0f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fusions", nargs="+", default=list(FUSIONS), choices=list(FUSIONS))
    parser.add_argument("--epochs", type=int, default=30, help="phase-1 epochs at most")
    parser.add_argument("--work-dir", help="keep runs and caches here (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true",
                        help="a few hundred rows and 2 epochs, to check the script; writes nothing")
    args = parser.parse_args()
    records = fashion_records(args.quick, rows={"train": 320, "val": 64, "test": 128})
    degraded = degrade(records)
    epochs = 2 if args.quick else args.epochs
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or tmp
        cache_dir = os.path.join(work, "cache")  # one feature extraction for every run
        start = time.perf_counter()
        results = [run(records, degraded, fusion, dropout, work, cache_dir, epochs)
                   for fusion in args.fusions for dropout in (0.0, DROPOUT)]
        minutes = (time.perf_counter() - start) / 60
    body = (f"Fashion benchmark task ({len(records.subset('test'))} test rows); MobileNetV2-0.35 "
            "(ImageNet, local file) at 128x96 + text from scratch, `missing_modalities=True`, "
            f"phase 1 only (frozen backbone, cached features, early stopping, at most {epochs} "
            f"epochs), modality dropout 0 or {DROPOUT}. Degraded test: {LOST:.0%} of the test "
            f"samples lose their text and another {LOST:.0%} their image. "
            f"{minutes:.1f} minutes in all.\n\n{table(results)}")
    print(body)
    drops = {d: statistics.mean(100 * (r["accuracy"] - r["degraded_accuracy"])
                                for r in results if r["dropout"] == d) for d in (0.0, DROPOUT)}
    headline = {f"{r['fusion']}_macro_f1": round(r["macro_f1"], 4)
                for r in results if r["dropout"] == 0.0}
    if set(args.fusions) == set(FUSIONS):  # the drops are averaged over every fusion
        headline["degraded_accuracy_drop_without_modality_dropout"] = round(drops[0.0], 2)
        headline["degraded_accuracy_drop_with_modality_dropout"] = round(drops[DROPOUT], 2)
    print("\n".join(f"{key}: {value}" for key, value in headline.items()))
    if not args.quick:
        append_section("fusion", body + "\n\nAccuracy drops are in points"
                       f"{', averaged over the fusions' if len(args.fusions) > 1 else ''}.",
                       headline)


if __name__ == "__main__":
    main()
