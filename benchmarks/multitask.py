"""Multi-task heads on the fashion data: one model for five label columns, against one task alone.

On the benchmark task of ../shared/data (article_type from the photo and `title_masked`,
classes with at least 20 training rows, fixed splits), the same backbones and budget as
`benchmarks/fusion.py`: MobileNetV2-0.35 (ImageNet, ../shared/weights) at 128x96 + text from
scratch, concat fusion, `train`'s defaults for phase 1 (frozen image backbone, cached
features, early stopping) and no phase 2. Three models:

- article_type alone (the one-task model);
- a multi-task model with one head each for article_type, master_category, sub_category,
  base_colour and usage (loss weights 1);
- the same with auxiliary heads (`auxiliary_heads=True`, weight 0.3): one head per task on
  the image features alone and one on the text features alone.

Each is scored on the test split, every task. Prints a table and appends a section with
the headline figures to `benchmarks/RESULTS.md`. About 5 minutes on 2 CPU cores. Run from
the repository root:

    python benchmarks/multitask.py
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from keras_mmtl import build_classifier_for, evaluate, train  # noqa: E402
from results import append_section  # noqa: E402
from training import fashion_records  # noqa: E402
from transfer import IMAGE  # noqa: E402

TASKS = ["article_type", "master_category", "sub_category", "base_colour", "usage"]


def run(records, name, work, cache_dir, epochs, **build):
    keras.utils.set_random_seed(0)
    model = build_classifier_for(records, **IMAGE, **build)
    start = time.perf_counter()
    history = train(model, records, os.path.join(work, name), epochs=epochs, fine_tune_epochs=0,
                    cache_dir=cache_dir, verbose=0)
    seconds = time.perf_counter() - start
    reports = evaluate(model, records, "test")
    reports = reports if isinstance(reports, dict) else {records.label_name: reports}
    scores = {task: (r.accuracy, r.macro_f1) for task, r in reports.items()}
    print(f"{name:<24} " + "; ".join(f"{t} {a:.4f}/{f:.4f}" for t, (a, f) in scores.items())
          + f"; {len(history['loss'])} epochs, {seconds:.0f} s", flush=True)
    return {"model": name, "scores": scores, "epochs": len(history["loss"]),
            "seconds": seconds, "parameters": model.count_params()}


def table(results):
    lines = ["| model | " + " | ".join(f"{t} acc / macro-F1" for t in TASKS)
             + " | epochs | train time (s) | parameters |",
             "|---|" + "---|" * (len(TASKS) + 3)]
    for r in results:
        cells = [f"{r['scores'][t][0]:.4f} / {r['scores'][t][1]:.4f}" if t in r["scores"]
                 else "-" for t in TASKS]
        lines.append(f"| {r['model']} | " + " | ".join(cells)
                     + f" | {r['epochs']} | {r['seconds']:.0f} | {r['parameters']:,} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="phase-1 epochs at most")
    parser.add_argument("--work-dir", help="keep runs and caches here (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true",
                        help="a few hundred rows and 2 epochs, to check the script; writes nothing")
    args = parser.parse_args()
    rows = {"train": 320, "val": 64, "test": 128}
    single = fashion_records(args.quick, rows=rows)
    multi = fashion_records(args.quick, rows=rows, label_column=TASKS)
    epochs = 2 if args.quick else args.epochs
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or tmp
        cache_dir = os.path.join(work, "cache")  # one feature extraction for every run
        start = time.perf_counter()
        results = [run(single, "article_type alone", work, cache_dir, epochs),
                   run(multi, "five tasks", work, cache_dir, epochs),
                   run(multi, "five tasks + aux heads", work, cache_dir, epochs,
                       auxiliary_heads=True)]
        minutes = (time.perf_counter() - start) / 60
    classes = ", ".join(f"{task} {len(names)}" for task, names in multi.tasks.items())
    body = (f"Fashion data ({len(multi.subset('test'))} test rows; classes: {classes}); "
            "MobileNetV2-0.35 (ImageNet, local file) at 128x96 + text from scratch, concat "
            f"fusion, phase 1 only (frozen backbone, cached features, early stopping on the "
            f"summed validation loss, at most {epochs} epochs), task loss weights 1, auxiliary "
            f"weight 0.3. {minutes:.1f} minutes in all.\n\n{table(results)}")
    print(body)
    alone, tasks, aux = (r["scores"]["article_type"] for r in results)
    headline = {
        "article_type_macro_f1_alone": round(alone[1], 4),
        "article_type_macro_f1_multitask": round(tasks[1], 4),
        "article_type_macro_f1_multitask_aux": round(aux[1], 4),
        **{f"multitask_{t}_accuracy": round(results[1]["scores"][t][0], 4) for t in TASKS[1:]},
    }
    print("\n".join(f"{key}: {value}" for key, value in headline.items()))
    if not args.quick:
        append_section("multitask", body, headline)


if __name__ == "__main__":
    main()
