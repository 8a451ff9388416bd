import numpy as np
import pytest

from keras_mmtl.evaluation import classification_report

NAMES = ["a", "b", "c"]


def test_perfect_predictions_score_one():
    labels = np.array([0, 1, 2, 1])
    report = classification_report(labels, np.eye(3)[labels], NAMES)
    assert report.accuracy == report.macro_f1 == report.roc_auc == report.pr_auc == 1.0
    assert report.confusion.tolist() == [[1, 0, 0], [0, 2, 0], [0, 0, 1]]


def test_known_scores():
    labels = np.array([0, 0, 1, 1, 2, 2])
    probabilities = np.array([
        [0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1],
        [0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.5, 0.1, 0.4]])
    report = classification_report(labels, probabilities, NAMES)
    # predictions: 0 1 1 1 2 0 -> a: P 1/2 R 1/2; b: P 2/3 R 1; c: P 1 R 1/2
    assert report.accuracy == pytest.approx(4 / 6)
    assert report.macro_precision == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert report.macro_recall == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    f1 = [0.5, 0.8, 2 / 3]
    assert report.macro_f1 == pytest.approx(np.mean(f1))
    # class a scores: positives .8 .3, negatives .2 .2 .1 .5 -> 7 of 8 pairs ordered
    assert report.per_class[0]["roc_auc"] == pytest.approx(7 / 8)
    # ranking for a: .8(+) .5(-) .3(+) ... -> AP = 1/2 * 1 + 1/2 * 2/3
    assert report.per_class[0]["pr_auc"] == pytest.approx(0.5 + 1 / 3)


def test_ties_count_half_in_roc_auc():
    report = classification_report(np.array([0, 1]), np.array([[0.5, 0.5], [0.5, 0.5]]), ["a", "b"])
    assert report.roc_auc == pytest.approx(0.5)


def test_class_absent_from_data_is_left_out_of_auc_averages():
    labels = np.array([0, 0, 1, 1])
    probabilities = np.array([[.9, .05, .05], [.8, .1, .1], [.1, .8, .1], [.2, .7, .1]])
    report = classification_report(labels, probabilities, NAMES)
    assert np.isnan(report.per_class[2]["roc_auc"])
    assert report.roc_auc == 1.0 and report.macro_f1 == 1.0


def test_save_writes_report_table_and_plots(tmp_path):
    labels = np.array([0, 1, 2, 2])
    report = classification_report(labels, np.eye(3)[[0, 1, 2, 1]], NAMES)
    paths = report.save(str(tmp_path))
    for name in ("confusion_matrix.png", "roc_curves.png", "pr_curves.png", "reliability.png"):
        assert open(paths[name], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "macro_f1" in open(paths["report.json"]).read()
    assert open(paths["per_class.csv"]).readline().startswith("class,precision,recall,f1")
    assert "a" in report.table() and "accuracy 0.7500" in report.summary()
