"""Batch prediction over a manifest: the answers of `predict`, row by row, written as they come."""

import csv
import json
import os
import re

import numpy as np
import pytest
from conftest import product_rows, write_manifest

from keras_mmtl import predictions, progress, set_verbosity
from keras_mmtl.data import DataValidationError, read_manifest
from keras_mmtl.export import export_saved_model, predict
from keras_mmtl.models import build_classifier_for
from keras_mmtl.predictions import predict_manifest

SMALL = dict(image_backbone="small_cnn", image_weights=None, image_size=(16, 16))
TOP_K = 3


def _rows(folder):
    """The product rows with more columns: a colour and a material task, two numbers."""
    rows = product_rows(folder)
    for i, row in enumerate(rows):
        row["colour"], row["material"] = row["label"].split()
        row["price"], row["weight"] = f"{10 + i}.5", str(i % 3)
    return rows


def _models(folder, **kwargs):
    """A tiny classifier for the rows of `folder`: `{kind: what predict_manifest takes}`."""
    records = read_manifest(os.path.join(folder, "manifest.csv"), split_column="split",
                            **kwargs)
    model = build_classifier_for(records, **SMALL)
    model.save(os.path.join(folder, "model.keras"))
    return {"export": export_saved_model(model, os.path.join(folder, "saved")),
            "keras_file": os.path.join(folder, "model.keras"), "keras_model": model}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """`(folder, rows, models)`: an image + text classifier of 4 classes and its manifest."""
    folder = str(tmp_path_factory.mktemp("single"))
    rows = _rows(folder)
    write_manifest(folder, rows)
    return folder, rows, _models(folder)


def _expected(model, folder, rows, **inputs):
    """What `predict` answers for the rows: `{line: [(label, score), ...]}` (or by task)."""
    answers = predict(model, images=[os.path.join(folder, row["image"]) for row in rows],
                      texts=[row["text"] for row in rows], top_k=TOP_K, **inputs)
    if isinstance(answers, dict):
        return {task: dict(enumerate(one, start=2)) for task, one in answers.items()}
    return dict(enumerate(answers, start=2))  # line 1 is the header


def _written(path, task=None, k=TOP_K):
    """The records of a predictions file, and `{line: [(label, score), ...] or error}`."""
    prefix = "" if task is None else f"{task}_"
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            records = [json.loads(line) for line in f]
        tops = [None if r["error"] else [(t["label"], t["score"]) for t in r[f"{prefix}top"]]
                for r in records]
    else:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            records = list(csv.DictReader(f))
        tops = [None if r["error"] else [(r[f"{prefix}top_{i}_label"],
                                          float(r[f"{prefix}top_{i}_score"]))
                                         for i in range(1, k + 1)] for r in records]
    return records, {int(r["line"]): r["error"] or top for r, top in zip(records, tops)}


def _assert_same(answers, expected):
    assert [label for label, _ in answers] == [label for label, _ in expected]
    np.testing.assert_allclose([s for _, s in answers], [s for _, s in expected], atol=1e-6)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
@pytest.mark.parametrize("kind", ["export", "keras_file", "keras_model"])
def test_every_row_is_scored_as_predict_scores_it(tmp_path, single, kind, suffix):
    folder, rows, models = single
    output = str(tmp_path / f"scores{suffix}")
    summary = predict_manifest(models[kind], os.path.join(folder, "manifest.csv"), output,
                               top_k=TOP_K, batch_size=5)
    assert (summary.rows, summary.failed, summary.path) == (24, 0, output)
    records, answers = _written(output)
    expected = _expected(models["export"] if kind == "keras_file" else models[kind], folder,
                         rows)
    assert list(answers) == list(expected)
    for line, answer in answers.items():
        _assert_same(answer, expected[line])
    assert [r["label"] for r in records] == [answer[0][0] for answer in answers.values()]
    # The manifest's columns are kept; its `label` (named like a prediction) as `input_label`.
    assert [(r["image"], r["text"], r["input_label"]) for r in records] == [
        (row["image"], row["text"], row["label"]) for row in rows]


@pytest.mark.parametrize("batch_size", [1, 23, 24, 25])
def test_every_batch_size_writes_every_row_once_in_order(tmp_path, single, batch_size):
    folder, rows, models = single
    output = str(tmp_path / "scores.csv")
    predict_manifest(models["export"], os.path.join(folder, "manifest.csv"), output,
                     top_k=TOP_K, batch_size=batch_size)
    _, answers = _written(output)
    expected = _expected(models["export"], folder, rows)
    assert list(answers) == list(expected)
    for line, answer in answers.items():
        _assert_same(answer, expected[line])


@pytest.mark.bad_input
@pytest.mark.parametrize("kind, no_image", [
    ("export", r"cannot score: .+ \(the image input 'image' is empty\)"),  # the decoder's words
    ("keras_model", r"column 'image': no image; this model needs one in every row"),
])
def test_a_row_that_cannot_be_scored_gets_an_error_and_the_others_are_scored(tmp_path, single,
                                                                             kind, no_image):
    folder, rows, models = single
    rows = [dict(row) for row in rows]
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    rows[3]["image"] = "images/missing.jpg"
    rows[5]["image"] = str(tmp_path / "junk.jpg")
    rows[6]["image"] = ""
    rows[8]["text"] = "a nice NOT-UTF-8 thing"
    manifest = write_manifest(folder, rows, name=f"bad-{kind}.csv")
    with open(manifest, "rb") as f:
        data = f.read().replace(b"NOT-UTF-8", b"\xff")
    with open(manifest, "wb") as f:
        f.write(data)
    summary = predict_manifest(models[kind], manifest, str(tmp_path / "scores.csv"),
                               top_k=TOP_K, batch_size=8)
    assert (summary.rows, summary.failed) == (24, 4)
    records, answers = _written(summary.path)
    assert "image file not found: " in answers[5] and answers[5].endswith("missing.jpg")
    assert answers[7].startswith("cannot score: ") and "image" in answers[7]  # the decoder's
    assert re.fullmatch(no_image, answers[8])  # an export cannot tell which images may lack
    assert answers[10] == "column 'text': the text is not valid UTF-8; save the file as UTF-8"
    assert records[8]["text"] == "a nice \udcff thing"  # written back as the same bytes
    good = [row for i, row in enumerate(rows) if i not in (3, 5, 6, 8)]
    expected = _expected(models[kind], folder, good)
    for (line, answer), want in zip(((line, a) for line, a in answers.items()
                                     if line not in (5, 7, 8, 10)), expected.values()):
        _assert_same(answer, want)


def test_a_jsonl_manifest_is_scored_like_its_csv(tmp_path, single):
    folder, rows, models = single
    manifest = os.path.join(folder, "manifest.jsonl")
    with open(manifest, "w", encoding="utf-8") as f:
        for row in rows[:3]:
            f.write(json.dumps(row) + "\n")
        f.write("{not json\n")
    predict_manifest(models["export"], manifest, str(tmp_path / "from_jsonl.csv"),
                     top_k=TOP_K)
    predict_manifest(models["export"], os.path.join(folder, "manifest.csv"),
                     str(tmp_path / "from_csv.csv"), top_k=TOP_K)
    _, from_jsonl = _written(str(tmp_path / "from_jsonl.csv"))
    _, from_csv = _written(str(tmp_path / "from_csv.csv"))
    for jsonl_line, csv_line in ((1, 2), (2, 3), (3, 4)):  # (batches differ: last digits too)
        _assert_same(from_jsonl[jsonl_line], from_csv[csv_line])
    assert from_jsonl[4].startswith("not a JSON object")


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("multi"))
    rows = _rows(folder)
    write_manifest(folder, rows)
    return folder, rows, _models(folder, label_column=["colour", "material"])


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
@pytest.mark.parametrize("kind", ["export", "keras_model"])
def test_a_multi_task_model_writes_each_tasks_predictions(tmp_path, multi, kind, suffix):
    folder, rows, models = multi
    output = str(tmp_path / f"scores{suffix}")
    predict_manifest(models[kind], os.path.join(folder, "manifest.csv"), output, top_k=TOP_K)
    expected = _expected(models[kind], folder, rows)
    for task in ("colour", "material"):
        records, answers = _written(output, task, k=2)  # two classes per task
        for line, answer in answers.items():
            _assert_same(answer, expected[task][line])
        assert [r[f"{task}_label"] for r in records] == [a[0][0] for a in answers.values()]
    # No prediction field is named `label` or `colour`: the manifest's keep their names.
    assert (records[0]["label"], records[0]["colour"]) == (rows[0]["label"], rows[0]["colour"])


@pytest.mark.slow
def test_tabular_columns_feed_a_tabular_input(tmp_path):
    folder = str(tmp_path)
    rows = _rows(folder)
    write_manifest(folder, rows)
    models = _models(folder, tabular_columns=["price", "weight"])
    rows[4]["price"] = "cheap"
    manifest = write_manifest(folder, rows, name="score.csv")
    output = str(tmp_path / "scores.csv")
    with pytest.raises(ValueError, match=r"no column is named for \['tabular'\]"):
        predict_manifest(models["export"], manifest, output)
    summary = predict_manifest(models["export"], manifest, output, top_k=TOP_K,
                               tabular_columns=["price", "weight"])
    _, answers = _written(output)
    assert summary.failed == 1 and "'price': 'cheap'" in answers[6]
    good = rows[:4] + rows[5:]
    expected = _expected(models["export"], folder, good, tabular=[
        [float(row["price"]), float(row["weight"])] for row in good])
    for answer, want in zip([a for line, a in answers.items() if line != 6], expected.values()):
        _assert_same(answer, want)


def test_an_interrupted_run_leaves_the_previous_output_whole(tmp_path, single, monkeypatch):
    folder, _, models = single
    output = tmp_path / "scores.csv"
    output.write_text("the previous run's scores\n")
    score = predictions._score

    def interrupted(runner, batch):
        if batch[0][0] > 10:  # a later batch: the first ones are written
            raise KeyboardInterrupt
        return score(runner, batch)

    monkeypatch.setattr(predictions, "_score", interrupted)
    with pytest.raises(KeyboardInterrupt):
        predict_manifest(models["export"], os.path.join(folder, "manifest.csv"), str(output),
                         batch_size=4)
    assert os.listdir(tmp_path) == ["scores.csv"]
    assert output.read_text() == "the previous run's scores\n"


@pytest.mark.bad_input
@pytest.mark.parametrize("change, error, message", [
    ({"output": "scores.txt"}, ValueError, r"Unsupported output file .*scores.txt: expected a "
                                           r"name ending in .csv or .jsonl"),
    ({"manifest": "missing.csv"}, FileNotFoundError, "Manifest not found: .*missing.csv"),
    ({"manifest": "images/000.jpg"}, ValueError, "Unknown manifest format: .*000.jpg. Expected "
                                                 "a .csv or .jsonl file"),
    ({"image_column": "photo"}, DataValidationError,
     r"manifest.csv: missing column\(s\) \['photo'\]. Columns found: \['image', 'text'"),
    ({"text_column": None}, ValueError, r"This model takes inputs \['image', 'text'\]; no "
                                        r"column is named for \['text'\]"),
    ({"output": "manifest.csv"}, ValueError, "is the manifest; write the predictions to "
                                             "another file"),
])
def test_unusable_arguments_are_refused_before_anything_is_written(tmp_path, single, change,
                                                                   error, message):
    folder, _, models = single
    arguments = {"manifest": "manifest.csv", "output": str(tmp_path / "scores.csv"),
                 "image_column": "image", "text_column": "text", **change}
    for name in ("manifest", "output"):
        arguments[name] = os.path.join(folder, arguments[name])
    before = sorted(os.listdir(folder))
    with pytest.raises(error, match=message):
        predict_manifest(models["export"], **arguments)
    assert os.listdir(tmp_path) == [] and sorted(os.listdir(folder)) == before


def test_off_a_terminal_progress_is_one_line(tmp_path, single, capsys, monkeypatch):
    folder, _, models = single
    monkeypatch.setattr(progress, "interactive", lambda: False)
    predict_manifest(models["export"], os.path.join(folder, "manifest.csv"),
                     str(tmp_path / "scores.csv"), batch_size=8)
    lines = capsys.readouterr().out.splitlines()
    assert [re.sub(r"[\d.]+ s$", "N s", line) for line in lines] == [
        "Scoring manifest.csv: 24 rows in N s"]


def test_on_a_terminal_progress_is_a_keras_bar(tmp_path, single, capsys, monkeypatch):
    folder, _, models = single
    monkeypatch.setattr(progress, "interactive", lambda: True)
    predict_manifest(models["export"], os.path.join(folder, "manifest.csv"),
                     str(tmp_path / "scores.csv"), batch_size=8)
    out = capsys.readouterr().out
    assert out.startswith("Scoring manifest.csv:\n") and "24/24" in out


def test_quiet_shows_no_progress(tmp_path, single, capsys):
    folder, _, models = single
    set_verbosity("warning")
    try:
        predict_manifest(models["export"], os.path.join(folder, "manifest.csv"),
                         str(tmp_path / "scores.csv"), batch_size=8)
    finally:
        set_verbosity("info")
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("kind", ["export", "keras_model"])
def test_top_k_is_at_most_the_classes_the_model_returns(tmp_path, single, kind):
    folder, _, models = single
    output = str(tmp_path / "scores.csv")
    predict_manifest(models[kind], os.path.join(folder, "manifest.csv"), output, top_k=10)
    with open(output, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f))
    assert "top_4_score" in header and "top_5_label" not in header  # 4 classes
