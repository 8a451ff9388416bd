"""One feature cache for a cluster: two workers on 127.0.0.1 share it, and a rerun reuses it.

On a slice of the fashion task of ../shared/data (`--rows` rows of the train split, a tenth of
as many of val and of test; article_type from the photo and `title_masked`, MobileNetV2-0.35
ImageNet at 224x168), two processes run the same `keras-mmtl train` as the two workers of a
`MultiWorkerMirroredStrategy` cluster (`TF_CONFIG`), one run folder:

1. the first run: each worker computes the frozen features of every other row of each split
   (phase 1: the backbone's output; phase 2: the feature map below the fine-tuned blocks) into
   the chief's `cache/`, then both train on the whole split;
2. the same command again with `--overwrite` (training state cleared, cache kept): both
   workers read the whole files the chief wrote and compute no features.

Reports each worker's feature computing (rows per worker and its log lines), the cache files,
and `multiworker_cache_reused: 1` when both workers of the second run read every feature from
the cache. Appends a section to benchmarks/RESULTS.md. Run from the repository root:

    python benchmarks/multiworker.py [--rows 800]
"""

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results import append_section  # noqa: E402
from transfer import FASHION, WEIGHTS  # noqa: E402

from keras_mmtl.training.distribute import local_cluster  # noqa: E402

FEATURES = re.compile(r"Backbone features of the (\w+) split(?:, shard (\d) of 2)?: (\d+) rows")


def slice_manifest(rows, folder):
    """A manifest of `rows` train rows and a tenth as many val and test rows, absolute paths."""
    wanted = {"train": rows, "val": rows // 10, "test": rows // 10}
    root, kept = os.path.dirname(os.path.abspath(FASHION)), []
    with open(FASHION, newline="") as f:
        for row in csv.DictReader(f):
            if wanted.get(row["split"], 0) > 0:
                wanted[row["split"]] -= 1
                kept.append({**row, "image": os.path.join(root, row["image"])})
    path = os.path.join(folder, "slice.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(kept[0]))
        writer.writeheader()
        writer.writerows(kept)
    return path


def run_cluster(manifest, run_dir, logs, extra=()):
    """The two workers of one run; `{worker: log text}` and the wall seconds."""
    command = [sys.executable, "-m", "keras_mmtl", "train", "--manifest", manifest,
               "--image-column", "image", "--text-column", "title_masked", "--label-column",
               "article_type", "--split-column", "split", "--min-class-count", "5",
               "--image-backbone", "mobilenet_v2_0.35", "--image-weights", WEIGHTS,
               "--epochs", "2", "--fine-tune-epochs", "1", "--no-modality-experts",
               "--batch-size", "16", "--run-dir", run_dir, "--no-export", *extra]
    start, processes = time.perf_counter(), {}
    for index, config in enumerate(local_cluster(2)):
        log = open(os.path.join(logs, f"worker{index}.log"), "w")
        processes[f"worker{index}"] = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "TF_CONFIG": config, "CUDA_VISIBLE_DEVICES": ""})
    codes = {name: process.wait(timeout=1800) for name, process in processes.items()}
    texts = {name: open(os.path.join(logs, f"{name}.log")).read() for name in processes}
    if set(codes.values()) != {0}:
        tails = "\n".join(text[-2000:] for text in texts.values())
        raise SystemExit(f"A worker failed: {codes}\n{tails}")
    return texts, time.perf_counter() - start


def computed(log):
    """`[(split, shard or None, rows)]` of the feature computing a worker's log reports."""
    return [(split, shard and int(shard), int(rows)) for split, shard, rows in
            FEATURES.findall(log)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=800, help="train rows of the slice")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="multiworker_")
    manifest, run_dir = slice_manifest(args.rows, work), os.path.join(work, "run")
    first_logs, second_logs = (os.path.join(work, name) for name in ("first", "second"))
    os.makedirs(first_logs), os.makedirs(second_logs)
    first, first_seconds = run_cluster(manifest, run_dir, first_logs)
    files = sorted(os.listdir(os.path.join(run_dir, "cache")))
    second, second_seconds = run_cluster(manifest, run_dir, second_logs, ["--overwrite"])
    reused = all(not computed(log) and "on cached image" in log for log in second.values())
    rows = ["| run | worker | features computed (split, shard, rows) | trained on cached "
            "features |", "|---|---|---|---|"]
    for title, logs in (("first", first), ("second (--overwrite)", second)):
        for name, log in logs.items():
            done = "; ".join(f"{split} {shard or '-'} {count}" for split, shard, count in
                             computed(log)) or "none (read from the cache)"
            rows.append(f"| {title} | {name} | {done} | {'on cached image' in log} |")
    shards = [name for name in files if ".shard" in name]
    body = (f"A slice of the fashion task ({args.rows} train rows, {args.rows // 10} val, "
            f"{args.rows // 10} test; MobileNetV2-0.35 ImageNet at 224x168, n-gram text, 2 "
            "epochs + 1 fine-tuning epoch on the top 3 blocks, global batch 32), two workers "
            "of a MultiWorkerMirroredStrategy cluster on 127.0.0.1 sharing one run folder. "
            f"First run {first_seconds:.0f} s, second {second_seconds:.0f} s (both workers on "
            f"the same 2 cores). Cache after the first run: {len(files)} files, "
            f"{len(shards)} of them shards (a shard per worker, split and phase).\n\n" +
            "\n".join(rows))
    print(body)
    append_section("multiworker", body, {"multiworker_cache_reused": int(reused),
                                         "multiworker_cache_files": len(files),
                                         "multiworker_cache_shard_files": len(shards)})


if __name__ == "__main__":
    main()
