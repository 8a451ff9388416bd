"""Property-based tests: manifests of random rows never end in anything but a located error."""

import csv
import json
import os
import re
import warnings

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import write_image  # noqa: E402
from keras_mmtl.data import DataValidationError, read_manifest  # noqa: E402

# JSON values no text stands for, and texts that stand for nothing.
ODD_VALUES = st.one_of(
    st.sampled_from([None, float("nan"), float("inf"), True, 3, "", "   ", "NaN", "nan"]),
    st.lists(st.text(max_size=3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
TEXTS = st.one_of(st.text(max_size=40), st.just("x" * 200_000), ODD_VALUES)
LABELS = st.one_of(st.sampled_from(["red", "blue", "green"]), ODD_VALUES, st.text(max_size=5))
SPLITS = st.one_of(st.sampled_from(["train", "val", "test", "dev"]), ODD_VALUES,
                   st.text(max_size=4))
# What a row's image is: a good file, random bytes, a missing file, or an odd value.
IMAGES = st.one_of(st.sampled_from(["good", "missing"]), st.binary(max_size=64), ODD_VALUES)
FIELDS = {"image": IMAGES, "text": TEXTS, "label": LABELS, "split": SPLITS}
# A few fields of a valid manifest of eight rows, drawn anew.
CHANGES = st.lists(st.tuples(st.integers(0, 7), st.sampled_from(list(FIELDS))).flatmap(
    lambda where: st.tuples(st.just(where), FIELDS[where[1]])), max_size=3)
GARBAGE_LINES = st.lists(st.sampled_from(['{"image": oops', "[1, 2]", '"a string"', "{", "null"]),
                         max_size=2)


def _rows(changes):
    rows = [{"image": "good", "text": f"text {i}", "label": ("red", "blue")[i % 2],
             "split": "train" if i < 6 else "test"} for i in range(8)]
    for (index, field), value in changes:
        rows[index][field] = value
    return rows


def _write(folder, rows, garbage, fmt):
    """Writes the rows (images as files) as a manifest; returns its path."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    write_image(os.path.join(folder, "images", "good.jpg"), (200, 30, 30))
    written = []
    for i, row in enumerate(rows):
        row = dict(row)
        if isinstance(row["image"], bytes):
            with open(os.path.join(folder, "images", f"{i}.bin"), "wb") as f:
                f.write(row["image"])
            row["image"] = f"images/{i}.bin"
        elif row["image"] in ("good", "missing"):
            row["image"] = f"images/{row['image']}.jpg"
        written.append(row)
    path = os.path.join(folder, f"manifest.{fmt}")
    if fmt == "jsonl":
        lines = [json.dumps(row) for row in written] + list(garbage)
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write("\n".join(lines) + "\n")
    else:
        with open(path, "w", newline="", encoding="utf-8", errors="surrogatepass") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "text", "label", "split"])
            writer.writeheader()
            writer.writerows(written)
    return path


@pytest.mark.bad_input
@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(changes=CHANGES, garbage=GARBAGE_LINES, fmt=st.sampled_from(["jsonl", "csv"]),
       skip=st.booleans())
def test_random_rows_read_or_fail_with_a_located_data_error(tmp_path_factory, changes, garbage,
                                                            fmt, skip):
    path = _write(str(tmp_path_factory.mktemp("m")), _rows(changes),
                  garbage if fmt == "jsonl" else [], fmt)
    source = os.path.basename(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            records = read_manifest(path, split_column="split", skip_bad_rows=skip)
    except DataValidationError as error:
        message = str(error)
        assert message.startswith(source) or re.match(r"\d+ of \d+ rows of " + re.escape(source),
                                                      message) or message.startswith("No "), message
        listed = [line for line in message.splitlines() if line.startswith("  ")
                  and not line.startswith("  ... and")]
        for line in listed:  # every listed problem names its line
            assert re.match(rf"  {re.escape(source)}:\d+: ", line), line
        return
    assert len(records) >= 1 and len(records.class_names) >= 2
    assert all(isinstance(text, str) and text.strip() for text in records.texts)
    assert all(isinstance(name, str) and name.lower() != "nan" for name in records.class_names)
    for bad in records.report.bad_rows:
        assert bad.source == source and bad.line >= 1
