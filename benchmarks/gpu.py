"""One GPU command: float32 against the automatic mixed precision, XLA off and on, no NaN.

On a seeded sample of the fashion benchmark task (4,000 training and 500 validation rows) (see benchmarks/training.py: article type from the
photo and the masked title, MobileNetV2-0.35 with the offline ImageNet weights of
../shared/weights at 224x168 (the default size), the default text encoder), four runs of
`keras_mmtl.train`, each in a fresh process:

| run | precision | XLA (`jit_compile`) |
|---|---|---|
| float32 | `float32` | False |
| float32 + XLA | `float32` | True |
| auto | `setup_precision("auto")`: mixed_bfloat16 or mixed_float16 by the GPU | False |
| auto + XLA | the same | True |

Each run extracts the frozen features once (timed), trains phase 1 on them (3 epochs) and
phase 2, the top backbone blocks fine-tuned (2 epochs), and reports training samples per
second of each phase (median of the epochs after the first; the first traces and compiles),
the policy `auto` chose, and whether every loss was finite. A run that fails (XLA cannot
compile a layer, NaN) is reported with its error; the others go on.

Prints a table and appends a section to `benchmarks/RESULTS.md`, headline lines
`gpu_<run>_phase{1,2}_samples_per_s`, `gpu_auto_speedup` (phase 2, auto over float32),
`gpu_xla_speedup` (phase 2, auto + XLA over auto) and `gpu_nonfinite_runs`. About 5 minutes
on one recent GPU; `--quick` (300 training rows, 2 epochs a phase, also on a CPU) only checks the
script and writes nothing. Run from the repository root:

    python benchmarks/gpu.py
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from training import TrainingTimer, fashion_records, throughput  # noqa: E402

RUNS = {"float32": ("float32", False), "float32_xla": ("float32", True),
        "auto": ("auto", False), "auto_xla": ("auto", True)}
ROWS, QUICK_ROWS = {"train": 4000, "val": 500}, {"train": 300, "val": 64}
EPOCHS, QUICK_EPOCHS = (3, 2), (2, 2)  # phase 1, phase 2 (the first epoch traces)


def measure(run, work, quick):
    """One run, in this process: its figures."""
    import tensorflow as tf

    from keras_mmtl import build_classifier_for, train
    from keras_mmtl.training import setup_precision
    from transfer import IMAGE, extract

    precision, jit = RUNS[run]
    policy = setup_precision(precision)
    records = fashion_records(True, rows=QUICK_ROWS if quick else ROWS)  # a seeded sample
    samples = len(records.subset("train"))
    model = build_classifier_for(records, **{**IMAGE, "image_size": None})  # the default size
    cache_dir = os.path.join(work, "cache")
    extraction = extract(model, records, cache_dir)
    timer = TrainingTimer()
    epochs, fine_tune_epochs = QUICK_EPOCHS if quick else EPOCHS
    history = train(model, records, os.path.join(work, "run"), epochs=epochs,
                    fine_tune_epochs=fine_tune_epochs, patience=10, cache_dir=cache_dir,
                    jit_compile=jit, projector=False, callbacks=[timer], verbose=2)
    gpus = tf.config.list_physical_devices("GPU")
    return {
        "run": run, "policy": policy, "jit_compile": jit, "train_rows": samples,
        "device": (tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
                   if gpus else "CPU"),
        "extraction_s": extraction,
        "phase1": throughput(timer.phases[0], samples),
        "phase2": throughput(timer.phases[1], samples),
        "finite": all(math.isfinite(value) for key in ("loss", "val_loss")
                      for value in history.get(key, [])),
    }


def run_in_subprocess(run, work, quick):
    """`measure` in a fresh process; its error instead of figures when it fails."""
    folder = os.path.join(work, run)
    os.makedirs(folder)
    out = os.path.join(folder, "figures.json")
    command = [sys.executable, os.path.abspath(__file__), "--measure", run, "--work-dir", folder,
               "--out", out] + (["--quick"] if quick else [])
    print(f"== {run}: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return {"run": run, "error": lines[-1] if lines else f"exit {done.returncode}"}
    with open(out) as f:
        figures = json.load(f)
    figures["wall_s"] = time.perf_counter() - started
    return figures


def table(results):
    lines = ["| run | policy | XLA | phase 1 samples/s | phase 2 samples/s | finite | wall (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['run']} | failed: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['run']} | {r['policy']} | {r['jit_compile']} | "
                     f"{r['phase1']['steady']:,.0f} | {r['phase2']['steady']:,.0f} | "
                     f"{r['finite']} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def headline(results):
    by_run = {r["run"]: r for r in results if "error" not in r}
    lines = {}
    for run, r in by_run.items():
        for phase in ("phase1", "phase2"):
            lines[f"gpu_{run}_{phase}_samples_per_s"] = round(r[phase]["steady"])
    for name, (fast, slow) in {"gpu_auto_speedup": ("auto", "float32"),
                               "gpu_xla_speedup": ("auto_xla", "auto")}.items():
        if fast in by_run and slow in by_run:
            lines[name] = round(by_run[fast]["phase2"]["steady"]
                                / by_run[slow]["phase2"]["steady"], 2)
    lines["gpu_nonfinite_runs"] = sum(not r["finite"] for r in by_run.values())
    lines["gpu_failed_runs"] = len(results) - len(by_run)
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="300 rows, 2 epochs a phase: checks the script; writes nothing")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # RUN, in a child
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        figures = measure(args.measure, args.work_dir, args.quick)
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=2)
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        results = [run_in_subprocess(run, work, args.quick) for run in RUNS]
    device = next((r["device"] for r in results if "device" in r), "unknown")
    rows = (QUICK_ROWS if args.quick else ROWS)["train"]
    body = (f"Four runs of `keras_mmtl.train` on {device}: {rows} fashion training rows, "
            f"MobileNetV2-0.35 at its default size + the default "
            f"text encoder; phase 1 on cached features ({EPOCHS[0]} epochs), phase 2 "
            f"({EPOCHS[1]} epochs); samples/s: median of the epochs after the first. Wall "
            f"time {time.perf_counter() - started:.0f} s.\n\n" + table(results))
    print(body)
    lines = headline(results)
    print("\n".join(f"{key}: {value}" for key, value in lines.items()))
    if not args.quick:
        from results import append_section

        append_section("gpu", body, lines)


if __name__ == "__main__":
    main()
