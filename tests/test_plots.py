import numpy as np
import pytest

from keras_mmtl.evaluation import (
    classification_report,
    expected_calibration_error,
    reliability_bins,
)
from keras_mmtl.plots import figure_image, plot_confusion_matrix, plot_history, plot_reliability


def test_reliability_bins_and_the_ece_agree():
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(4), size=200)
    labels = rng.integers(4, size=200)
    bins = reliability_bins(labels, probabilities, bins=10)
    confidence = probabilities.max(axis=1)
    top = np.minimum((confidence * 10).astype(int), 9)
    for b in range(10):
        chosen = top == b
        assert bins["count"][b] == chosen.sum()
        if chosen.any():
            assert bins["confidence"][b] == pytest.approx(confidence[chosen].mean())
            assert bins["accuracy"][b] == pytest.approx(
                (probabilities[chosen].argmax(1) == labels[chosen]).mean())
    gaps = np.abs(np.subtract(bins["accuracy"], bins["confidence"]))
    assert expected_calibration_error(labels, probabilities, bins=10) == pytest.approx(
        (np.asarray(bins["count"]) * gaps).sum() / 200)


def test_the_reliability_diagram_draws_one_bar_per_bin_at_its_accuracy():
    report = classification_report([0, 1, 1, 0], [[.95, .05], [.3, .7], [.6, .4], [.55, .45]],
                                   ["a", "b"])
    bars = plot_reliability(report).axes[0].patches
    assert len(bars) == len(report.reliability["count"])
    assert [round(bar.get_height(), 3) for bar in bars] == [
        round(value, 3) for value in report.reliability["accuracy"]]


@pytest.mark.parametrize("classes, annotated", [(3, True), (20, False)])
def test_the_confusion_matrix_shows_counts_up_to_15_classes(classes, annotated):
    confusion = np.arange(classes * classes).reshape(classes, classes) + 1
    fig = plot_confusion_matrix(confusion, [f"class {i}" for i in range(classes)])
    texts = [text.get_text() for text in fig.axes[0].texts]
    assert (texts == [str(count) for count in confusion.ravel()]) is annotated
    assert figure_image(fig).shape[2] == 3


@pytest.mark.parametrize("phases, line", [([1, 1, 2, 2], 2.5), ([1, 1, 1, 1], None)])
def test_learning_curves_mark_the_start_of_fine_tuning(phases, line):
    history = {"loss": [1.0, 0.8, 0.6, 0.5], "val_loss": [1.1, 0.9, 0.8, 0.75],
               "macro_f1": [0.2, 0.4, 0.6, 0.7], "phase": phases}
    fig = plot_history(history, metrics=("loss", "macro_f1", "accuracy"))
    assert [ax.get_title() for ax in fig.axes] == ["loss", "macro_f1"]  # accuracy: not recorded
    loss = fig.axes[0]
    assert [list(l.get_ydata()) for l in loss.lines[:2]] == [history["loss"], history["val_loss"]]
    vertical = [l.get_xdata()[0] for l in loss.lines[2:]]
    assert vertical == ([] if line is None else [line])
