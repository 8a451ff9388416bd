"""Batch prediction: every row of a manifest scored and written out, batch by batch."""

import contextlib
import csv
import dataclasses
import itertools
import json
import logging
import math
import os
import time

import numpy as np
import tensorflow as tf

from keras_mmtl.data.manifest import MAX_CSV_CELL, DataValidationError, csv_rows, jsonl_rows
from keras_mmtl.export import output_name, served
from keras_mmtl.files import folder_of, is_file, join_path, open_text, read_bytes, save_atomic
from keras_mmtl.modalities import input_names, modality_kind
from keras_mmtl.progress import Progress, error_gist, logger

MANIFEST_FORMATS = (".csv", ".jsonl", ".json", ".ndjson")  # as read_manifest reads them
OUTPUT_FORMATS = (".csv", ".jsonl")


@dataclasses.dataclass(frozen=True)
class PredictionSummary:
    """What `predict_manifest` did: rows written and failed, its time, the output path.

    `seconds` is the scoring, from reading the first row to the complete
    file, the model already loaded: its rows per second carry over to a
    longer manifest.

    Example:

    >>> print(PredictionSummary(rows=2521, failed=3, seconds=9.8, path="scores.csv"))
    Scored 2521 rows in 9.8 s (257 rows/s); 3 failed (their error field says why). \
Written to scores.csv
    """

    rows: int
    failed: int
    seconds: float
    path: str

    @property
    def rows_per_second(self):
        return self.rows / self.seconds if self.seconds else float("nan")

    def __str__(self):
        failed = (f"; {self.failed} failed (their error field says why)" if self.failed
                  else "")
        return (f"Scored {self.rows} rows in {self.seconds:.1f} s "
                f"({self.rows_per_second:.0f} rows/s){failed}. Written to {self.path}")


def predict_manifest(model, manifest, output, *, top_k=5, batch_size=32, image_column="image",
                     text_column="text", tabular_columns=()):
    """Scores every row of a manifest and writes the predictions as CSV or JSON Lines.

    Rows are read, scored and written a batch at a time, so memory does not
    grow with the manifest. Every image goes through the model's serving
    function (`keras_mmtl.export.serving_function`: the decode of training,
    the pixel limit), so the answers are `keras_mmtl.predict`'s. Labels are
    not needed. A row that cannot be scored (image file missing or
    undecodable, a tabular cell that is not a number, an unreadable line)
    is written with its `error` and the other rows go on. The output is
    written under a temporary name and renamed when complete: an
    interrupted run never leaves a partial file under `output`. Progress
    shows as for the library's other long steps (`keras_mmtl.set_verbosity`).

    Each output row holds `line` (the row's line in the manifest, as
    `read_manifest`'s messages count), the manifest's own columns (one
    named like an output field is kept as `input_<name>`), `label` (the
    most probable class) and the top classes, and `error` (empty when
    scored). In a `.csv` the top classes are columns `top_1_label`,
    `top_1_score`, `top_2_label`, ...; in a `.jsonl` a list `top` of
    `{"label", "score"}`. A multi-task model gives these per task, named
    `<task>_label`, `<task>_top_1_label`, ... (`<task>_top`).

    Args:
        model: a classifier, the path of a `.keras` file, or an exported
            model folder (a version folder, or a TF Serving model folder whose
            newest version is used).
        manifest: a `.csv` (header row) or `.jsonl` file, one row per sample;
            image paths are relative to its folder (or absolute).
        output: the `.csv` or `.jsonl` file to write.
        top_k: classes written per row (at most the model's classes; an
            export returns at most 5).
        batch_size: rows scored together.
        image_column: the column of image paths, a list of them (inputs
            `image`, `image_2`, ...), or `None`, as in `read_manifest`.
        text_column: the column of texts, a list of them, or `None`.
        tabular_columns: the numeric columns of a model with a `tabular`
            input, in training's order.

    Returns:
        `PredictionSummary`: rows written, rows failed, seconds (the model
        loaded), path.

    Raises:
        FileNotFoundError: no manifest, or no model at the path.
        DataValidationError: the manifest lacks a column the model needs.
        ValueError: an output that is not `.csv` or `.jsonl`, or a model
            input no column is named for.

    Example:

    >>> summary = predict_manifest("saved_models/products", "new_products.csv",
    ...                            "scores.csv", text_column="title")  # doctest: +SKIP
    >>> print(summary)  # doctest: +SKIP
    Scored 2521 rows in 9.8 s (257 rows/s). Written to scores.csv
    """
    manifest, output = os.fspath(manifest), os.fspath(output)
    jsonl = os.path.splitext(output)[1].lower() == ".jsonl"
    if os.path.splitext(output)[1].lower() not in OUTPUT_FORMATS:
        raise ValueError(f"Unsupported output file {output}: expected a name ending in "
                         f"{' or '.join(OUTPUT_FORMATS)}.")
    if top_k < 1 or batch_size < 1:
        raise ValueError(f"Expected top_k >= 1 and batch_size >= 1. Received: top_k={top_k}, "
                         f"batch_size={batch_size}")
    if not is_file(manifest):
        raise FileNotFoundError(f"Manifest not found: {manifest}")
    if not manifest.lower().endswith(MANIFEST_FORMATS):
        raise ValueError(f"Unknown manifest format: {manifest}. Expected a .csv or .jsonl file.")
    if os.path.abspath(output) == os.path.abspath(manifest):
        raise ValueError(f"The output {output} is the manifest; write the predictions to "
                         "another file.")
    runner = served(model, top_k)
    started = time.perf_counter()
    columns = _model_columns(runner, image_column, text_column, tabular_columns)
    total = _count_rows(manifest) if logger.isEnabledFor(logging.INFO) else 0
    title = f"Scoring {os.path.basename(manifest)}"
    with _manifest_rows(manifest) as (header, rows), Progress(title, total) as progress:
        missing = sorted({column for name, column in columns.items() for column in (
            column if modality_kind(name) == "tabular" else [column])} - set(header))
        if missing:
            raise DataValidationError(
                f"{os.path.basename(manifest)}: missing column(s) {missing}. Columns found: "
                f"{header}. Name the model's input columns (image_column=, text_column=, "
                "tabular_columns=; CLI: --image-column ...).")
        folder = folder_of(manifest)
        batches = _scored(rows, runner, columns, folder, batch_size)
        written = []  # (rows, failed), from inside save_atomic
        save_atomic(lambda tmp: written.append(_write(tmp, batches, header, runner, jsonl,
                                                      progress)), output)
    return PredictionSummary(*written[0], time.perf_counter() - started, output)


def _write(path, batches, header, runner, jsonl, progress):
    """Writes scored rows to `path` as they come; returns `(rows, failed)`.

    On any failure (or Ctrl-C) the file is removed.
    """
    fields = _prediction_fields(runner, jsonl)
    reserved = {"line", *fields}

    def renamed(column):  # a manifest column named like an output field
        return f"input_{column}" if column in reserved else column

    rows = failed = 0
    try:
        with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            emit = _json_emitter(f) if jsonl else _csv_emitter(
                f, ["line", *map(renamed, header), *fields])
            for batch in batches:
                for line, row, result in batch:
                    record = {"line": line}
                    record.update((renamed(column), value) for column, value in (row or {}).items()
                                  if column is not None)  # None: a CSV row's extra cells
                    problem = result if isinstance(result, str) else None
                    record.update(_predictions(runner, None if problem else result, jsonl))
                    record["error"] = problem
                    emit(record)
                    failed += problem is not None
                rows += len(batch)
                progress.add(len(batch))
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(path)
        raise
    return rows, failed


def _scored(rows, runner, columns, folder, batch_size):
    """Batches of `(line, row, result)`: the serving outputs of the row (a dict), or its problem.

    Files are read in line: the model's time dominates, and the scoring runs at the rate of
    the export's signature alone (benchmarks/batch_predict.py).
    """
    for batch in _chunks(rows, batch_size):
        batch = _prepare(batch, columns, runner, folder)
        yield [(line, row, result) for (line, row, _), result in zip(batch, _score(runner, batch))]


def _model_columns(runner, image_column, text_column, tabular_columns):
    """`{input name: column}` of the model's inputs (`tabular`: a list of columns)."""
    given = {}
    for kind, column in (("image", image_column), ("text", text_column)):
        if column is not None:
            columns = [column] if isinstance(column, str) else list(column)
            given.update(zip(input_names(kind, len(columns)), columns))
    if tabular_columns:
        given["tabular"] = list(tabular_columns)
    unnamed = [name for name in runner.inputs if name not in given]
    if unnamed:
        raise ValueError(f"This model takes inputs {list(runner.inputs)}; no column is named "
                         f"for {unnamed}. Name them (image_column=, text_column=, "
                         "tabular_columns=; CLI: --image-column ...).")
    if "tabular" in runner.inputs:
        width = runner.inputs["tabular"].shape[-1]
        if len(given["tabular"]) != width:
            raise ValueError(f"This model takes {width} tabular features; "
                             f"tabular_columns names {len(given['tabular'])}: "
                             f"{given['tabular']}.")
    return {name: given[name] for name in runner.inputs}


def _prediction_fields(runner, jsonl):
    """The names of the prediction fields written per row, `error` last."""
    fields = []
    for task in runner.tasks:
        fields.append(output_name(task, "label"))
        if jsonl:
            fields.append(output_name(task, "top"))
        else:
            fields += [output_name(task, f"top_{i}_{key}") for i in range(1, runner.top[task] + 1)
                       for key in ("label", "score")]
    return [*fields, "error"]


def _predictions(runner, result, jsonl):
    """The prediction fields of one row from its outputs (`None`: a failed row, fields empty)."""
    fields = {}
    for task in runner.tasks:
        k = runner.top[task]
        if result is None:
            labels, scores = [None] * k, [None] * k
            fields[output_name(task, "label")] = None
        else:
            labels = [name.decode("utf-8") for name in result[output_name(task, "top_labels")][:k]]
            # float32's shortest text: 0.8125, not 0.8125000596046448
            scores = [float(str(score)) for score in result[output_name(task, "top_scores")][:k]]
            fields[output_name(task, "label")] = result[output_name(task, "label")].decode("utf-8")
        if jsonl:
            fields[output_name(task, "top")] = None if result is None else [
                {"label": label, "score": score} for label, score in zip(labels, scores)]
        else:
            for i, (label, score) in enumerate(zip(labels, scores), start=1):
                fields[output_name(task, f"top_{i}_label")] = label
                fields[output_name(task, f"top_{i}_score")] = score
    return fields


def _csv_emitter(f, fields):
    """A function writing one record (a dict) as a CSV row of `fields`; the header is written."""
    writer = csv.writer(f)
    writer.writerow(fields)

    def cell(value):
        if value is None:
            return ""
        return value if isinstance(value, (str, int, float)) else json.dumps(value)

    return lambda record: writer.writerow([cell(record.get(field)) for field in fields])


def _json_emitter(f):
    """A function writing one record (a dict) as a JSON line."""
    return lambda record: f.write(json.dumps(record, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def _manifest_rows(path):
    """`(columns, rows)` of a manifest, read as `rows` is iterated.

    `rows` yields `(line, row, problem)`: `row` a dict, or `None` with the
    `problem` of a line that cannot be read. The columns are a CSV's
    header, or the keys of a JSON Lines file's first object (any other
    `MANIFEST_FORMATS` is read as JSON Lines).
    """
    source = os.path.basename(path)
    limit = csv.field_size_limit(MAX_CSV_CELL)
    try:
        with open_text(path) as f:
            if path.lower().endswith(".csv"):
                reader = csv.DictReader(f)
                try:
                    columns = list(reader.fieldnames or [])
                except csv.Error as error:
                    raise DataValidationError(f"{source}:1: not a readable CSV header "
                                              f"({error})") from None
                yield columns, csv_rows(reader)
                return
            rows, first = jsonl_rows(f), []
            for item in rows:
                first.append(item)
                if item[1] is not None:
                    break
            columns = list(first[-1][1]) if first and first[-1][1] is not None else []
            yield columns, itertools.chain(first, rows)
    finally:
        csv.field_size_limit(limit)


def _count_rows(path):
    """The number of rows `_manifest_rows` yields (a quick pass, for the progress display)."""
    with _manifest_rows(path) as (_, rows):
        return sum(1 for _ in rows)


def _chunks(items, size):
    items = iter(items)
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def _prepare(batch, columns, runner, folder):
    """Rows `(line, row, problem)` -> `(line, row, inputs)`: the model's inputs read.

    `inputs` is a dict (texts, image file bytes, numbers), or the problem
    (a str) that keeps the row from the model.
    """
    return [(line, row, problem if row is None else _inputs(row, columns, runner, folder))
            for line, row, problem in batch]


def _inputs(row, columns, runner, folder):
    """One row's model inputs (a dict), or the problem (a str) that keeps it from the model."""
    inputs = {}
    for name, column in columns.items():
        kind = modality_kind(name)
        if kind == "tabular":
            inputs[name] = [_number(row.get(c)) for c in column]
            if not all(math.isfinite(x) for x in inputs[name]):
                return f"tabular columns {({c: row.get(c) for c in column})}: expected numbers"
            continue
        value = row.get(column)
        value = "" if value is None else str(value)
        if kind == "text":
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return f"column {column!r}: the text is not valid UTF-8; save the file as UTF-8"
            inputs[name] = value
        elif not value.strip():
            if name not in runner.optional:
                return f"column {column!r}: no image; this model needs one in every row"
            inputs[name] = b""
        else:
            path = join_path(folder, value.strip())
            try:
                inputs[name] = read_bytes(path)
            except FileNotFoundError:
                return f"column {column!r}: image file not found: {path}"
            except OSError as error:
                return f"column {column!r}: cannot read {path} ({error.strerror})"
    return inputs


def _number(value):
    """A tabular cell as a float; NaN when it is not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _score(runner, batch):
    """The serving outputs of each row of a prepared batch (a dict), or its problem (a str).

    A batch the model fails on (an image that does not decode) is halved
    until the failing rows are alone, so only they fail.
    """
    results = [inputs if isinstance(inputs, str) else None for _, _, inputs in batch]
    scored = [i for i, result in enumerate(results) if result is None]
    if scored:
        answers = _run(runner, [batch[i][2] for i in scored])
        for i, answer in zip(scored, answers):
            results[i] = answer
    return results


def _run(runner, inputs):
    """`_score` of rows that all reached the model: halved until a failing row is alone."""
    try:
        outputs = runner.run({
            name: tf.constant(np.asarray([row[name] for row in inputs], np.float32))
            if name == "tabular" else tf.constant([row[name] for row in inputs])
            for name in runner.inputs})
    except tf.errors.OpError as error:
        if len(inputs) == 1:
            empty = [name for name, value in inputs[0].items() if value == b""]
            return [f"cannot score: {error_gist(error)}"
                    + (f" (the image input {empty[0]!r} is empty)" if empty else "")]
        half = len(inputs) // 2
        return _run(runner, inputs[:half]) + _run(runner, inputs[half:])
    keys = [output_name(task, key) for task in runner.tasks
            for key in ("label", "top_labels", "top_scores")]
    arrays = {key: outputs[key].numpy() for key in keys}
    return [{key: values[i] for key, values in arrays.items()} for i in range(len(inputs))]
