"""Calibration: expected calibration error, and temperature scaling fitted on validation data.

A classifier trained with cross-entropy is often over-confident: among the samples it gives
0.9, fewer than 90% are right. Temperature scaling (Guo et al., 2017) divides the logits by
one number `T`, fitted on validation data to minimise the negative log-likelihood; the
predicted class never changes, only how sure the probabilities say the model is. The
temperature is set in the classifier's head (`ClassifierHead(temperature=...)`), so it is
saved with the model and applied inside the exported graph.
"""

import dataclasses

import numpy as np

from keras_mmtl.evaluation import (
    expected_calibration_error,
    predict_records,
    rescale,
    uncalibrated,
)
from keras_mmtl.models.spec import describe

_LOG_T = (-3.0, 3.0)  # temperatures from 0.05 to 20


def fit_temperature(labels, probabilities):
    """The temperature that minimises the negative log-likelihood of `labels`.

    A golden-section search over log T in [-3, 3] (the likelihood is
    unimodal in log T).

    Example:

    >>> over_confident = [[0.99, 0.01], [0.99, 0.01], [0.01, 0.99], [0.99, 0.01]]
    >>> fit_temperature([0, 0, 1, 1], over_confident) > 1
    True
    """
    def nll(log_t):
        return negative_log_likelihood(labels, rescale(probabilities, np.exp(log_t)))

    low, high = _LOG_T
    ratio = (np.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    for _ in range(60):
        if nll(a) < nll(b):
            high, b = b, a
            a = high - ratio * (high - low)
        else:
            low, a = a, b
            b = low + ratio * (high - low)
    return float(np.exp((low + high) / 2))


def negative_log_likelihood(labels, probabilities):
    """The mean of -log(probability of the true class): what temperature scaling minimises."""
    labels = np.asarray(labels)
    chosen = np.asarray(probabilities)[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(chosen, 1e-12, 1.0))))


@dataclasses.dataclass
class Calibration:
    """The temperature fitted for one task, with the calibration error and NLL before and after."""

    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    split: str

    def to_dict(self):
        return dataclasses.asdict(self)


def calibrate(model, records, split="val", *, batch_size=64):
    """Fits temperature scaling on one split and sets it in the classifier's head(s).

    The model is changed in place: its head divides the logits by the
    fitted temperature, in Keras, in a saved `.keras` file and in every
    later export. Accuracy is unchanged. Call it again after more training:
    it fits from the uncalibrated logits.

    Args:
        model: a trained classifier.
        records: `Records` with the split (validation data, not the test split).
        split: the split to fit on.
        batch_size: samples per batch.

    Returns:
        `Calibration`; for a multi-task model, a dict of task -> `Calibration`.

    Example:

    >>> result = calibrate(model, records)  # doctest: +SKIP
    >>> result.temperature, result.ece_before, result.ece_after  # doctest: +SKIP
    (1.43, 0.061, 0.018)
    """
    if not (records.splits == split).any():
        raise ValueError(f"calibrate() fits on the {split!r} split, and the records have no "
                         f"{split} rows.")
    spec = describe(model)
    heads = {task: model.get_layer(spec.head(task)) for task in spec.tasks}
    with uncalibrated(model):  # fit from the probabilities as trained, not an earlier fit's
        labels, probabilities = predict_records(model, records, split, batch_size)
    if not spec.multi_output:
        labels, probabilities = {None: labels}, {None: probabilities}
    results = {}
    for task, head in heads.items():
        raw = probabilities[task]
        temperature = fit_temperature(labels[task], raw)
        head.temperature = temperature
        scaled = rescale(raw, temperature)
        results[task] = Calibration(
            temperature, expected_calibration_error(labels[task], raw),
            expected_calibration_error(labels[task], scaled),
            negative_log_likelihood(labels[task], raw),
            negative_log_likelihood(labels[task], scaled), split)
    return results if spec.multi_output else results[None]


def set_temperature(model, calibration):
    """Sets the temperature(s) that `calibrate` fitted on one model in another's head(s).

    For a model that trained on the rows a temperature would be fitted on,
    such as one refit on the train and val rows: it takes the temperature
    fitted on the val split by its held-out counterpart.

    Args:
        model: a classifier with the same tasks as the calibrated one.
        calibration: what `calibrate` returned (a dict of task -> `Calibration`
            for a multi-task model).

    Example:

    >>> set_temperature(refit_model, calibrate(held_out_model, records))  # doctest: +SKIP
    """
    spec = describe(model)
    for task in spec.tasks:
        fitted = calibration[task] if spec.multi_output else calibration
        model.get_layer(spec.head(task)).temperature = fitted.temperature
