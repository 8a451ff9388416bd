"""Recipe choices on selection cuts: the members of default runs, scored alone and combined.

Choices of the default recipe are made on held-out data cut from the shared train split,
never on the shared test split (which only reports):

1. cuts: the shared train split's rows, shuffled with `random.Random(300)`, give `--cuts`
   disjoint chunks of 15%; cut k tests on chunk k, validates on the shared val split, and
   trains on the rest of the shared train split (manifests written to
   `<work-dir>/cut<k>/manifest.csv`, with absolute image paths);
2. runs: `keras-mmtl train` as in the README's fashion command on each cut, with each of
   `--seeds`, and the flags given after `--` (a choice to try); a run whose report exists
   is not trained again;
3. members: every model a run trained (`member1`, and its experts `member1-<input>`),
   scored on the cut's test split without calibration (which does not change a
   prediction), alone and in every combination, each combination as the served ensemble
   combines them (the geometric mean of their probabilities). Macro-F1 per run, and the
   mean over runs.

Prints the table and appends a section to `benchmarks/RESULTS.md`. scikit-learn is a
benchmark dependency only. Each run takes 8 to 10 minutes on 2 CPU cores. Run from the
repository root:

    python benchmarks/selection.py --work-dir /tmp/selection
    python benchmarks/selection.py --work-dir /tmp/selection --tag blocks5 -- \
        --unfreeze-blocks 5
"""

import argparse
import csv
import itertools
import os
import random
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from recipe import COMMAND  # noqa: E402
from results import append_section  # noqa: E402
from transfer import FASHION  # noqa: E402

SHARE = 0.15


def write_cuts(work, cuts):
    """Writes each cut's manifest; returns their paths."""
    with open(FASHION, newline="") as f:
        rows = list(csv.DictReader(f))
    folder = os.path.dirname(os.path.abspath(FASHION))
    for row in rows:
        row["image"] = os.path.join(folder, row["image"])
    train = [i for i, row in enumerate(rows) if row["split"] == "train"]
    random.Random(300).shuffle(train)
    size = int(SHARE * len(train))
    if cuts * size > len(train):
        raise ValueError(f"{cuts} cuts of {SHARE:.0%} do not fit in the train split.")
    paths = []
    for k in range(cuts):
        test = set(train[k * size:(k + 1) * size])
        path = os.path.join(work, f"cut{k}", "manifest.csv")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            for i, row in enumerate(rows):
                if row["split"] != "test":
                    writer.writerow({**row, "split": "test" if i in test else row["split"]})
        paths.append(path)
    return paths


def train_run(manifest, run_dir, seed, flags):
    """`keras-mmtl train` on one cut, unless its report exists."""
    if os.path.exists(os.path.join(run_dir, "eval", "report.json")):
        return
    command = [sys.executable, "-m", "keras_mmtl", *COMMAND, *flags, "--seed", str(seed),
               "--run-dir", run_dir, "--no-export"]
    command[command.index("--manifest") + 1] = manifest
    print(f"== {run_dir}: keras-mmtl {' '.join(command[3:])}", flush=True)
    with open(f"{run_dir}.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)


def member_scores(manifest, run_dir):
    """Macro-F1 on the cut's test split of each combination of the run's members."""
    import keras
    import numpy as np
    from sklearn.metrics import f1_score

    from keras_mmtl import read_manifest
    from keras_mmtl.evaluation import predict_records, uncalibrated
    from keras_mmtl.models import describe

    def read(tasks):
        return read_manifest(manifest, "image", "title_masked", list(tasks), "split",
                             min_class_count=20)

    names = sorted(name for name in os.listdir(run_dir) if name.startswith("member")
                   and os.path.exists(os.path.join(run_dir, name, "model.keras")))
    logs = {}
    for name in names or [""]:  # a run of one model keeps it in the run folder itself
        model = keras.saving.load_model(os.path.join(run_dir, name, "model.keras"))
        tasks = list(describe(model).tasks)  # a multi-task model's columns, article_type first
        with uncalibrated(model):
            labels, probabilities = predict_records(
                model, read([task for task in tasks if task] or ["article_type"]), "test")
        if isinstance(probabilities, dict):  # auxiliary heads or tasks: the main output's
            labels, probabilities = labels[tasks[0]], probabilities[tasks[0]]
        logs[name.replace("member1", "fused").replace("fused-", "") or "model"] = np.log(
            np.clip(probabilities, 1e-12, 1))
    scores = {}
    for size in range(1, len(logs) + 1):
        for combination in itertools.combinations(logs, size):
            predicted = sum(logs[name] for name in combination).argmax(-1)
            scores[" + ".join(combination)] = f1_score(labels, predicted, average="macro")
    return scores


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", required=True, help="cuts and runs go here")
    parser.add_argument("--cuts", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--tag", default="", help="names the runs of the flags after --")
    parser.add_argument("flags", nargs="*", help="keras-mmtl train flags to try (after --)")
    args = parser.parse_args()
    manifests = write_cuts(args.work_dir, args.cuts)
    table = {}
    for k, manifest in enumerate(manifests):
        for seed in args.seeds:
            name = f"cut{k}-s{seed}" + (f"-{args.tag}" if args.tag else "")
            run_dir = os.path.join(args.work_dir, "runs", name)
            os.makedirs(os.path.dirname(run_dir), exist_ok=True)
            train_run(manifest, run_dir, seed, args.flags)
            table[name] = member_scores(manifest, run_dir)
            print(name, {key: round(value, 4) for key, value in table[name].items()},
                  flush=True)
    columns = list(next(iter(table.values())))
    rows = ["| run | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    rows += [f"| {name} | " + " | ".join(f"{scores[c]:.4f}" for c in columns) + " |"
             for name, scores in table.items()]
    means = {c: sum(scores[c] for scores in table.values()) / len(table) for c in columns}
    rows.append("| mean | " + " | ".join(f"{means[c]:.4f}" for c in columns) + " |")
    body = (f"Selection cuts of the fashion task ({args.cuts} cuts, seeds "
            f"{', '.join(map(str, args.seeds))}; flags: `{' '.join(args.flags) or 'none'}`). "
            "Macro-F1 on each cut's test split of the run's members alone and combined "
            "(geometric mean, no calibration):\n\n" + "\n".join(rows))
    print(body)
    append_section("selection", body, {})


if __name__ == "__main__":
    main()
