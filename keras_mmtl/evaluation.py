"""Metrics, per-class table, confusion matrix, ROC/PR curves and their plots."""

import contextlib
import csv
import dataclasses
import io

import numpy as np

from keras_mmtl.data.pipeline import make_dataset
from keras_mmtl.files import join_path, make_folder, write_bytes, write_json, write_text
from keras_mmtl.modalities import modality_kind
from keras_mmtl.models.spec import describe
from keras_mmtl.plots import plot_confusion_matrix, plot_curves, plot_reliability
from keras_mmtl.progress import predict_with_progress


@dataclasses.dataclass
class EvaluationReport:
    """The scores of a classifier on labelled data.

    Macro averages weigh every class alike. ROC-AUC and PR-AUC are one class
    against the rest, averaged over the classes present in the data.
    """

    class_names: list
    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    roc_auc: float
    pr_auc: float
    per_class: list
    confusion: np.ndarray
    curves: dict = dataclasses.field(repr=False, default_factory=dict)
    ece: float = float("nan")
    temperature: float = 1.0  # of the head (temperature scaling); 1: not calibrated
    ece_uncalibrated: float = None  # the ECE the same predictions had at temperature 1
    reliability: dict = dataclasses.field(repr=False, default_factory=dict)  # ECE's bins

    def to_dict(self):
        """The report as plain JSON-able values (curves left out)."""
        summary = {k: getattr(self, k) for k in (
            "accuracy", "macro_precision", "macro_recall", "macro_f1", "roc_auc", "pr_auc",
            "ece", "temperature", "ece_uncalibrated")}
        return {**summary, "num_samples": int(self.confusion.sum()),
                "class_names": self.class_names, "per_class": self.per_class,
                "confusion_matrix": self.confusion.tolist()}

    def summary(self):
        """One line with the headline scores."""
        return (f"accuracy {self.accuracy:.4f} | macro P {self.macro_precision:.4f} "
                f"R {self.macro_recall:.4f} F1 {self.macro_f1:.4f} | "
                f"ROC-AUC {self.roc_auc:.4f} | PR-AUC {self.pr_auc:.4f} | ECE {self.ece:.4f}"
                + ("" if self.ece_uncalibrated is None else
                   f" (T={self.temperature:.2f}; {self.ece_uncalibrated:.4f} before)")
                + f" | {int(self.confusion.sum())} samples")

    def table(self):
        """The per-class table as aligned text."""
        width = max(12, *(len(name) for name in self.class_names))
        lines = [f"{'class':<{width}}  precision  recall     f1  support  roc_auc  pr_auc"]
        for row in self.per_class:
            lines.append(
                f"{row['class']:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  "
                f"{row['f1']:5.3f}  {row['support']:7d}  {_fmt(row['roc_auc']):>7}  "
                f"{_fmt(row['pr_auc']):>6}")
        return "\n".join(lines)

    def save(self, out_dir):
        """Writes report.json, per_class.csv and the confusion, ROC, PR and reliability PNGs.

        Returns:
            dict of what was written -> path.
        """
        make_folder(out_dir)
        paths = {name: join_path(out_dir, name) for name in (
            "report.json", "per_class.csv", "confusion_matrix.png", "roc_curves.png",
            "pr_curves.png", "reliability.png")}
        write_json(paths["report.json"], self.to_dict())
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=list(self.per_class[0]))
        writer.writeheader()
        writer.writerows(self.per_class)
        write_text(paths["per_class.csv"], table.getvalue())
        figures = {
            "confusion_matrix.png": plot_confusion_matrix(
                self.confusion, self.class_names,
                f"Confusion matrix (accuracy {self.accuracy:.3f})"),
            "roc_curves.png": plot_curves(self, "roc"),
            "pr_curves.png": plot_curves(self, "pr"),
            "reliability.png": plot_reliability(self),
        }
        for name, figure in figures.items():  # through a buffer: any filesystem
            png = io.BytesIO()
            figure.savefig(png, format="png", dpi=110)
            write_bytes(paths[name], png.getvalue())
        return paths


def classification_report(labels, probabilities, class_names):
    """Scores predicted class probabilities against true labels.

    Args:
        labels: int array `(n,)` of true class indices.
        probabilities: float array `(n, num_classes)`.
        class_names: names of the classes, in index order.

    Returns:
        `EvaluationReport`.

    Example:

    >>> import numpy as np
    >>> report = classification_report(
    ...     np.array([0, 1, 1]), np.array([[.9, .1], [.2, .8], [.6, .4]]), ["a", "b"])
    >>> round(report.accuracy, 3), report.roc_auc
    (0.667, 1.0)
    """
    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    num_classes = len(class_names)
    predicted = probabilities.argmax(axis=1)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    true_positives = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    precision = _safe_divide(true_positives, confusion.sum(axis=0))
    recall = _safe_divide(true_positives, support)
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    per_class, curves = [], {"roc": {}, "pr": {}}
    for c, name in enumerate(class_names):
        positive = labels == c
        roc_auc = pr_auc = float("nan")
        if positive.any() and not positive.all():
            fpr, tpr, prec, rec = _curves(positive, probabilities[:, c])
            roc_auc = float(np.trapezoid(tpr, fpr))
            pr_auc = float(np.sum(np.diff(rec) * prec[1:]))
            curves["roc"][name] = (fpr, tpr)
            curves["pr"][name] = (rec, prec)
        per_class.append({
            "class": name, "precision": float(precision[c]), "recall": float(recall[c]),
            "f1": float(f1[c]), "support": int(support[c]), "roc_auc": roc_auc,
            "pr_auc": pr_auc,
        })
    # Macro averages over the classes present in the labels or predictions.
    present = (support > 0) | (confusion.sum(axis=0) > 0)
    return EvaluationReport(
        class_names=list(class_names),
        accuracy=float(true_positives.sum() / max(len(labels), 1)),
        macro_precision=float(precision[present].mean()),
        macro_recall=float(recall[present].mean()),
        macro_f1=float(f1[present].mean()),
        roc_auc=_nanmean([row["roc_auc"] for row in per_class]),
        pr_auc=_nanmean([row["pr_auc"] for row in per_class]),
        per_class=per_class,
        confusion=confusion,
        curves=curves,
        ece=expected_calibration_error(labels, probabilities),
        reliability=reliability_bins(labels, probabilities),
    )


ECE_BINS = 15


def expected_calibration_error(labels, probabilities, bins=ECE_BINS):
    """The expected calibration error: the gap between confidence and accuracy, averaged.

    Samples are put in `bins` equal-width bins by their top probability; the
    error is the mean over bins of |accuracy - mean confidence|, weighted by
    the bin's share of samples.

    Example:

    >>> round(expected_calibration_error([0, 1], [[0.9, 0.1], [0.8, 0.2]]), 3)
    0.45
    """
    found = reliability_bins(labels, probabilities, bins)
    count = np.asarray(found["count"])
    gaps = np.abs(np.asarray(found["accuracy"]) - np.asarray(found["confidence"]))
    return float((count * gaps).sum() / max(count.sum(), 1))


def reliability_bins(labels, probabilities, bins=ECE_BINS):
    """Per equal-width bin of top probability: samples, their accuracy and mean confidence.

    Empty bins have accuracy and confidence 0. Returns a dict of lists
    `count`, `accuracy`, `confidence` (what a reliability diagram draws).

    Example:

    >>> reliability_bins([0, 1], [[0.9, 0.1], [0.8, 0.2]], bins=2)["accuracy"]
    [0.0, 0.5]
    """
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, np.float64)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    sums = [np.bincount(which, weights=values, minlength=bins) / np.maximum(count, 1)
            for values in (correct.astype(np.float64), confidence)]
    return {"count": count.tolist(), "accuracy": sums[0].tolist(), "confidence": sums[1].tolist()}


def rescale(probabilities, temperature):
    """Softmax probabilities as they would be with logits divided by `temperature`.

    Exact up to float32 rounding while no probability underflowed to 0: a
    float32 softmax keeps log-gaps up to about 103, so undoing a calibration
    that sharpened by T (rescaling by 1/T) is exact for T above about 0.15.
    """
    floor = np.finfo(np.float32).smallest_subnormal  # what a float32 softmax keeps above 0
    logits = np.log(np.clip(np.asarray(probabilities, np.float64), floor, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def predict_records(model, records, split=None, batch_size=64, title=None):
    """Runs a classifier over records: returns `(labels, probabilities)`.

    `title` names the step in the progress display (default: "Scoring the
    SPLIT split").

    For a multi-task model both are dicts by task (auxiliary heads left
    out). A model without presence inputs (`missing_modalities=False`) sees
    a missing image as a black image and a missing text as an empty one.
    """
    spec = describe(model)
    arguments = spec.dataset_arguments()
    arguments["presence"] += tuple(m for m in arguments["modalities"] if modality_kind(m) ==
                                   "image" and m not in arguments["presence"])
    names = list(model.input)
    ds = make_dataset(records, split, **arguments, batch_size=batch_size)
    rows = records if split is None else records.subset(split)
    probabilities = predict_with_progress(
        model, ds.map(lambda x, *_: {name: x[name] for name in names}),
        title or f"Scoring the {split or 'given'} split", len(rows), batch_size)
    if not spec.multi_output:
        return rows.labels, probabilities
    return ({task: rows.task_labels(task) for task in spec.tasks},
            {task: probabilities[task] for task in spec.tasks})


def evaluate(model, records, split="test", *, out_dir=None, batch_size=64):
    """Evaluates a classifier on one split of the records.

    Args:
        model: a classifier from `keras_mmtl.models`.
        records: `keras_mmtl.data.Records` whose class names match the model's.
        split: `"train"`, `"val"`, `"test"` or `None` for all rows.
        out_dir: if given, the report, table and plots are written there
            (for a multi-task model, in one sub-folder per task).
        batch_size: samples per batch.

    Returns:
        `EvaluationReport` (with the expected calibration error, before and
        after temperature scaling when `calibrate` set one); for a
        multi-task model, a dict of task -> `EvaluationReport`.

    Example:

    >>> report = evaluate(model, records, out_dir="runs/x/eval")  # doctest: +SKIP
    >>> print(report.summary())  # doctest: +SKIP
    """
    spec = _check_classes(model, records)
    # The answers at temperature 1, rescaled by each head's: exact both ways, where undoing a
    # sharpening temperature from the served answers loses the classes that underflowed.
    with uncalibrated(model):
        labels, raw = predict_records(model, records, split, batch_size)
    if not spec.multi_output:
        labels, raw = {None: labels}, {None: raw}
    reports = {}
    for task in labels:
        temperature = model.get_layer(spec.head(task)).temperature
        reports[task] = report = classification_report(
            labels[task], rescale(raw[task], temperature), spec.class_names(task))
        report.temperature = temperature
        if temperature != 1:  # calibrated: the ECE of the same answers at temperature 1
            report.ece_uncalibrated = expected_calibration_error(labels[task], raw[task])
        if out_dir is not None:
            report.save(out_dir if task is None else join_path(out_dir, task))
    return reports if spec.multi_output else reports[None]


@contextlib.contextmanager
def uncalibrated(model):
    """Within: the classifier's heads at temperature 1, giving their probabilities as trained.

    Example:

    >>> with uncalibrated(model):  # doctest: +SKIP
    ...     _, raw = predict_records(model, records, "val")
    """
    heads = _heads(model)
    temperatures = [head.temperature for head in heads]
    for head in heads:
        head.temperature = 1.0
    try:
        yield model
    finally:
        for head, temperature in zip(heads, temperatures):
            head.temperature = temperature


def _heads(model):
    """The head layer of each task (of the one output)."""
    spec = describe(model)
    return [model.get_layer(spec.head(task)) for task in spec.tasks]


def _check_classes(model, records):
    """The model's spec (`describe`), once the records are known to share its classes."""
    spec = describe(model)
    for task, names in spec.tasks.items():
        if task is not None and task not in records.tasks:
            raise ValueError(f"The model has a task {task!r} that the records lack; their tasks "
                             f"(label columns): {list(records.tasks)}. Read the data with "
                             "label_column=list(keras_mmtl.describe(model).tasks).")
        found = records.class_names if task is None else records.tasks[task]
        if list(found) != names:
            raise ValueError(
                f"The records' classes{'' if task is None else f' of {task!r}'} differ from the "
                "model's. Read the data with "
                "class_names=keras_mmtl.describe(model).label_classes. "
                f"Model: {names[:5]}...; data: {list(found)[:5]}...")
    return spec


@dataclasses.dataclass
class ModalityReport:
    """Accuracy and macro-F1 with all inputs, and with each modality removed."""

    rows: dict  # condition -> {"accuracy": ..., "macro_f1": ...}

    def table(self):
        """The conditions as an aligned text table."""
        lines = [f"{'inputs':<16}  accuracy  macro-F1"]
        lines += [f"{name:<16}  {row['accuracy']:8.4f}  {row['macro_f1']:8.4f}"
                  for name, row in self.rows.items()]
        return "\n".join(lines)

    def to_dict(self):
        return dict(self.rows)


def modality_report(model, records, split="test", *, task=None, out_dir=None, batch_size=64,
                    scored=None):
    """How a multimodal classifier does with both modalities, without its image, without its text.

    Each modality is removed from every sample of the split in turn (an
    empty path, bytes or text). A model built with `missing_modalities=True`
    then uses its missing-modality path; others see a black image or an
    empty text. It shows how much the model leans on each modality, and
    whether it survives one going missing.

    Args:
        model: a classifier with two or more modalities.
        records: the `Records` (class names as the model's).
        split: the split to score.
        task: the task scored, for a multi-task model (default its first).
        out_dir: if given, `modalities.json` is written there.
        batch_size: samples per batch.
        scored: what `evaluate` returned for the model on this split (a
            report, or a dict of them by task), where it already ran: the
            task's accuracy and macro-F1 are the `"all inputs"` row, and the
            split is not scored again.

    Returns:
        `ModalityReport`: rows `"all inputs"`, `"without image"`, `"without text"`.

    Example:

    >>> print(modality_report(model, records).table())  # doctest: +SKIP
    inputs            accuracy  macro-F1
    all inputs          0.8730    0.8180
    without image       0.7020    0.5410
    without text        0.8050    0.7170
    """
    modalities = describe(model).modalities
    if len(modalities) < 2:
        raise ValueError(f"A modality report needs a model with two or more inputs; this one "
                         f"takes {list(modalities)}.")
    rows = records if split is None else records.subset(split)
    conditions = {"all inputs": rows}
    for name in (m for m in modalities if modality_kind(m) != "tabular"):  # never missing
        conditions[f"without {name}"] = rows.without(name, np.ones(len(rows), bool))
    spec = _check_classes(model, records)
    task = task or next(iter(spec.tasks))
    report = ModalityReport({})
    if scored is not None:
        scored = scored[task] if isinstance(scored, dict) else scored
        report.rows["all inputs"] = {"accuracy": scored.accuracy, "macro_f1": scored.macro_f1}
    for condition, data in conditions.items():
        if condition in report.rows:
            continue
        labels, probabilities = predict_records(model, data, None, batch_size,
                                                title=f"Modality report, {condition}")
        if spec.multi_output:
            labels, probabilities = labels[task], probabilities[task]
        scores = classification_report(labels, probabilities, spec.class_names(task))
        report.rows[condition] = {"accuracy": scores.accuracy, "macro_f1": scores.macro_f1}
    if out_dir is not None:
        write_json(join_path(out_dir, "modalities.json"), report.to_dict())
    return report


def _curves(positive, scores):
    """ROC (fpr, tpr) and PR (precision, recall) points, one per distinct threshold."""
    order = np.argsort(-scores, kind="mergesort")
    scores, positive = scores[order], positive[order]
    last_of_threshold = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tp = np.cumsum(positive)[last_of_threshold]
    fp = (last_of_threshold + 1) - tp
    tpr = np.r_[0.0, tp / tp[-1]]
    fpr = np.r_[0.0, fp / fp[-1]]
    precision = np.r_[1.0, tp / (tp + fp)]
    return fpr, tpr, precision, tpr


def _safe_divide(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.divide(a, b, out=np.zeros_like(a), where=b > 0)


def _nanmean(values):
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def _fmt(value):
    return "-" if np.isnan(value) else f"{value:.3f}"
