"""Images/s of keras_mmtl's tf.data input pipeline against the decode limit and a PIL loop.

Every method turns the same fashion photos (``../shared/data/fashion/``) into batches of
shape ``(batch, height, width, 3)``:

* pipeline epoch 1: ``keras_mmtl.data.make_dataset`` built afresh for each pass, as a first
  epoch runs it (tf.data read + pixel-budget check + decode + resize to uint8, in parallel,
  batched, prefetched; tracing included);
* decode limit: the files' bytes already in memory, only ``tf.io.decode_jpeg`` and the
  resize to uint8, in parallel in tf.data: what this machine can decode;
* prepared shards: ``make_dataset`` over ``keras_mmtl.data.prepared_records``, the
  TFRecord shards that ``keras_mmtl.data.prepare`` wrote once (uint8 images at the output
  size, 8 shards, interleaved, parsed a batch at a time); the time to prepare them and the
  one read of their texts and labels (as a run does once) are not in the passes;
* PIL loop: what tutorial code does, one image at a time in Python
  (``Image.open(path).convert("RGB").resize(...)``, ``np.asarray``), stacked into a
  numpy float32 batch.

Each method first runs one warm-up pass (every file in the OS page cache), reported
apart, then ``--repeats`` timed full passes, alternating between the methods; the best
pass of each gives images/s. The figures are printed and a section is appended to
``benchmarks/RESULTS.md`` with the headline lines ``pipeline_epoch1_images_per_s``,
``pipeline_decode_limit_images_per_s``, ``pipeline_prepared_images_per_s`` and
``pipeline_pil_loop_images_per_s``.

Run from the repository root:

    python benchmarks/input_pipeline.py [--limit N] [--image-size 128x96]
                                        [--batch-size 64] [--repeats 5]
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from keras_mmtl.data import make_dataset, prepare, prepared_records, read_manifest  # noqa: E402
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


def decode_limit_pass(encoded, image_size, batch_size):
    """One pass of decode + resize only, over the files' bytes held in memory (`encoded`)."""
    def decode(data):
        image = tf.image.resize(tf.io.decode_jpeg(data, channels=3), image_size)
        return tf.cast(image + 0.5, tf.uint8)

    dataset = tf.data.Dataset.from_tensor_slices(encoded)
    dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    return sum(int(batch.shape[0]) for batch in dataset)


def prepared_pass(prepared, image_size, batch_size):
    """One pass over prepared shards, unshuffled as the other methods; returns images seen."""
    dataset = make_dataset(prepared, "train", image_size=image_size, batch_size=batch_size,
                           shuffle=False, modalities=("image",))
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
        raise RuntimeError(f"A pass saw {seen} of {len(records)} images")
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


def write_results(args, count, rows, prepare_seconds):
    """Appends this run's section to RESULTS.md."""
    height, width = args.image_size
    rates = {row["method"]: row["images_per_s"] for row in rows}
    body = (
        f"{count} images of `{args.manifest.parent.name}/{args.manifest.name}`, "
        f"output {height}x{width} (HxW), batch {args.batch_size}; one warm-up "
        f"pass per method (not counted), then best of {args.repeats} passes, alternating "
        f"between the methods. Preparing the shards took {prepare_seconds:.1f} s."
        f"\n\n{format_table(rows)}\n\nThe first epoch runs at "
        f"{rates[EPOCH1] / rates[LIMIT]:.0%} of the decode limit; prepared shards at "
        f"{rates[PREPARED] / rates[PIL]:.1f}x the PIL loop."
    )
    append_section("input_pipeline", body, {
        "pipeline_epoch1_images_per_s": f"{rates[EPOCH1]:.0f}",
        "pipeline_decode_limit_images_per_s": f"{rates[LIMIT]:.0f}",
        "pipeline_prepared_images_per_s": f"{rates[PREPARED]:.0f}",
        "pipeline_pil_loop_images_per_s": f"{rates[PIL]:.0f}",
    })


EPOCH1, LIMIT, PREPARED, PIL = ("pipeline epoch 1", "decode limit (in-memory bytes)",
                                "prepared shards", "PIL loop")


def main():
    args = parse_args()
    records = load_records(args.manifest.resolve(), args.limit)
    encoded = [Path(path).read_bytes() for path in records.images]
    one_split = records.select(np.ones(len(records), bool))
    one_split.splits = np.full(len(records), "train", dtype=object)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        prepare(one_split, folder, args.image_size)
        prepare_seconds = time.perf_counter() - start
        prepared = prepared_records(folder)  # once, as a run reads it: its epochs are timed
        methods = {EPOCH1: pipeline_pass, PIL: pil_pass,
                   LIMIT: lambda _, *args: decode_limit_pass(encoded, *args),
                   PREPARED: lambda _, *args: prepared_pass(prepared, *args)}
        timings = time_methods(methods, records, args.image_size, args.batch_size,
                               args.repeats)
    rows = [summarize(name, warmup, passes, len(records))
            for name, (warmup, passes) in timings.items()]
    print(format_table(rows))
    write_results(args, len(records), rows, prepare_seconds)


if __name__ == "__main__":
    main()
