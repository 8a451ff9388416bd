"""Accuracy of the demo's image-only, text-only and fused models, as `keras-mmtl demo` trains them.

Runs `keras_mmtl.run_demo` with its default settings in a temporary folder (offline it
trains the small CNN image branch from scratch, as the demo does), prints the table and
appends a section to `benchmarks/RESULTS.md` with the headline figures
`demo_fused_accuracy` and `demo_best_single_modality_accuracy`.

Run from the repository root:

    python benchmarks/demo.py [--image-weights imagenet|none|PATH]
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_mmtl import run_demo  # noqa: E402
from results import append_section  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-weights", default="imagenet",
                        help="'imagenet', 'none' or a local MobileNetV2-0.35 weights file")
    args = parser.parse_args()
    weights = None if args.image_weights.lower() == "none" else args.image_weights
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        results = run_demo(os.path.join(folder, "runs"), os.path.join(folder, "saved"),
                           image_weights=weights, verbose=0)
        minutes = (time.perf_counter() - start) / 60
    reports = results["reports"]
    rows = "\n".join(f"| {name} | {r.accuracy:.3f} | {r.macro_f1:.3f} |"
                     for name, r in reports.items())
    best_single = max(reports["image only"].accuracy, reports["text only"].accuracy)
    tested = int(reports["image + text"].confusion.sum())
    body = (f"`run_demo` defaults (1,200 samples, {tested} in the test split), {minutes:.1f} "
            f"minutes for the three models and the export.\n\n| model | accuracy | macro-F1 |\n"
            f"|---|---|---|\n{rows}")
    append_section("demo", body, {
        "demo_fused_accuracy": f"{reports['image + text'].accuracy:.3f}",
        "demo_best_single_modality_accuracy": f"{best_single:.3f}",
    })


if __name__ == "__main__":
    main()
