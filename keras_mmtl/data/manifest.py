"""Manifests, TFDS, arrays and folders -> validated `Records` + a report of bad rows."""

import collections
import csv
import dataclasses
import hashlib
import json
import math
import os
import posixpath
import warnings

import numpy as np

from keras_mmtl.checks import check_known
from keras_mmtl.data.images import MAX_MEGAPIXELS, find_undecodable
from keras_mmtl.files import (
    file_size,
    file_stamp,
    folder_of,
    is_file,
    is_remote,
    join_path,
    open_text,
    read_bytes,
)
from keras_mmtl.modalities import input_names, is_input_name, modality_kind, ordered

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val", "eval": "val"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
MAX_LISTED_ROWS = 20
ARRAYS_SOURCE = "arrays"
MAX_CSV_CELL = 16 * 2**20  # characters; Python's csv module stops at 131,072 by default


class DataValidationError(ValueError):
    """Raised when input data has rows that cannot be trained on."""


class DataWarning(UserWarning):
    """Warned when rows or classes are left out of a dataset (the report says which)."""


@dataclasses.dataclass(frozen=True)
class BadRow:
    """One problem with one row of the input, located as `source:line`."""

    source: str
    line: int
    field: str
    problem: str

    def __str__(self):
        where = f"row {self.line} of {self.source}" if self.source == ARRAYS_SOURCE else (
            f"{self.source}:{self.line}")
        field = f" field '{self.field}':" if self.field else ""  # none: the row is unreadable
        return f"{where}:{field} {self.problem}"


@dataclasses.dataclass
class DataReport:
    """What was left out of a dataset, and why; never empty without saying so."""

    total_rows: int = 0
    bad_rows: list = dataclasses.field(default_factory=list)
    dropped_classes: dict = dataclasses.field(default_factory=dict)
    unseen_labels: dict = dataclasses.field(default_factory=dict)  # label -> val/test rows
    duplicates: dict = dataclasses.field(default_factory=dict)  # split -> rows as in train

    @property
    def warns(self):
        """Whether there is anything to tell the user."""
        return bool(self.bad_rows or self.dropped_classes or self.duplicates)

    @property
    def skipped_rows(self):
        """Number of distinct rows left out for bad input."""
        return len({(row.source, row.line) for row in self.bad_rows})

    def summary(self):
        """One paragraph a user can read: counts, then the first problems."""
        lines = []
        if self.bad_rows:
            lines.append(
                f"Skipped {self.skipped_rows} of {self.total_rows} rows with bad input:"
            )
            lines += [f"  {row}" for row in self.bad_rows[:MAX_LISTED_ROWS]]
            if len(self.bad_rows) > MAX_LISTED_ROWS:
                lines.append(f"  ... and {len(self.bad_rows) - MAX_LISTED_ROWS} more")
        if self.dropped_classes:
            dropped = ", ".join(f"{k} ({v})" for k, v in self.dropped_classes.items())
            lines.append(
                f"Dropped {len(self.dropped_classes)} classes with too few training "
                f"rows (training rows in brackets): {dropped}"
            )
        if self.unseen_labels:
            unseen = ", ".join(f"{k!r} ({v})" for k, v in self.unseen_labels.items())
            lines.append(
                f"Left {sum(self.unseen_labels.values())} val/test rows out of the scores: "
                f"their labels never occur in training (rows in brackets): {unseen}. Give "
                "these classes training rows to have them learned and scored."
            )
        if self.duplicates:
            lines.append(self.overlap())
        return "\n".join(lines)

    def overlap(self):
        """A line on the val/test rows that repeat a training row ("" if none)."""
        if not self.duplicates:
            return ""
        repeated = " and ".join(f"{n} {split}" for split, n in self.duplicates.items())
        return (f"{repeated} rows repeat a training row exactly (same image and text): "
                "scores on them overstate how the model does on new data; remove the "
                "copies from val/test, or from train.")


@dataclasses.dataclass
class Records:
    """Validated samples of a labelled image/text dataset, ready for `make_dataset`.

    Attributes:
        images: `None`, or one image per sample (of the first image column):
            file paths (`image_kind="path"`), encoded file bytes (`"bytes"`),
            a uint8 array `(n, h, w, c)` (`"array"`), or the row's position in
            its split of prepared shards (`"prepared"`, see `prepared`; `-1 -
            position` for a row made to lack it, `without`).
        texts: `None`, or an object array of `str`, one per sample (of the
            first text column).
        labels: int32 array of indices into `class_names`; -1 marks a row
            without a label of this task, which training leaves out of the
            task's loss and metrics (joint domain transfer labels each row
            for its own domain's task only).
        splits: array of `"train"`, `"val"` or `"test"`.
        class_names: the label vocabulary, sorted; index `i` is class `i`.
        image_kind: how `images` is stored.
        report: rows and classes that were left out.
        tabular: `None`, or a float32 array `(n, k)` of numeric features.
        tabular_columns: the names of those `k` features.
        label_name: the name of the task `labels` hold (their column).
        extra_tasks: more label columns, for multi-task models: dict of task
            name -> `(labels, class_names)`, like `labels` and `class_names`.
        extra_inputs: more image or text columns: dict of input name
            (`"image_2"`, `"text_2"`, ...; see `keras_mmtl.modalities`) ->
            values, stored like `images` (paths or bytes) or `texts`.
        max_megapixels: the largest image the rows were checked against;
            `make_dataset` decodes with the same limit.
        prepared: for records read from `keras_mmtl.prepare`'s shards
            (`keras_mmtl.prepared_records`), their description (`prepared.json`
            and the folder); `make_dataset` reads the images from the shards.
        former_splits: `None`, or after `merge_splits` the split each row had
            before, so that features cached per split are reused.
    """

    images: object
    texts: object
    labels: np.ndarray
    splits: np.ndarray
    class_names: list
    image_kind: str = "path"
    report: DataReport = dataclasses.field(default_factory=DataReport)
    tabular: object = None
    tabular_columns: tuple = ()
    label_name: str = "label"
    extra_tasks: dict = dataclasses.field(default_factory=dict)
    extra_inputs: dict = dataclasses.field(default_factory=dict)
    max_megapixels: float = MAX_MEGAPIXELS
    prepared: dict = None
    former_splits: np.ndarray = None

    def __len__(self):
        return len(self.labels)

    @property
    def modalities(self):
        """The inputs these records provide, in model order (`"image"`, `"image_2"`, `"text"`...)."""
        given = {"image": self.images, "text": self.texts, "tabular": self.tabular,
                 **self.extra_inputs}
        return ordered(name for name, values in given.items() if values is not None)

    def inputs(self, name):
        """The values of one input, e.g. `records.inputs("text_2")`."""
        if name in ("image", "text", "tabular"):
            return {"image": self.images, "text": self.texts, "tabular": self.tabular}[name]
        if name not in self.extra_inputs:
            raise ValueError(f"These records have no input {name!r}; they have "
                             f"{list(self.modalities)}.")
        return self.extra_inputs[name]

    @property
    def tasks(self):
        """Class names of every task (label column), the main one (`labels`) first.

        Example:

        >>> records = from_arrays({"type": ["shoe", "cap"], "colour": ["red", "blue"]},
        ...                       texts=["a", "b"], splits=["train"] * 2)
        >>> records.tasks
        {'type': ['cap', 'shoe'], 'colour': ['blue', 'red']}
        """
        return {self.label_name: list(self.class_names),
                **{name: list(names) for name, (_, names) in self.extra_tasks.items()}}

    def task_labels(self, task):
        """The int32 labels of one task, indices into `tasks[task]`."""
        if task == self.label_name:
            return self.labels
        if task not in self.extra_tasks:
            raise ValueError(f"Unknown task {task!r}; these records have {list(self.tasks)}.")
        return self.extra_tasks[task][0]

    def subset(self, split):
        """The records of one split (`"train"`, `"val"` or `"test"`)."""
        if split not in SPLITS:
            raise ValueError(f"Unknown split. Expected one of {SPLITS}. Received: split={split!r}")
        return self.select(self.splits == split)

    def merge_splits(self, split, into):
        """A copy in which the rows of `split` belong to split `into`.

        A refit trains on the train and val rows as one training split:
        `merge_splits("val", into="train")`. The copy remembers each row's
        split before (`former_splits`), so the frozen features cached for
        the train and val splits make up those of the merged one.

        Example:

        >>> records = from_arrays(["a", "b", "a", "b"], texts=["red", "blue", "red", "blue"],
        ...                       splits=["train", "train", "val", "test"])
        >>> merged = records.merge_splits("val", into="train")
        >>> merged.splits.tolist(), merged.former_splits.tolist()
        (['train', 'train', 'train', 'test'], ['train', 'train', 'val', 'test'])
        >>> merged.subset("train").former_splits.tolist()
        ['train', 'train', 'val']
        >>> records.merge_splits("dev", into="train")
        Traceback (most recent call last):
        ...
        ValueError: Unknown split. Expected one of ('train', 'val', 'test'). Received: 'dev'
        """
        for name in (split, into):
            if name not in SPLITS:
                raise ValueError(f"Unknown split. Expected one of {SPLITS}. Received: {name!r}")
        former = self.splits if self.former_splits is None else self.former_splits
        return dataclasses.replace(self, splits=np.where(self.splits == split, into, self.splits),
                                   former_splits=former)

    def select(self, mask):
        """The records where the boolean (or index) array `mask` selects."""
        def pick(values):
            return None if values is None else values[mask]

        return dataclasses.replace(
            self,
            images=pick(self.images),
            texts=pick(self.texts),
            tabular=pick(self.tabular),
            labels=self.labels[mask],
            splits=self.splits[mask],
            former_splits=pick(self.former_splits),
            extra_tasks={name: (labels[mask], names)
                         for name, (labels, names) in self.extra_tasks.items()},
            extra_inputs={name: values[mask] for name, values in self.extra_inputs.items()},
        )

    def present(self, modality):
        """Per sample, whether it has this modality (not an empty path, bytes or text)."""
        values = self.inputs(modality) if modality in self.modalities else None
        if values is None:
            return np.zeros(len(self), bool)
        kind = modality_kind(modality)
        if kind == "tabular" or kind == "image" and self.image_kind == "array":
            return np.ones(len(self), bool)
        if kind == "image" and self.image_kind == "prepared":
            return np.asarray(values) >= 0
        return np.array([_has_value(value) for value in values], bool)

    def without(self, modality, rows):
        """A copy in which the samples `rows` (a boolean mask) lack `modality`.

        Example:

        >>> records = from_arrays(["a", "b"], texts=["red", "blue"], splits=["train"] * 2)
        >>> records.without("text", np.array([True, False])).present("text").tolist()
        [False, True]
        """
        rows = np.asarray(rows, bool)
        kind = modality_kind(modality) if is_input_name(modality) else None
        if kind not in ("image", "text"):
            raise ValueError(f"Only an image or a text can be missing. Received: {modality!r}")
        if kind == "image" and self.image_kind == "array":
            raise ValueError("Images held as an array cannot be missing; use paths or bytes.")
        values = self.inputs(modality).copy()
        if kind == "image" and self.image_kind == "prepared":  # the row's position stays known
            values[rows] = np.where(values[rows] >= 0, -1 - values[rows], values[rows])
        else:
            values[rows] = "" if kind == "text" or self.image_kind == "path" else b""
        if modality in ("image", "text"):
            return dataclasses.replace(self, **{f"{modality}s": values})
        return dataclasses.replace(self, extra_inputs={**self.extra_inputs, modality: values})

    def input_digest(self, names=None):
        """A digest (hex) of the inputs `names` (default all) of every row, in order.

        Image files count by path, size and modification time, so a
        replaced image changes the digest without being read; prepared
        images by their row and their shards' sizes and times. The feature
        cache and the run fingerprint both key on it.
        """
        digest = hashlib.sha256()
        digest.update(repr((self.image_kind, self.max_megapixels)).encode())
        for name in self.modalities if names is None else names:
            values, kind = self.inputs(name), modality_kind(name)
            digest.update(f"\0{name}:".encode())
            if kind == "tabular" or kind == "image" and self.image_kind in ("array", "prepared"):
                digest.update(np.ascontiguousarray(values).tobytes())
                if kind == "image" and self.image_kind == "prepared":  # and the shards' own
                    digest.update(self.prepared["stamp"].encode())
            elif kind == "image" and self.image_kind == "path":
                for path in values:
                    size, time = file_stamp(path) if path else (None, None)  # "": missing
                    digest.update(f"{path}:{size}:{time}\0".encode(errors="replace"))
            else:  # texts, or encoded images
                for value in values:
                    data = value if isinstance(value, bytes) else str(value).encode(
                        "utf-8", "surrogateescape")
                    digest.update(hashlib.sha256(data).digest())
        return digest.hexdigest()

    def class_counts(self, split=None):
        """Number of rows per class name, in one split or overall."""
        labels = self.labels if split is None else self.subset(split).labels
        counts = np.bincount(labels, minlength=len(self.class_names))
        return dict(zip(self.class_names, counts.tolist()))


def stratified_split(labels, val_fraction=0.1, test_fraction=0.1, seed=0):
    """Assigns each sample to train/val/test, keeping class proportions.

    Every class keeps at least one training row; rounding is per class.

    Args:
        labels: int array of class indices.
        val_fraction: share of each class for validation.
        test_fraction: share of each class for testing.
        seed: seed of the shuffle; the same seed gives the same split.

    Returns:
        array of split names, aligned with `labels`.

    Example:

    >>> import collections
    >>> import numpy as np
    >>> splits = stratified_split(np.array([0] * 10 + [1] * 10), 0.2, 0.2)
    >>> sorted(collections.Counter(splits).items())
    [('test', 4), ('train', 12), ('val', 4)]
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(
            "Expected val_fraction, test_fraction >= 0 with a sum below 1. "
            f"Received: val_fraction={val_fraction}, test_fraction={test_fraction}"
        )
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    splits = np.full(len(labels), "train", dtype=object)
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(len(rows) * test_fraction))
        n_val = int(round(len(rows) * val_fraction))
        if n_test + n_val >= len(rows):
            n_test = min(n_test, max(len(rows) - 1, 0))
            n_val = max(len(rows) - 1 - n_test, 0) if n_val else 0
        splits[rows[:n_test]] = "test"
        splits[rows[n_test:n_test + n_val]] = "val"
    return splits


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """How every reader checks rows and draws splits (`read_manifest`, `from_arrays`...).

    The readers take these as keyword arguments; `read_options(kwargs)` is
    how they check them, so all of them take the same options with the same
    defaults.

    Attributes:
        skip_bad_rows: leave bad rows out (and report them) instead of raising.
        check_images: decode every image once to find corrupt files.
        max_megapixels: images larger than this many million pixels are bad
            rows, found from their headers before they are decoded (see
            `keras_mmtl.data.decode_image`); training decodes with it too.
        allow_missing: accept rows whose image or text is empty (but not
            both): samples with a missing modality, for a model built with
            `missing_modalities=True`. A path that is given must still exist;
            image arrays cannot miss one.
        allowed_root: `None`, or a folder that image files must lie in, for a
            manifest you did not write: a path that leaves it (absolute, with
            `..`, or through a symlink) is a bad row, and is never opened.
        min_class_count: drop classes of the main task with fewer training
            rows than this. With `class_names` (a model's), the rows of a
            class outside them with fewer training rows are left out (the
            classes its training dropped); other unknown labels are bad rows.
        val_fraction, test_fraction, seed: the stratified split drawn when
            the rows name none.

    Example:

    >>> ReadOptions(skip_bad_rows=True).min_class_count
    1
    >>> read_options({"skip_bad_row": True})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: Unknown reading option(s) ['skip_bad_row']. Expected some of [...
    """

    skip_bad_rows: bool = False
    check_images: bool = True
    max_megapixels: float = MAX_MEGAPIXELS
    allow_missing: bool = False
    allowed_root: str = None
    min_class_count: int = 1
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0


def read_options(options):
    """`ReadOptions` from a reader's keyword arguments; a `TypeError` names unknown ones."""
    known = [field.name for field in dataclasses.fields(ReadOptions)]
    check_known(options, known, lambda unknown: (
        f"Unknown reading option(s) {unknown}. Expected some of {known}. "
        f"Received: {', '.join(f'{k}={options[k]!r}' for k in unknown)}"), TypeError)
    return ReadOptions(**options)


def read_manifest(
    path,
    image_column="image",
    text_column="text",
    label_column="label",
    split_column=None,
    *,
    tabular_columns=(),
    class_names=None,
    **options,
):
    """Reads and validates a CSV or JSON Lines manifest of labelled samples.

    Each row names an image file (relative to the manifest's folder, or
    absolute), a text and a label; an optional column fixes the split.
    Every row is checked before anything trains: the image must exist and
    decode, within `max_megapixels`, the text must be non-empty UTF-8, the
    label non-empty (and in `class_names` if given), the split one of
    train/val/test. Without `class_names`, each label column needs two
    classes or more.

    Args:
        path: a `.csv` file (header row, comma separated) or a `.jsonl` /
            `.json` file (one JSON object per line).
        image_column: column with image paths, or `None` for text-only data;
            a list of columns for several images per sample (inputs
            `"image"`, `"image_2"`, ... in that order, sharing one backbone).
        text_column: column with texts, or `None` for image-only data; a
            list of columns for several texts (inputs `"text"`, `"text_2"`, ...).
        label_column: column with label names, or a list of such columns
            for a multi-task model (one softmax head each): the first is the
            main task (`records.labels`), the others `records.extra_tasks`.
        split_column: optional column with `train`/`val`/`test` per row;
            without it a seeded stratified split is drawn.
        tabular_columns: columns of numbers (price, size, counts...) given
            to the model as a third input, `"tabular"`; every row needs them.
        class_names: fixed label vocabulary (for example a trained model's);
            labels outside it are bad rows. By default the sorted labels seen.
            With several label columns, a dict of column -> class names
            (`keras_mmtl.describe(model).label_classes`).
        **options: how rows are checked and split, as `ReadOptions`:
            `skip_bad_rows`, `check_images`, `max_megapixels`,
            `allow_missing`, `allowed_root`, `min_class_count` and, without
            `split_column`, `val_fraction`, `test_fraction`, `seed`.

    Returns:
        `Records`; `records.report` lists what was left out.

    Raises:
        DataValidationError: a column is missing, or rows are bad and
            `skip_bad_rows` is False. The message names file, line and field.

    Example:

    >>> import os, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> with open(os.path.join(folder, "m.csv"), "w") as f:
    ...     _ = f.write("text,label\\nred shoe,shoes\\nblue shirt,shirts\\n")
    >>> records = read_manifest(os.path.join(folder, "m.csv"), image_column=None)
    >>> records.class_names
    ['shirts', 'shoes']
    """
    options = read_options(options)
    path = os.fspath(path)
    if not is_file(path):
        raise FileNotFoundError(f"Manifest not found: {path}")
    label_columns = _task_names(label_column)
    columns = {**_input_columns("image", image_column), **_input_columns("text", text_column)}
    if split_column is not None:
        columns["split"] = split_column
    if path.lower().endswith(".csv"):
        expected = "a header row, then one row per sample"
    elif path.lower().endswith((".jsonl", ".json", ".ndjson")):
        expected = "one JSON object per line"
    else:
        raise ValueError(
            f"Unknown manifest format: {path}. Expected a .csv or .jsonl file."
        )
    source = os.path.basename(path)
    tabular_columns = tuple(tabular_columns or ())
    folder = folder_of(path)
    # Streamed: each row keeps only the columns used, so a row read is never held whole; the
    # labels and splits, few distinct values over many rows, are held once each.
    table, unreadable, shared = [], [], {}
    for line, row, problem in _manifest_rows(path):
        if problem:
            unreadable.append(BadRow(source, line, "", problem))
            continue
        if not table:  # the first row read: does it have the columns named?
            missing = [name for name in (*columns.values(), *label_columns, *tabular_columns)
                       if name not in row]
            if missing:
                raise DataValidationError(
                    f"{source}: missing column(s) {missing}. Columns found: {sorted(row)}. "
                    "Name the right columns (image_column=, text_column=, label_column=, "
                    "split_column=; CLI: --image-column ...), or None for a modality you lack."
                )
        entry = {"line": line, "labels": tuple(_shared(_as_field(row.get(name)), shared)
                                               for name in label_columns)}
        for field, name in columns.items():
            entry[field] = value = _as_field(row.get(name))
            if field == "split":
                entry[field] = _shared(value, shared)
            if (field != "split" and modality_kind(field) == "image" and isinstance(value, str)
                    and value.strip()):
                entry[field] = join_path(folder, value.strip())
        if tabular_columns:
            entry["tabular"] = [row.get(name) for name in tabular_columns]
        table.append(entry)
    if not table:
        listed = "".join(f"\n  {row}" for row in unreadable[:MAX_LISTED_ROWS])
        raise DataValidationError(f"{source}: no data rows. Expected {expected}.{listed}")
    return _build_records(table, source, options, tasks=label_columns, class_names=class_names,
                          image_kind="path",
                          tabular_columns=tabular_columns, columns=columns,
                          unreadable=unreadable)


def from_arrays(
    labels,
    images=None,
    texts=None,
    *,
    tabular=None,
    tabular_columns=None,
    splits=None,
    class_names=None,
    image_kind=None,
    **options,
):
    """Builds validated `Records` from in-memory data.

    Args:
        labels: label names (str) or class indices (int, with `class_names`);
            for a multi-task model, a dict of task name -> such labels (the
            first is the main task).
        images: `None`; a uint8 array `(n, h, w, 3)`; or a list of image file
            paths or encoded image bytes.
        texts: `None` or a list of strings.
        tabular: `None` or numeric features, `(n, k)`.
        tabular_columns: names of the `k` features (default `x0`, `x1`, ...).
        splits: optional list of `train`/`val`/`test`; drawn if absent.
        class_names: label vocabulary; needed when `labels` are integers (a
            dict of task -> vocabulary when `labels` is a dict).
        image_kind: `"array"`, `"path"` or `"bytes"`; inferred by default.
        **options: how rows are checked and split (`ReadOptions`); a
            missing image is an empty path or empty bytes.

    Returns:
        `Records`.

    Example:

    >>> import numpy as np
    >>> records = from_arrays(["a", "b"] * 5, images=np.zeros((10, 8, 8, 3), "uint8"))
    >>> records.image_kind, records.class_names
    ('array', ['a', 'b'])
    """
    options = read_options(options)
    tasks = dict(labels) if isinstance(labels, dict) else {"label": labels}
    if not tasks:
        raise ValueError("labels is an empty dict; give at least one task's labels.")
    class_names = _per_task(class_names, tasks)
    tasks = {task: _label_names(values, class_names[task], task) for task, values in tasks.items()}
    labels = next(iter(tasks.values()))
    if image_kind is None and images is not None:
        if isinstance(images, np.ndarray) and images.dtype != object and images.ndim == 4:
            image_kind = "array"
        else:
            image_kind = "bytes" if isinstance(images[0], bytes) else "path"
    n = len(labels)
    if tabular is not None:
        tabular = np.asarray(tabular, dtype=object)
        tabular = tabular[:, None] if tabular.ndim == 1 else tabular
        tabular_columns = tuple(tabular_columns or (f"x{i}" for i in range(tabular.shape[1])))
    for name, values in (("images", images), ("texts", texts), ("splits", splits),
                         ("tabular rows", tabular)):
        if values is not None and len(values) != n:
            raise ValueError(f"Expected {n} {name} (one per label). Received: {len(values)}")
    for task, values in tasks.items():
        if len(values) != n:
            raise ValueError(f"Expected {n} labels of task {task!r} (as many as the first "
                             f"task's). Received: {len(values)}")
    table = []
    for i in range(n):
        entry = {"line": i, "labels": tuple(values[i] for values in tasks.values())}
        if images is not None and image_kind != "array":
            entry["image"] = images[i] if image_kind == "bytes" else os.fspath(images[i])
        if texts is not None:
            entry["text"] = texts[i]
        if splits is not None:
            entry["split"] = splits[i]
        if tabular is not None:
            entry["tabular"] = list(tabular[i])
        table.append(entry)
    return _build_records(
        table, ARRAYS_SOURCE, options, tasks=list(tasks), class_names=class_names,
        image_kind=image_kind or "path",
        image_array=np.asarray(images) if image_kind == "array" else None,
        tabular_columns=tabular_columns or ())


def from_directory(root, **options):
    """Reads an image-only dataset laid out as `root/<class name>/<image file>`.

    This is the layout `keras.utils.image_dataset_from_directory` reads; files
    are listed in sorted order and a stratified split is drawn.

    Args:
        root: the folder holding one sub-folder per class.
        **options: how rows are checked and split (`ReadOptions`).

    Returns:
        `Records` without texts.

    Example:

    >>> records = from_directory("flowers/")  # doctest: +SKIP
    """
    read_options(options)  # a typo fails before the folder is listed
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Image folder not found: {root}")
    paths, labels = [], []
    for class_name in sorted(os.listdir(root)):
        class_dir = os.path.join(root, class_name)
        if not os.path.isdir(class_dir):
            continue
        for file_name in sorted(os.listdir(class_dir)):
            if file_name.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(class_dir, file_name))
                labels.append(class_name)
    if not paths:
        raise DataValidationError(
            f"No images found under {root}. Expected one sub-folder per class holding "
            f"{'/'.join(IMAGE_EXTENSIONS)} files."
        )
    return from_arrays(labels, images=paths, image_kind="path", **options)


def from_tfds(name, image_key=None, text_key=None, label_key="label", *,
              splits=None, data_dir=None, download=True, **options):
    """Loads a TensorFlow Datasets dataset as `Records`.

    Images are kept as their encoded bytes (TFDS `SkipDecoding`) and decoded
    by the same op as manifest images; label names come from the dataset's
    `ClassLabel` feature.

    Args:
        name: the `tfds.load` name, e.g. `"beans"`.
        image_key: image feature key, or `None`.
        text_key: text feature key, or `None`.
        label_key: `ClassLabel` feature key.
        splits: dict of our split name -> TFDS split (slicing allowed), e.g.
            `{"train": "train[:90%]", "val": "train[90%:]", "test": "test"}`.
            By default TFDS's `train`, `validation` and `test` where present,
            and a stratified split of the rest.
        data_dir, download: passed to `tfds.load`.
        **options: how rows are checked and split (`ReadOptions`); the
            fractions carve the splits the dataset lacks out of its train split.

    Returns:
        `Records`.

    Example:

    >>> records = from_tfds("beans", image_key="image")  # doctest: +SKIP
    """
    import tensorflow_datasets as tfds

    read = read_options(options)
    builder = tfds.builder(name, data_dir=data_dir)
    if download:
        builder.download_and_prepare()
    if splits is None:
        names = {"train": "train", "validation": "val", "test": "test"}
        splits = {ours: theirs for theirs, ours in names.items() if theirs in builder.info.splits}
    label_feature = builder.info.features[label_key]
    if not hasattr(label_feature, "names"):
        raise ValueError(
            f"Feature {label_key!r} of {name} is not a ClassLabel; pass label_key= naming one. "
            f"Features: {list(builder.info.features)}"
        )
    decoders = {image_key: tfds.decode.SkipDecoding()} if image_key else None
    columns = {"image": image_key, "text": text_key, "label": label_key}
    values = {field: [] for field, key in columns.items() if key}
    if not splits:
        raise ValueError(f"{name} has no train/validation/test split; pass splits={{...}}.")
    split_names = []
    for ours, theirs in splits.items():
        for example in builder.as_dataset(split=theirs, decoders=decoders).as_numpy_iterator():
            for field in values:
                values[field].append(example[columns[field]])
            split_names.append(ours)
    texts = values.get("text")
    if texts is not None:
        texts = [t.decode("utf-8", "surrogateescape") if isinstance(t, bytes) else t for t in texts]
    has_all = {"train", "val", "test"} <= set(splits)
    return from_arrays(
        [int(x) for x in values["label"]], images=values.get("image"), texts=texts,
        splits=split_names if has_all else _fill_splits(split_names, values["label"], read),
        class_names=list(label_feature.names),
        image_kind="bytes" if image_key else None,
        **{k: v for k, v in options.items() if k not in ("val_fraction", "test_fraction")},
    )


def _fill_splits(split_names, labels, options):
    """Carves the missing val/test splits out of the train split, stratified."""
    split_names = np.array(split_names, dtype=object)
    train = np.flatnonzero(split_names == "train")
    missing = {"val", "test"} - set(split_names)
    drawn = stratified_split(
        np.asarray(labels)[train],
        options.val_fraction if "val" in missing else 0.0,
        options.test_fraction if "test" in missing else 0.0,
        options.seed,
    )
    split_names[train] = drawn
    return split_names.tolist()


def _manifest_rows(path):
    """`(line, row dict, "")` per row of a CSV or JSON Lines manifest, or `(line, None, problem)`.

    Streamed, one row at a time. Undecodable bytes are kept as surrogates
    (the text check names them); a CSV cell may hold `MAX_CSV_CELL` characters.
    """
    if not path.lower().endswith(".csv"):
        with open_text(path) as f:
            yield from jsonl_rows(f)
        return
    limit = csv.field_size_limit(MAX_CSV_CELL)
    try:
        with open_text(path) as f:
            reader = csv.DictReader(f)
            try:
                reader.fieldnames  # the header: without it no row can be read
            except csv.Error as error:
                raise DataValidationError(
                    f"{os.path.basename(path)}:1: {_unreadable_csv(error)}") from None
            yield from csv_rows(reader)
    finally:
        csv.field_size_limit(limit)


def csv_rows(reader):
    """`(line, row, "")` per row of a `csv.DictReader`, or `(line, None, problem)`: streamed."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:  # the reader goes on at the next line
            yield reader.reader.line_num, None, _unreadable_csv(error)
            continue
        yield reader.line_num, row, ""


def jsonl_rows(f):
    """`(line, row, "")` per JSON object line of a file, or `(line, None, problem)`: streamed."""
    for line_number, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            yield line_number, None, (
                f"not a JSON object ({error.msg}); each line must be one JSON object, e.g. "
                '{"image": "a.jpg", "text": "...", "label": "..."}')
            continue
        if isinstance(row, dict):
            yield line_number, row, ""
        else:
            yield line_number, None, f"expected a JSON object, found a {type(row).__name__}"


def _unreadable_csv(error):
    return (f"not a readable CSV row ({error}); check its quotes, and that no cell is over "
            f"{MAX_CSV_CELL:,} characters (a longer text fits in a JSON Lines manifest)")


def _check_text(value):
    """The problem with a text field, or None."""
    odd = _odd_value(value)
    if odd:
        return f"text is {odd}; give every row a string"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as error:
            return _not_utf8(error)
    if not isinstance(value, str) or not value.strip():
        return "empty text; give every row a text, or skip such rows"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        return _not_utf8(error)
    return None


def _not_utf8(error):
    return (f"text is not valid UTF-8 (bad byte at character {error.start}); "
            "save the file as UTF-8")


def _shared(value, shared):
    """The one copy of a text in `shared` equal to `value` (`value` itself the first time)."""
    return shared.setdefault(value, value) if isinstance(value, str) else value


def _normalize_split(value):
    value = str(value).strip().lower()
    return SPLIT_ALIASES.get(value, value)


def _build_records(table, source, options, *, tasks, class_names, image_kind, image_array=None,
                   tabular_columns=(), columns=None, unreadable=()):
    """Validates rows (dicts with line, labels, inputs by name and optional split).

    Each row's `"labels"` is a tuple: its label of each of `tasks`, in order.

    `columns` maps input names to the column names that bad rows name
    (by default the input names); `unreadable` are `BadRow`s of rows the
    reader could not parse (not in `table`).
    """
    bad = list(unreadable)
    total = len(table) + len({row.line for row in unreadable})
    fields = set(table[0]) if table else set()
    inputs = ordered(f for f in fields if is_input_name(f) and f != "tabular")
    images = [f for f in inputs if modality_kind(f) == "image"]
    column = {name: (columns or {}).get(name, name) for name in inputs}
    tasks = list(tasks)
    class_names = _per_task(class_names, tasks)
    known = {task: None if names is None else set(names) for task, names in class_names.items()}
    learned = [task for task in tasks if class_names[task] is None]  # classes the data names
    # Given the classes (a model's), rows of a rare class it does not know were left out of its
    # training by min_class_count: leave them out here too, as dropped classes, not bad rows.
    rare = _rare_unknown_labels(table, known[tasks[0]], options.min_class_count)
    table = [entry for entry in table if _odd_value(_label_of(entry))
             or _label_of(entry) not in rare]
    splits_seen = {}
    for entry in table:
        line = entry["line"]
        entry["labels"] = tuple(_label_of(entry, i) for i in range(len(tasks)))
        for task, label in zip(tasks, entry["labels"]):
            problem = _check_label(label, known[task])
            if problem:
                bad.append(BadRow(source, line, task, problem))
        missing = [f for f in inputs if options.allow_missing and not _has_value(entry[f])]
        if missing and len(missing) == len(inputs):
            bad.append(BadRow(source, line, " and ".join(column[f] for f in missing),
                              "no input at all; give the row an image or a text"))
        for name in inputs:
            if modality_kind(name) == "text" and name not in missing:
                problem = _check_text(entry[name])
                if problem:
                    bad.append(BadRow(source, line, column[name], problem))
        for name, value in zip(tabular_columns, entry.get("tabular", ())):
            if not _is_number(value):
                bad.append(BadRow(source, line, name, f"{value!r} is not a number; give every "
                                  "row a number in the tabular columns"))
        if "split" in fields:
            entry["split"] = _shared(_normalize_split(entry["split"]), splits_seen)
            if entry["split"] not in SPLITS:
                bad.append(BadRow(source, line, "split", (
                    f"unknown split {entry['split']!r}; expected one of {list(SPLITS)}")))
        for name in images:
            if name in missing:
                entry[name] = "" if image_kind == "path" else b""
            elif image_kind == "path":
                problem = _check_image_path(entry[name], options.allowed_root)
                if problem:
                    bad.append(BadRow(source, line, column[name], problem))
            elif not entry[name]:
                bad.append(BadRow(source, line, column[name], "empty image bytes"))
    flagged = {(row.source, row.line) for row in bad}
    bad_labels = {(row.line, row.field) for row in bad}
    _check_classes(source, {task: {entry["labels"][tasks.index(task)] for entry in table
                                   if (entry["line"], task) not in bad_labels}
                            for task in learned})
    for name in images if options.check_images else ():
        candidates = [e for e in table
                      if (source, e["line"]) not in flagged and _has_value(e[name])]
        failures = find_undecodable([e[name] for e in candidates],
                                    read_files=image_kind == "path",
                                    max_megapixels=options.max_megapixels)
        for index, problem in failures.items():
            bad.append(BadRow(source, candidates[index]["line"], column[name], problem))
    bad.sort(key=lambda row: row.line)
    report = DataReport(total_rows=total, bad_rows=bad)
    if bad and not options.skip_bad_rows:
        listed = "\n".join(f"  {row}" for row in bad[:MAX_LISTED_ROWS])
        more = f"\n  ... and {len(bad) - MAX_LISTED_ROWS} more" if len(bad) > MAX_LISTED_ROWS else ""
        raise DataValidationError(
            f"{report.skipped_rows} of {total} rows of {source} have bad input:\n"
            f"{listed}{more}\nFix these rows, or pass skip_bad_rows=True "
            "(CLI: --skip-bad-rows) to leave them out; skipped rows are reported."
        )
    bad_lines = {row.line for row in bad}
    table = [entry for entry in table if entry["line"] not in bad_lines]
    if not table:
        raise DataValidationError(f"No valid rows left in {source}.\n{report.summary()}")
    by_task = {}
    for position, task in enumerate(tasks):
        names = class_names[task] or sorted({entry["labels"][position] for entry in table})
        index = {name: i for i, name in enumerate(names)}
        by_task[task] = (np.array([index[entry["labels"][position]] for entry in table], np.int32),
                         list(names))
    main, *extra = tasks
    (labels, class_names), extra_tasks = by_task[main], {task: by_task[task] for task in extra}
    if "split" in fields:
        splits = np.array([entry["split"] for entry in table], dtype=object)
    else:
        splits = stratified_split(labels, options.val_fraction, options.test_fraction,
                                  options.seed)
    lines = [entry["line"] for entry in table]
    values = {name: np.array([_as_str(entry[name]) if modality_kind(name) == "text"
                              else entry[name] for entry in table], dtype=object)
              for name in inputs}
    if image_kind == "array" and image_array is not None:
        values["image"] = image_array[np.array(lines, dtype=np.int64)]
    records = Records(
        images=values.pop("image", None),
        texts=values.pop("text", None),
        extra_inputs=values,
        labels=labels, splits=splits, class_names=class_names,
        label_name=main, extra_tasks=extra_tasks, image_kind=image_kind, report=report,
        tabular=np.array([entry["tabular"] for entry in table], dtype=np.float32)
        if tabular_columns else None,
        tabular_columns=tuple(tabular_columns), max_megapixels=options.max_megapixels,
    )
    if main in learned:
        records = _drop_rare_classes(records, options.min_class_count)
    elif rare:
        records.report = dataclasses.replace(records.report, dropped_classes=rare)
    _check_classes(source, {task: records.tasks[task] for task in learned},
                   " once bad rows and rare classes are left out")
    records.report.duplicates = _repeated_training_rows(records)
    if records.report.warns:
        warnings.warn(records.report.summary(), DataWarning, stacklevel=3)
    return records


def _check_classes(source, labels, when=""):
    """Raises if a label column (dict of column -> its distinct labels) has one class only."""
    for task, names in labels.items():
        if len(names) == 1:
            raise DataValidationError(
                f"{source}: the label column {task!r} has 1 distinct label ({next(iter(names))!r})"
                f"{when}; a classifier needs two classes or more. Name the right column "
                "(label_column=, CLI: --label-column), or add rows of the other classes."
            )


def _input_columns(kind, column):
    """`{input name: column}` of the image or text column(s) given (`None`: none)."""
    if column is None:
        return {}
    columns = [column] if isinstance(column, str) else list(column)
    if not columns or not all(isinstance(name, str) and name for name in columns):
        raise ValueError(f"{kind}_column must name a column, list columns, or be None. "
                         f"Received: {kind}_column={column!r}")
    return dict(zip(input_names(kind, len(columns)), columns))


def _task_names(label_column):
    """The label columns (tasks) `label_column` names: one name, or a list of them."""
    names = [label_column] if isinstance(label_column, str) else list(label_column)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ValueError("label_column must name a column, or list one or more columns. "
                         f"Received: label_column={label_column!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"label_column lists a column twice. Received: {names}")
    return names


def _per_task(class_names, tasks):
    """`class_names` (`None`, one list for the main task, or a dict by task) as a dict by task."""
    tasks = list(tasks)
    if not isinstance(class_names, dict):
        return {task: class_names if i == 0 else None for i, task in enumerate(tasks)}
    check_known(class_names, tasks, lambda unknown: (
        f"class_names names tasks {unknown} that are not label columns; "
        f"the label columns are {tasks}."))
    return {task: class_names.get(task) for task in tasks}


def _label_names(labels, class_names, task):
    """Labels as a list of names; integer labels are indices into `class_names`."""
    labels = list(np.asarray(labels).tolist())
    if labels and isinstance(labels[0], int):
        if class_names is None:
            raise ValueError(f"Integer labels of task {task!r} need class_names to name the "
                             "classes.")
        labels = [class_names[i] if 0 <= i < len(class_names) else str(i) for i in labels]
    return labels


def _check_label(label, known):
    """The problem with a label field, or None."""
    odd = _odd_value(label)
    if odd:
        return f"label is {odd}; give every row a class name"
    if label in ("", None):
        return "empty label; give every row a class"
    if isinstance(label, str) and label.lower() == "nan" and not (known and label in known):
        return (f"label is {label!r}, the mark of a missing value (pandas writes NaN for an "
                "empty cell); give the row its class, or skip such rows")
    if known is not None and label not in known:
        shown = sorted(known)[:10]
        return (f"unknown label {label!r}; expected one of {shown}"
                f"{' ...' if len(known) > 10 else ''} (the classes the model knows)")
    if _check_text(label):
        return "label is not valid UTF-8; save the file as UTF-8"
    return None


def _as_field(value):
    """A manifest cell as text; an absent cell is empty.

    A value no text stands for (a JSON list or object, NaN) is kept as it
    is, for the checks to name.
    """
    if value is None:
        return ""
    return value if _odd_value(value) else str(value)


def _odd_value(value):
    """What a JSON value is when no text or number stands for it (a list, object, NaN), or None."""
    if isinstance(value, (list, dict)):
        shown = json.dumps(value, ensure_ascii=False, default=str)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        return f"a JSON {'list' if isinstance(value, list) else 'object'} ({shown}), not a text"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value!r} (not a number: a missing value?), not a text"
    return None


def _is_number(value):
    """Whether a tabular field is a finite number (or text that reads as one)."""
    try:
        return np.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _has_value(value):
    """Whether a text, path or bytes field holds something (not empty or blank)."""
    if isinstance(value, bytes):
        return bool(value)
    return value is not None and bool(str(value).strip())


def _as_str(value):
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _check_image_path(path, allowed_root=None):
    """The problem with an image path (outside `allowed_root`, if given), or None."""
    odd = _odd_value(path)
    if odd:
        return f"image path is {odd}; give every row an image file name"
    if not path:
        return "empty image path; give every row an image file"
    if allowed_root is not None and not _under(path, allowed_root):  # nothing outside is read
        return (f"image path {path} leaves the data root {allowed_root} (an absolute "
                "path, '..' or a symlink); only files under the data root are read")
    if not is_file(path):
        return f"image file not found: {path}; fix the path (relative to the manifest's folder)"
    if file_size(path) == 0:
        return f"image file is empty: {path}"
    return None


def _under(path, root):
    """Whether `path` lies in the folder `root` (symlinks resolved on a local disk)."""
    if is_remote(path) or is_remote(root):
        root = posixpath.normpath(root)
        return posixpath.normpath(path).startswith(root.rstrip("/") + "/")
    root = os.path.realpath(root)
    return os.path.commonpath([root, os.path.realpath(path)]) == root


def _label_of(entry, position=0):
    """A row's label of the task at `position` (0: the main task), stripped."""
    label = entry["labels"][position]
    return label.strip() if isinstance(label, str) else label


def _rare_unknown_labels(table, known, min_class_count):
    """`{label: training rows}` of the main task's labels not in `known`, under `min_class_count`."""
    if known is None or min_class_count <= 1:
        return {}
    table = [entry for entry in table if not _odd_value(_label_of(entry))]  # bad rows
    counts = collections.Counter(_label_of(entry) for entry in table
                                 if _normalize_split(entry.get("split", "train")) == "train")
    labels = {_label_of(entry) for entry in table}
    return {label: counts[label] for label in sorted(labels, key=str)
            if label not in known and counts[label] < min_class_count}


def _drop_rare_classes(records, min_class_count):
    """Removes classes with fewer than `min_class_count` training rows."""
    counts = records.class_counts("train")
    keep = [name for name in records.class_names if counts[name] >= min_class_count]
    if len(keep) == len(records.class_names):
        return records
    if not keep:
        raise DataValidationError(
            f"No class has {min_class_count} or more training rows; lower min_class_count."
        )
    dropped = {name: counts[name] for name in records.class_names if name not in keep}
    held_out = records.select(records.splits != "train").class_counts()
    unseen = {name: held_out[name] for name in dropped if not counts[name] and held_out[name]}
    remap = np.full(len(records.class_names), -1, dtype=np.int32)
    for new, name in enumerate(keep):
        remap[records.class_names.index(name)] = new
    kept = records.select(remap[records.labels] >= 0)
    kept.labels = remap[kept.labels]
    kept.class_names = keep
    kept.report = dataclasses.replace(records.report, dropped_classes=dropped,
                                      unseen_labels=unseen)
    return kept


def _repeated_training_rows(records):
    """`{split: rows}` of the val and test rows whose inputs repeat a training row's exactly.

    Image files are compared by size first, and by their bytes only where
    the sizes and the texts match.
    """
    names = [name for name in records.modalities if name != "tabular"]

    def key(i, read=False):
        parts = []
        for name in names:
            value = records.inputs(name)[i]
            if modality_kind(name) == "text" or not _has_value(value):
                parts.append(value)
            elif records.image_kind == "array":
                parts.append(hashlib.sha1(np.ascontiguousarray(value).tobytes()).hexdigest())
            elif records.image_kind == "bytes":
                parts.append(hashlib.sha1(value).hexdigest())
            elif read:
                parts.append(hashlib.sha1(read_bytes(value)).hexdigest())
            else:
                parts.append(file_size(value))
        return tuple(parts)

    if not names:
        return {}
    # One number per row (the cheap key's hash), so memory stays a few bytes a row; rows whose
    # numbers match a training row's are compared by their exact keys.
    cheap = np.fromiter((hash(key(i)) for i in range(len(records))), np.int64, len(records))
    train = np.flatnonzero(records.splits == "train")
    repeated = {}
    for split in ("val", "test"):
        rows = np.flatnonzero(records.splits == split)
        rows = rows[np.isin(cheap[rows], cheap[train])]
        exact = {key(j, read=True) for j in train[np.isin(cheap[train], cheap[rows])]}
        count = sum(key(i, read=True) in exact for i in rows)
        if count:
            repeated[split] = count
    return repeated
