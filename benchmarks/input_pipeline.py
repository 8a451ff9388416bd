"""Images/s of keras_mmtl's tf.data input pipeline against a plain PIL loop.

Both methods turn the same fashion photos (``../shared/data/fashion/``) into
float32 batches of shape ``(batch, height, width, 3)``:

* pipeline: ``keras_mmtl.data.make_dataset`` (tf.data read + decode + resize
  in parallel, batched, prefetched);
* PIL loop: what tutorial code does, one image at a time in Python
  (``Image.open(path).convert("RGB").resize(...)``, ``np.asarray``), stacked
  into a numpy batch.

Each method first runs one warm-up pass (tf.data tracing; every file in the
OS page cache), reported apart, then ``--repeats`` timed full passes,
alternating between the methods; the best pass of each gives images/s and
``speedup = pipeline / PIL loop``. The figures are printed and a section is
appended to ``benchmarks/RESULTS.md``.

Run from the repository root:

    python benchmarks/input_pipeline.py [--limit N] [--image-size 128x96]
                                        [--batch-size 64] [--repeats 5]
"""

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from keras_mmtl.data import make_dataset, read_manifest  # noqa: E402
from results import append_section  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parent
DEFAULT_MANIFEST = BENCHMARKS.parent.parent / "shared" / "data" / "fashion" / "manifest.csv"


def parse_args():
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST,
                        help="fashion manifest.csv (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None,
                        help="use only the first N rows (default: all)")
    parser.add_argument("--image-size", type=parse_size, default=(128, 96),
                        help="output HEIGHTxWIDTH (default: 128x96)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per method")
    return parser.parse_args()


def parse_size(text):
    """`"128x96"` -> `(128, 96)`."""
    height, width = text.lower().split("x")
    return int(height), int(width)


def load_records(manifest, limit):
    """The manifest's records (images = absolute paths), first `limit` rows.

    `min_class_count=0` keeps every row, including classes absent from train.
    """
    records = read_manifest(manifest, image_column="image", text_column="title_masked",
                            label_column="article_type", split_column="split",
                            min_class_count=0)
    if limit is not None:
        records = records.select(np.arange(min(limit, len(records))))
    return records


def pipeline_pass(records, image_size, batch_size):
    """One full pass of keras_mmtl's tf.data pipeline; returns images seen."""
    dataset = make_dataset(records, image_size=image_size, modalities=("image",),
                           batch_size=batch_size, shuffle=False)
    return sum(int(features["image"].shape[0]) for features, _ in dataset)


def pil_pass(records, image_size, batch_size):
    """One full pass of a tutorial-style PIL loop; returns images seen."""
    height, width = image_size
    paths = list(records.images)
    seen = 0
    for start in range(0, len(paths), batch_size):
        images = []
        for path in paths[start:start + batch_size]:
            with Image.open(path) as image:
                images.append(np.asarray(image.convert("RGB").resize((width, height))))
        batch = np.stack(images).astype(np.float32)
        seen += batch.shape[0]
    return seen


def time_pass(run_pass, records, image_size, batch_size):
    """Seconds of one full pass of `run_pass` over `records`."""
    start = time.perf_counter()
    seen = run_pass(records, image_size, batch_size)
    seconds = time.perf_counter() - start
    if seen != len(records):
        raise RuntimeError(f"{run_pass.__name__} saw {seen} of {len(records)} images")
    return seconds


def time_methods(methods, records, image_size, batch_size, repeats):
    """`{name: (warm-up seconds, [timed pass seconds])}`.

    Passes of the methods alternate, so load from other processes hits both alike.
    """
    warmups = {name: time_pass(run_pass, records, image_size, batch_size)
               for name, run_pass in methods.items()}
    passes = {name: [] for name in methods}
    for _ in range(repeats):
        for name, run_pass in methods.items():
            passes[name].append(time_pass(run_pass, records, image_size, batch_size))
    return {name: (warmups[name], passes[name]) for name in methods}


def summarize(name, warmup, passes, count):
    """One result row: seconds and images/s of the best timed pass."""
    best = min(passes)
    return {"method": name, "warmup_s": warmup, "best_s": best,
            "median_s": statistics.median(passes), "images_per_s": count / best}


def format_table(rows):
    """Markdown table of `summarize` rows."""
    lines = ["| method | warm-up pass (s) | best pass (s) | median pass (s) | images/s (best) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['warmup_s']:.2f} | {r['best_s']:.2f} | "
              f"{r['median_s']:.2f} | {r['images_per_s']:,.0f} |" for r in rows]
    return "\n".join(lines)


def write_results(args, count, rows, speedup):
    """Appends this run's section to RESULTS.md."""
    height, width = args.image_size
    body = (
        f"{count} images of `{args.manifest.parent.name}/{args.manifest.name}`, "
        f"output {height}x{width} (HxW) float32, batch {args.batch_size}; one warm-up "
        f"pass per method (not counted), then best of {args.repeats} passes, alternating "
        f"between the methods.\n\n{format_table(rows)}"
    )
    append_section("input_pipeline", body, {"pipeline_speedup_vs_pil_loop": f"{speedup:.2f}"})


def main():
    args = parse_args()
    records = load_records(args.manifest.resolve(), args.limit)
    methods = {"keras_mmtl tf.data pipeline": pipeline_pass, "PIL loop": pil_pass}
    timings = time_methods(methods, records, args.image_size, args.batch_size, args.repeats)
    rows = [summarize(name, warmup, passes, len(records))
            for name, (warmup, passes) in timings.items()]
    speedup = rows[0]["images_per_s"] / rows[1]["images_per_s"]
    print(format_table(rows))
    print(f"pipeline_speedup_vs_pil_loop: {speedup:.2f}")
    write_results(args, len(records), rows, speedup)


if __name__ == "__main__":
    main()
