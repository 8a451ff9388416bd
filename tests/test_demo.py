import filecmp
import os

import pytest

from keras_mmtl.data import make_demo_dataset, read_manifest
from keras_mmtl.demo import run_demo


def test_demo_data_is_deterministic_and_needs_both_modalities(tmp_path):
    first = make_demo_dataset(str(tmp_path / "a"), num_samples=60, seed=1)
    second = make_demo_dataset(str(tmp_path / "b"), num_samples=60, seed=1)
    assert filecmp.cmp(first, second, shallow=False)
    records = read_manifest(first, text_column="title", split_column="split")
    assert len(records.class_names) == 9
    for text, label in zip(records.texts, records.labels):
        colour, material = records.class_names[label].split()
        assert material in text.split()
        assert not any(c in text for c in ("red", "green", "blue"))


@pytest.mark.slow
def test_demo_fusion_beats_each_modality_by_ten_points(tmp_path, capfd):
    results = run_demo(str(tmp_path / "runs"), str(tmp_path / "saved"), num_samples=600,
                       epochs=6, image_weights=None, verbose=0)
    reports = results["reports"]
    best_single = max(reports["image only"].accuracy, reports["text only"].accuracy)
    assert reports["image + text"].accuracy >= best_single + 0.10
    assert os.path.exists(os.path.join(results["export_path"], "saved_model.pb"))
    out, err = capfd.readouterr()
    assert "Fusion beats the best single modality" in out
    assert "retracing" not in err  # the library's loops trace each model on purpose
