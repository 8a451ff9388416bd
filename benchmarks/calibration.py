"""Temperature scaling on the fashion task: the expected calibration error before and after.

The default model of the fashion benchmark task (../shared/data): MobileNetV2-0.35 (ImageNet,
../shared/weights) at 128x96 + scratch text, concat fusion, `train`'s defaults for phase 1
(frozen backbone, cached features, early stopping) and no phase 2. Temperature scaling is
fitted on the val split (`keras_mmtl.calibrate`) and the test split is scored before and after
(15-bin expected calibration error, negative log-likelihood; accuracy cannot change). Appends a
section with the headline figures to `benchmarks/RESULTS.md`. About 2 minutes on 2 CPU cores.
Run from the repository root:

    python benchmarks/calibration.py
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_mmtl import calibrate, evaluate  # noqa: E402
from keras_mmtl.calibration import negative_log_likelihood  # noqa: E402
from keras_mmtl.evaluation import predict_records, rescale  # noqa: E402
from results import append_section  # noqa: E402
from training import trained_from_command_line  # noqa: E402


def main():
    args, records, model = trained_from_command_line(__doc__)
    labels, raw = predict_records(model, records, "test")
    fitted = calibrate(model, records, "val")
    report = evaluate(model, records, "test")
    nll = {"before": negative_log_likelihood(labels, raw),
           "after": negative_log_likelihood(labels, rescale(raw, fitted.temperature))}
    rows = [("val", fitted.ece_before, fitted.ece_after, fitted.nll_before, fitted.nll_after),
            ("test", report.ece_uncalibrated, report.ece, nll["before"], nll["after"])]
    table = "\n".join(["| split | ECE before | ECE after | NLL before | NLL after |",
                       "|---|---|---|---|---|"] + [
        f"| {split} | {a:.4f} | {b:.4f} | {c:.4f} | {d:.4f} |" for split, a, b, c, d in rows])
    body = (f"Fashion benchmark task ({len(records.subset('test'))} test rows, "
            f"{len(records.class_names)} classes); the default model (MobileNetV2-0.35 at 128x96 "
            "+ scratch text, concat), phase 1 only. Temperature fitted on val: "
            f"T = {fitted.temperature:.3f}; test accuracy {report.accuracy:.4f} (unchanged by "
            f"the scaling), macro-F1 {report.macro_f1:.4f}. ECE: 15 equal-width bins.\n\n{table}")
    print(body)
    headline = {"calibration_temperature": round(fitted.temperature, 3),
                "test_ece_before_calibration": round(report.ece_uncalibrated, 4),
                "test_ece_after_calibration": round(report.ece, 4)}
    print("\n".join(f"{key}: {value}" for key, value in headline.items()))
    if not args.quick:
        append_section("calibration", body, headline)


if __name__ == "__main__":
    main()
