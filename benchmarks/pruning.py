"""Magnitude pruning of the fashion model: sparsity against test accuracy and compressed size.

The default model of the fashion benchmark task (../shared/data), trained as in
`benchmarks/calibration.py` (phase 1 only), is copied and pruned to each sparsity with
`keras_mmtl.prune` (every kernel of 1,024 entries or more, image backbone included; 2
fine-tuning epochs at learning rate 1e-4, the sparsity reached over the first half). The
0.0 row gets the same fine-tuning without pruning, so the rows differ by the pruning alone.
Compressed size: the float32 weights after gzip. Appends a section with the headline figures
to `benchmarks/RESULTS.md`. About 8 minutes on 2 CPU cores. Run from the repository root:

    python benchmarks/pruning.py
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_mmtl import evaluate, prune  # noqa: E402
from keras_mmtl.models import clone_classifier  # noqa: E402
from keras_mmtl.training.pruning import compressed_size  # noqa: E402
from results import append_section  # noqa: E402
from training import trained_from_command_line  # noqa: E402

TARGETS = (0.0, 0.5, 0.75, 0.9)


def main():
    args, records, trained = trained_from_command_line(__doc__)
    base = evaluate(trained, records, "test")
    rows = [("trained (not fine-tuned)", 0.0, base.accuracy, base.macro_f1,
             compressed_size(trained))]
    for target in TARGETS:
        model = clone_classifier(trained)
        reached = prune(model, records, target, epochs=1 if args.quick else 2, verbose=0)
        report = evaluate(model, records, "test")
        rows.append((f"pruned to {target:.2f}", reached, report.accuracy, report.macro_f1,
                     compressed_size(model)))
        print(rows[-1], flush=True)
    dense = rows[1][4]
    table = ["| model | sparsity | test accuracy | test macro-F1 | compressed (MiB) | "
             "compressed / unpruned |", "|---|---|---|---|---|---|"]
    table += [f"| {name} | {s:.3f} | {a:.4f} | {f:.4f} | {size / 2**20:.2f} | {size / dense:.3f} |"
              for name, s, a, f, size in rows]
    body = (f"Fashion benchmark task ({len(records.subset('test'))} test rows); the default model "
            "(MobileNetV2-0.35 at 128x96 + scratch text, concat) after phase 1, then "
            "`prune(model, records, target, epochs=2, learning_rate=1e-4)`. Compressed: the "
            "float32 weights after gzip; 'compressed / unpruned' against the 0.00 row.\n\n"
            + "\n".join(table))
    print(body)
    by_target = {target: row for target, row in zip(TARGETS, rows[1:])}
    # Drops (positive: accuracy lost to the pruning), against the same fine-tuning unpruned.
    headline = {f"pruned_{int(100 * t)}_accuracy_drop_points":
                round(100 * (by_target[0.0][2] - by_target[t][2]), 2) for t in TARGETS[1:]}
    headline.update({f"pruned_{int(100 * t)}_compressed_ratio": round(by_target[t][4] / dense, 3)
                     for t in TARGETS[1:]})
    print("\n".join(f"{key}: {value}" for key, value in headline.items()))
    if not args.quick:
        append_section("pruning", body, headline)


if __name__ == "__main__":
    main()
