"""Test-time mirroring, measured on trained models: each scored as trained and mirror-averaged.

For each run folder given (a finished `keras-mmtl train` run with `--no-test-time-mirror`,
or one from before the option), loads its `model.keras`, reads the run's manifest with the
run's own settings (`config.yaml`), and scores on the test split the model as trained and
`keras_mmtl.mirror_averaged(model)`: the same weights, so the difference is the mirroring
alone (a paired comparison, free of seed noise). Run it on a selection split, never on the
test split the defaults are reported on:

    python benchmarks/mirror.py RUN_DIR [RUN_DIR ...]

Appends a section to `benchmarks/RESULTS.md` with the mean gain in test macro-F1.
"""

import argparse
import os
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402

from keras_mmtl import RunConfig, evaluate, mirror_averaged  # noqa: E402
from keras_mmtl.models import describe
from results import append_section  # noqa: E402


def score(run_dir):
    """`(name, plain macro-F1, mirrored macro-F1, plain accuracy, mirrored accuracy)`."""
    config = RunConfig.from_file(os.path.join(run_dir, "config.yaml"))
    model = keras.models.load_model(os.path.join(run_dir, "model.keras"))
    records = config.data.read(class_names=describe(model).class_names(), check_images=False)
    plain = evaluate(model, records, "test")
    mirrored = evaluate(mirror_averaged(model), records, "test")
    return (os.path.basename(os.path.normpath(run_dir)), plain.macro_f1, mirrored.macro_f1,
            plain.accuracy, mirrored.accuracy)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="finished run folders")
    args = parser.parse_args()
    rows = []
    for run_dir in args.runs:
        rows.append(score(run_dir))
        name, *figures = rows[-1]
        print(f"{name}: macro-F1 {figures[0]:.4f} -> {figures[1]:.4f}, "
              f"accuracy {figures[2]:.4f} -> {figures[3]:.4f}", flush=True)
    table = ["| run | macro-F1 as trained | mirror-averaged | accuracy as trained | "
             "mirror-averaged |", "|---|---|---|---|---|"]
    table += [f"| {name} | {a:.4f} | {b:.4f} | {c:.4f} | {d:.4f} |" for name, a, b, c, d in rows]
    gains = [mirrored - plain for _, plain, mirrored, _, _ in rows]
    append_section("mirror", "\n".join(table), {
        "mirror_macro_f1_gain_points_mean": f"{100 * statistics.mean(gains):.2f}",
        "mirror_runs": len(rows)})


if __name__ == "__main__":
    main()
