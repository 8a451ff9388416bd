"""Refit: each model trained again on the train and val rows, for the epochs val chose."""

import json
import os

import keras
import numpy as np
import pytest

from keras_mmtl import experiment
from keras_mmtl.config import RunConfig
from keras_mmtl.evaluation import predict_records
from keras_mmtl.experiment import run_experiment
from keras_mmtl.models import build_classifier_for, describe
from keras_mmtl.training import refit, train

# A frozen random small CNN stands in for a pretrained backbone: two phases, fast.
SMALL = dict(image_backbone="small_cnn", image_weights=None, image_size=(16, 16),
             freeze_backbone=True)
TRAIN = dict(epochs=3, fine_tune_epochs=2, patience=5, batch_size=8, projector=False, verbose=0)


def _cached_rows(cache):
    """The row counts of the train split's cached feature files."""
    return {len(next(iter(np.load(os.path.join(cache, name)).values())))
            for name in os.listdir(cache) if name.startswith("train-")}


def test_refit_trains_on_train_and_val_rows_for_the_epochs_val_chose(tmp_path, product_records):
    run, cache = tmp_path / "run", str(tmp_path / "cache")
    keras.utils.set_random_seed(0)
    train(build_classifier_for(product_records, **SMALL), product_records, str(run),
          cache_dir=cache, **TRAIN)
    state = json.loads((run / "state.json").read_text())
    history = state["history"]
    best = {phase: int(np.argmin([loss for p, loss in zip(history["phase"], history["val_loss"])
                                  if p == phase])) + 1 for phase in (1, 2)}
    phase_2 = best[2] if state["best"]["2"] < state["best"]["1"] else 0
    keras.utils.set_random_seed(0)
    again = build_classifier_for(product_records, **SMALL)
    refitted = refit(again, product_records, str(run), cache_dir=cache,
                     **{**TRAIN, "projector": True})
    assert refitted["phase"] == [1] * best[1] + [2] * phase_2
    assert "val_loss" not in refitted  # the val rows are training rows
    # No projector: the refit has no rows it did not train on.
    assert not list((run / "refit").rglob("projector_config.pbtxt"))
    # The first run cached its 16 train rows; the refit its 16 + 4 val rows.
    assert _cached_rows(cache) == {16, 20}
    assert os.path.exists(run / "refit" / "model.keras")


@pytest.mark.bad_input
def test_refit_needs_a_finished_run_with_val(tmp_path, product_records):
    model = build_classifier_for(product_records, **SMALL)
    with pytest.raises(ValueError, match="needs a finished train.. run with a val split"):
        refit(model, product_records, str(tmp_path), **TRAIN)
    records = product_records.select(product_records.splits != "val")
    train(model, records, str(tmp_path), **{**TRAIN, "epochs": 1, "fine_tune_epochs": 0})
    with pytest.raises(ValueError, match="needs a finished train.. run with a val split"):
        refit(build_classifier_for(records, **SMALL), records, str(tmp_path), **TRAIN)


@pytest.mark.slow
def test_a_refit_run_serves_its_refit_members_calibrated_on_the_held_out_ones(
        tmp_path, products, monkeypatch):
    temperatures, real_calibrate = [], experiment.calibrate

    def recording_calibrate(model, *args, **kwargs):
        fitted = real_calibrate(model, *args, **kwargs)
        temperatures.append(fitted.temperature)
        return fitted

    monkeypatch.setattr(experiment, "calibrate", recording_calibrate)
    run = tmp_path / "run"
    config = {
        "data": {"manifest": products, "split_column": "split"},
        "model": {"image_backbone": "small_cnn", "image_weights": None, "image_size": [16, 16],
                  "text_encoder": "scratch"},
        "training": {"epochs": 2, "fine_tune_epochs": 0, "batch_size": 8, "projector": False,
                     "refit": True},
        "output": {"run_dir": str(run), "export": False},
    }
    result = run_experiment(config, verbose=0)  # the fused model and its image expert
    served = keras.models.load_model(run / "model.keras")
    members = [keras.models.load_model(run / name / "refit" / "model.keras")
               for name in ("member1", "member1-image")]
    held_out = keras.models.load_model(run / "member1" / "model.keras")
    assert any(not np.allclose(a, b) for a, b in zip(held_out.get_weights(),
                                                      members[0].get_weights()))
    # The served model is the refit members' geometric mean, with the one temperature fitted
    # (on val, by the held-out members, which did not train on it).
    records = RunConfig.from_file(str(run / "config.yaml")).data.read()
    logs = sum(np.log(predict_records(m, records, "test")[1]) for m in members)
    head = served.get_layer(describe(served).head())
    assert len(temperatures) == 1 and head.temperature == pytest.approx(temperatures[0])
    expected = np.exp(logs / 2 / head.temperature)
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(predict_records(served, records, "test")[1], expected, atol=1e-5)
    assert result.report.accuracy >= 0.5  # 4 balanced classes: chance is 0.25
