import csv
import json
import os
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf

from conftest import claimed_size_jpeg, product_rows, write_image, write_manifest
from keras_mmtl.data import (
    DataValidationError,
    DataWarning,
    from_arrays,
    from_directory,
    make_dataset,
    read_manifest,
    stratified_split,
)
from keras_mmtl.data.manifest import MAX_CSV_CELL


def test_csv_manifest_reads_paths_relative_to_its_folder(products):
    records = read_manifest(products, split_column="split")
    assert records.class_names == ["blue cotton", "blue wool", "red cotton", "red wool"]
    assert records.modalities == ("image", "text")
    assert all(os.path.isfile(path) for path in records.images)
    assert os.path.dirname(records.images[0]).startswith(os.path.dirname(products))
    assert sorted(records.class_counts("test").values()) == [1, 1, 1, 1]


def test_jsonl_manifest_equals_csv(tmp_path, products):
    rows = product_rows(str(tmp_path))
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    from_csv = read_manifest(products, split_column="split")
    from_jsonl = read_manifest(str(path), split_column="split")
    assert from_jsonl.class_names == from_csv.class_names
    np.testing.assert_array_equal(from_jsonl.labels, from_csv.labels)
    np.testing.assert_array_equal(from_jsonl.texts, from_csv.texts)


@pytest.mark.parametrize("image_column, text_column, expected", [
    ("image", None, ("image",)), (None, "text", ("text",))])
def test_single_modality_manifest(products, image_column, text_column, expected):
    records = read_manifest(products, image_column, text_column, split_column="split")
    assert records.modalities == expected


def test_split_aliases_are_normalized(tmp_path):
    rows = [{"text": f"t{i}", "label": "ab"[i // 4], "split": s}
            for i, s in enumerate(["train", "validation", "TEST", "dev"] * 2)]
    records = read_manifest(write_manifest(str(tmp_path), rows), image_column=None,
                            split_column="split")
    assert records.splits.tolist() == ["train", "val", "test", "val"] * 2


def test_stratified_split_is_seeded_and_keeps_proportions():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    splits = stratified_split(labels, 0.2, 0.1, seed=3)
    np.testing.assert_array_equal(splits, stratified_split(labels, 0.2, 0.1, seed=3))
    assert not np.array_equal(splits, stratified_split(labels, 0.2, 0.1, seed=4))
    for label, count in zip([0, 1, 2], [50, 30, 20]):
        assert (splits[labels == label] == "val").sum() == round(count * 0.2)
        assert (splits[labels == label] == "test").sum() == round(count * 0.1)


def test_every_class_keeps_a_training_row():
    splits = stratified_split(np.array([0, 1, 1, 1]), 0.4, 0.4)
    assert splits[0] == "train"


def test_min_class_count_drops_rare_classes_and_reports_them(tmp_path):
    rows = [{"text": f"t{i}", "label": "big" if i < 6 else "mid" if i < 10 else "small"}
            for i in range(12)]
    with pytest.warns(UserWarning, match="Dropped 1 classes"):
        records = read_manifest(write_manifest(str(tmp_path), rows), image_column=None,
                                min_class_count=3, val_fraction=0, test_fraction=0)
    assert records.class_names == ["big", "mid"]
    assert records.report.dropped_classes == {"small": 2}
    assert len(records) == 10


def test_a_models_classes_leave_out_the_rare_classes_its_training_dropped(tmp_path):
    # As `keras-mmtl evaluate --min-class-count 3` reads a manifest for a model of big and mid.
    rows = [{"text": f"t{i}", "label": "big" if i < 6 else "mid" if i < 10 else "small"}
            for i in range(12)]
    path = write_manifest(str(tmp_path), rows)
    with pytest.warns(UserWarning, match="Dropped 1 classes"):
        records = read_manifest(path, image_column=None, class_names=["big", "mid"],
                                min_class_count=3)
    assert records.class_names == ["big", "mid"] and len(records) == 10
    assert records.report.dropped_classes == {"small": 2}
    # An unknown class as frequent as a kept one is not one training dropped: a bad row.
    with pytest.raises(DataValidationError, match="unknown label 'mid'"):
        read_manifest(path, image_column=None, class_names=["big", "small"], min_class_count=3)


def _broken(tmp_path, problem):
    """A valid manifest with one row (line 3 of a CSV, 2 of JSON Lines) broken as `problem` says."""
    if problem in JSONL_LINES or problem in JSONL_VALUES:
        return _broken_jsonl(tmp_path, problem)
    rows = product_rows(str(tmp_path))
    row = rows[1]
    if problem == "missing image":
        row["image"] = "images/nope.jpg"
    elif problem == "undecodable image":
        (tmp_path / "images" / "bad.jpg").write_bytes(b"this is not a jpeg")
        row["image"] = "images/bad.jpg"
    elif problem == "image bomb":  # refused from its header, never decoded
        (tmp_path / "images" / "bomb.jpg").write_bytes(claimed_size_jpeg(12000, 12000))
        row["image"] = "images/bomb.jpg"
    elif problem == "empty text":
        row["text"] = "   "
    elif problem == "empty label":
        row["label"] = ""
    elif problem == "unknown split":
        row["split"] = "holdout"
    elif problem == "NaN label":  # what pandas writes for an empty cell
        row["label"] = "NaN"
    elif problem == "CSV cell over the limit":
        row["text"] = "x" * (MAX_CSV_CELL + 1)
    path = write_manifest(str(tmp_path), rows)
    if problem == "non-UTF-8 text":
        data = open(path, "rb").read().replace(b"a nice wool thing", b"a nice w\xf6ol thing", 1)
        open(path, "wb").write(data)
    return path


BAD_INPUTS = [
    ("missing image", "image", "not found"),
    ("undecodable image", "image", "cannot decode"),
    ("image bomb", "image", "image too large: 12000 x 12000 pixels = 144 megapixels, over the "
                            "limit of 50 megapixels"),
    ("empty text", "text", "empty text"),
    ("non-UTF-8 text", "text", "not valid UTF-8"),
    ("empty label", "label", "empty label"),
    ("unknown split", "split", "unknown split"),
    ("NaN label", "label", "label is 'NaN', the mark of a missing value"),
    ("CSV cell over the limit", "", "not a readable CSV row (field larger than field limit"),
    # JSON Lines:
    ("JSON NaN label", "label", "label is nan (not a number: a missing value?)"),
    ("list label", "label", 'label is a JSON list (["red", "cotton"]), not a text'),
    ("object label", "label", 'label is a JSON object ({"colour": "red"}), not a text'),
    ("object text", "text", "text is a JSON object"),
    ("NaN text", "text", "text is nan (not a number"),
    ("list image", "image", "image path is a JSON list"),
    ("malformed line", "", "not a JSON object (Expecting value)"),
    ("array line", "", "expected a JSON object, found a list"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("problem, field, message", BAD_INPUTS)
def test_bad_row_is_reported_with_file_line_and_field(tmp_path, problem, field, message):
    path = _broken(tmp_path, problem)
    source = os.path.basename(path)
    line = None if problem == "non-UTF-8 text" else 2 if source.endswith(".jsonl") else 3
    with pytest.raises(DataValidationError) as error:
        read_manifest(path, split_column="split")
    text = str(error.value)
    where = f"{source}:{line}" if line else f"{source}:"
    assert f"{where}" in text and message in text
    assert f"field '{field}'" in text if field else f"{where}: {message}" in text
    assert "skip_bad_rows=True" in text


@pytest.mark.bad_input
@pytest.mark.parametrize("problem, field, message", BAD_INPUTS)
def test_skip_bad_rows_leaves_them_out_and_says_so(tmp_path, problem, field, message):
    path = _broken(tmp_path, problem)
    with pytest.warns(UserWarning, match="Skipped 1 of 24 rows"):
        records = read_manifest(path, split_column="split", skip_bad_rows=True)
    assert len(records) == 23
    assert records.report.skipped_rows == 1
    assert records.report.bad_rows[0].field == field


def test_a_csv_text_over_pythons_default_cell_limit_is_read(tmp_path):
    rows = product_rows(str(tmp_path))
    rows[1]["text"] = "wool " * 40_000  # 200,000 characters; csv's default limit: 131,072
    limit = csv.field_size_limit()
    records = read_manifest(write_manifest(str(tmp_path), rows), split_column="split")
    assert max(len(text) for text in records.texts) == 200_000
    assert csv.field_size_limit() == limit  # restored for other readers


def _broken_jsonl(tmp_path, problem):
    """A valid JSON Lines manifest whose line 2 is broken as `problem` says."""
    rows = product_rows(str(tmp_path))
    lines = [json.dumps(row) for row in rows]
    row = rows[1]
    if problem in JSONL_LINES:
        lines[1] = JSONL_LINES[problem]
    else:
        field, value = JSONL_VALUES[problem]
        lines[1] = json.dumps({**row, field: value})  # NaN is written as NaN
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


JSONL_VALUES = {
    "JSON NaN label": ("label", float("nan")),
    "list label": ("label", ["red", "cotton"]),
    "object label": ("label", {"colour": "red"}),
    "object text": ("text", {"en": "a nice wool thing"}),
    "NaN text": ("text", float("nan")),
    "list image": ("image", ["images/001.jpg"]),
}
JSONL_LINES = {
    "malformed line": '{"image": "images/001.jpg", "text": oops}',
    "array line": '["images/001.jpg", "a nice wool thing", "red wool", "train"]',
}


@pytest.mark.bad_input
def test_val_and_test_rows_of_labels_unseen_in_training_are_counted(tmp_path):
    rows = [{"text": f"t{i}", "label": "ab"[i % 2], "split": "train"} for i in range(8)]
    rows += [{"text": f"u{i}", "label": label, "split": split} for i, (label, split) in
             enumerate([("a", "test"), ("new", "test"), ("new", "val"), ("other", "test")])]
    with pytest.warns(DataWarning, match=r"Left 3 val/test rows out of the scores: their labels "
                                         r"never occur in training \(rows in brackets\): "
                                         r"'new' \(2\), 'other' \(1\)"):
        records = read_manifest(write_manifest(str(tmp_path), rows), image_column=None,
                                split_column="split")
    assert records.report.unseen_labels == {"new": 2, "other": 1}
    assert records.class_names == ["a", "b"] and len(records) == 9


def test_val_and_test_rows_that_repeat_a_training_row_are_counted(tmp_path):
    rows = product_rows(str(tmp_path))
    clean = read_manifest(write_manifest(str(tmp_path), rows), split_column="split")
    assert clean.report.duplicates == {}
    test = [row for row in rows if row["split"] == "test"]
    train = [row for row in rows if row["split"] == "train"]
    test[0].update(image=train[0]["image"], text=train[0]["text"])  # the same path
    shutil.copy(tmp_path / train[1]["image"], tmp_path / "images" / "copy.jpg")
    test[1].update(image="images/copy.jpg", text=train[1]["text"])  # the same bytes
    test[2].update(image=train[2]["image"], text="another text")  # not a copy
    with pytest.warns(DataWarning, match="2 test rows repeat a training row exactly"):
        records = read_manifest(write_manifest(str(tmp_path), rows), split_column="split")
    assert records.report.duplicates == {"test": 2}


@pytest.mark.bad_input
@pytest.mark.parametrize("case", ["absolute", "dot-dot", "symlink", "missing outside"])
def test_image_paths_that_leave_the_data_root_are_bad_rows(tmp_path, case):
    root = tmp_path / "root"
    rows = product_rows(str(root))
    outside = tmp_path / "private.jpg"
    write_image(str(outside), (0, 200, 0))
    if case == "symlink":
        os.symlink(outside, root / "images" / "link.jpg")
    rows[1]["image"] = {"absolute": str(outside), "dot-dot": "images/../../private.jpg",
                        "symlink": "images/link.jpg", "missing outside": "../nope.jpg"}[case]
    path = write_manifest(str(root), rows)
    with pytest.raises(DataValidationError, match=r"manifest.csv:3: field 'image': image path "
                                                  r"\S+ leaves the data root") as error:
        read_manifest(path, split_column="split", allowed_root=str(root))
    assert "not found" not in str(error.value)  # nothing outside is looked at
    inside = read_manifest(products_path(root), split_column="split", allowed_root=str(root))
    assert len(inside) == 24  # paths (and a symlink) that stay inside are read
    if case != "missing outside":  # without a root, a user's own paths are read as given
        assert len(read_manifest(path, split_column="split")) == 24


def products_path(root):
    """The valid manifest of `root`'s products, with a symlink inside the root as well."""
    rows = product_rows(str(root))
    os.symlink(root / "images" / "000.jpg", root / "images" / "inside.jpg")
    rows[0]["image"] = "images/sub/../inside.jpg"
    os.makedirs(root / "images" / "sub", exist_ok=True)
    return write_manifest(str(root), rows, name="valid.csv")


def test_the_pixel_limit_checked_is_the_one_training_decodes_with(products):
    with pytest.raises(DataValidationError, match=r"manifest.csv:2: field 'image': image too "
                                                  r"large: 16 x 16 pixels = 0.000256 megapixels"):
        read_manifest(products, split_column="split", max_megapixels=0.0002)
    records = read_manifest(products, split_column="split", max_megapixels=0.0002,
                            check_images=False)
    with pytest.raises(tf.errors.InvalidArgumentError, match="image too large: 16 x 16 pixels"):
        next(iter(make_dataset(records, "test", image_size=(8, 8))))


@pytest.mark.parametrize("labels, options, message", [
    (["shoe"] * 12, {}, "the label column 'label' has 1 distinct label ('shoe');"),
    (["shoe"] * 10 + ["cap"] * 2, {"min_class_count": 3},
     "has 1 distinct label ('shoe') once bad rows and rare classes are left out"),
    (["shoe", ""] * 6, {"skip_bad_rows": True}, "has 1 distinct label ('shoe')"),
])
@pytest.mark.bad_input
def test_a_manifest_of_one_class_is_refused(tmp_path, monkeypatch, labels, options, message):
    rows = [{"image": f"images/{i:03d}.jpg", "text": f"t{i}", "label": label}
            for i, label in enumerate(labels)]
    for row in rows:
        write_image(str(tmp_path / row["image"]), (200, 30, 30))
    path = write_manifest(str(tmp_path), rows)
    if not options:  # refused before any image is decoded
        monkeypatch.setattr("keras_mmtl.data.manifest.find_undecodable", None)
    with pytest.raises(DataValidationError, match=re.escape(message)) as error:
        read_manifest(path, val_fraction=0, test_fraction=0, **options)
    assert str(error.value).startswith("manifest.csv: the label column 'label'")
    assert "--label-column" in str(error.value)
    monkeypatch.undo()  # a model's vocabulary may meet one class (evaluating on it)
    assert len(read_manifest(path, class_names=["cap", "shoe"], **options)) >= 2


@pytest.mark.bad_input
def test_unknown_label_against_a_fixed_vocabulary(products):
    with pytest.raises(DataValidationError, match=r"manifest.csv:2: field 'label': unknown label"):
        read_manifest(products, split_column="split", class_names=["blue wool", "red wool"])


def test_missing_column_names_it_and_the_columns_found(products):
    with pytest.raises(DataValidationError, match=r"missing column\(s\) \['title'\]") as error:
        read_manifest(products, text_column="title")
    assert "Columns found: ['image', 'label', 'split', 'text']" in str(error.value)


def test_jsonl_line_that_is_not_json(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": oops}\n{"text": "b", "label": "y"}\n')
    with pytest.raises(DataValidationError, match="m.jsonl:2: not a JSON object"):
        read_manifest(str(path), image_column=None)


def test_from_arrays_with_image_array_and_integer_labels():
    images = np.zeros((6, 8, 8, 3), np.uint8)
    records = from_arrays([0, 1, 0, 1, 0, 1], images=images, texts=["x"] * 6,
                          class_names=["cat", "dog"], splits=["train"] * 6)
    assert records.image_kind == "array"
    assert records.images.shape == (6, 8, 8, 3)
    assert records.class_names == ["cat", "dog"]


def test_from_arrays_reports_row_index():
    with pytest.raises(DataValidationError, match="row 1 of arrays: field 'text': empty text"):
        from_arrays(["a", "b"], texts=["fine", ""])


def test_from_directory_reads_one_folder_per_class(tmp_path):
    for name, colour in (("blue", (0, 0, 255)), ("red", (255, 0, 0))):
        os.makedirs(tmp_path / name)
        for i in range(5):
            write_image(str(tmp_path / name / f"{i}.png"), colour, fmt="png")
    records = from_directory(str(tmp_path), val_fraction=0.2, test_fraction=0.2)
    assert records.class_names == ["blue", "red"]
    assert records.modalities == ("image",)
    assert records.class_counts() == {"blue": 5, "red": 5}


@pytest.mark.parametrize("reader", ["read_manifest", "from_arrays", "from_directory"])
def test_every_reader_takes_the_same_options(reader, products, tmp_path):
    for name in ("blue", "red"):
        os.makedirs(tmp_path / "folder" / name)
        for i in range(4):
            write_image(str(tmp_path / "folder" / name / f"{i}.png"), (0, 0, 255), fmt="png")
    read = {"read_manifest": lambda **options: read_manifest(products, **options),
            "from_arrays": lambda **options: from_arrays(["a", "b"] * 4, **options,
                                                         texts=[f"t{i}" for i in range(8)]),
            "from_directory": lambda **options: from_directory(str(tmp_path / "folder"),
                                                               **options)}[reader]
    with pytest.raises(TypeError, match=r"Unknown reading option\(s\) \['skip_bad_row'\]"):
        read(skip_bad_row=True)
    # A split drawn from the same options is the same split, whichever reader draws it.
    options = dict(val_fraction=0.25, test_fraction=0.25, seed=3, min_class_count=1,
                   skip_bad_rows=True, check_images=True, allow_missing=False)
    records = read(**options)
    np.testing.assert_array_equal(records.splits, stratified_split(
        records.labels, options["val_fraction"], options["test_fraction"], options["seed"]))


def test_from_tfds_keeps_encoded_images_and_label_names():
    tfds = pytest.importorskip("tensorflow_datasets")
    from keras_mmtl.data import from_tfds

    with tfds.testing.mock_data(num_examples=6):
        records = from_tfds("beans", image_key="image", download=False,
                            splits={"train": "train", "val": "validation", "test": "test"})
    assert records.image_kind == "bytes"
    assert records.class_names == ["angular_leaf_spot", "bean_rust", "healthy"]
    assert sorted(set(records.splits)) == ["test", "train", "val"]
