"""Rows/s and peak memory of reading and checking a large manifest (`read_manifest`).

Generates manifests of 10,000 and 1,000,000 rows over the shared fashion photos
(``../shared/data/fashion/``: each row a real photo by absolute path, its masked title
with the row's number appended so that no two rows repeat, its article type and
split; the ~13,000 photos repeat), then reads each with ``read_manifest`` in a fresh
process, as ``keras-mmtl train`` does (every row checked, every distinct image's
header read), and reports the reading's wall time and the process's peak resident
memory (``ru_maxrss``), beside the memory of the process before it read (Python,
TensorFlow and keras_mmtl imported).

Prints the table and appends a section to ``benchmarks/RESULTS.md`` with the headline
lines ``manifest_rows_per_s_1m``, ``manifest_peak_rss_mb_1m`` and
``manifest_peak_rss_mb_10k``. Run from the repository root (about 5 minutes on 2 CPU
cores; the 1,000,000-row file takes about 150 MB in a temporary folder):

    python benchmarks/manifest.py [--rows 10000 1000000]
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results import append_section  # noqa: E402
from transfer import FASHION  # noqa: E402

COLUMNS = dict(image_column="image", text_column="title_masked", label_column="article_type",
               split_column="split")
# Reads one manifest in this process and prints what it measured, as JSON.
READ = """
import json, resource, sys, time
import keras_mmtl as mm
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
records = mm.read_manifest(sys.argv[1], **json.loads(sys.argv[2]))
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(dict(rows=len(records), seconds=seconds, before_mb=before / 1024,
                      peak_mb=peak / 1024)))
"""


def write_manifest(path, rows):
    """A manifest of `rows` rows cycling over the fashion task's rows, each row distinct."""
    folder = os.path.dirname(os.path.abspath(FASHION))
    with open(FASHION, newline="", encoding="utf-8") as f:
        source = list(csv.DictReader(f))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "title_masked", "article_type", "split"])
        writer.writeheader()
        for i in range(rows):
            row = source[i % len(source)]
            writer.writerow({"image": os.path.join(folder, row["image"]),
                             "title_masked": f"{row['title_masked']} {i}",
                             "article_type": row["article_type"], "split": row["split"]})


def measure(path):
    """`read_manifest` of `path` in a fresh process: rows, seconds, memory before and peak."""
    done = subprocess.run([sys.executable, "-c", READ, path, json.dumps(COLUMNS)],
                          check=True, capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 1_000_000])
    args = parser.parse_args()
    found = {}
    with tempfile.TemporaryDirectory() as work:
        for rows in args.rows:
            path = os.path.join(work, f"manifest-{rows}.csv")
            write_manifest(path, rows)
            found[rows] = measure(path)
            got = found[rows]
            print(f"{rows:>9,} rows: read {got['rows']:,} in {got['seconds']:.1f} s "
                  f"({got['rows'] / got['seconds']:,.0f} rows/s); memory {got['before_mb']:.0f} MB "
                  f"before, {got['peak_mb']:.0f} MB peak", flush=True)
    lines = ["| rows | rows kept | seconds | rows/s | MB before reading | peak MB | "
             "peak - before, bytes per row |", "|---|---|---|---|---|---|---|"]
    for rows, got in found.items():
        lines.append(f"| {rows:,} | {got['rows']:,} | {got['seconds']:.1f} | "
                     f"{got['rows'] / got['seconds']:,.0f} | {got['before_mb']:.0f} | "
                     f"{got['peak_mb']:.0f} | "
                     f"{(got['peak_mb'] - got['before_mb']) * 2**20 / rows:,.0f} |")
    body = ("`read_manifest` of generated manifests over the shared fashion photos (each row "
            "distinct, the photos repeating), each in a fresh process; peak is the process's "
            "`ru_maxrss`.\n\n" + "\n".join(lines))
    headline = {}
    for rows, suffix in ((1_000_000, "1m"), (10_000, "10k")):
        if rows in found:
            headline[f"manifest_peak_rss_mb_{suffix}"] = f"{found[rows]['peak_mb']:.0f}"
    if 1_000_000 in found:
        got = found[1_000_000]
        headline["manifest_rows_per_s_1m"] = f"{got['rows'] / got['seconds']:.0f}"
    print("\n".join(lines))
    for key, value in headline.items():
        print(f"{key}: {value}")
    append_section("manifest", body, headline)


if __name__ == "__main__":
    main()
