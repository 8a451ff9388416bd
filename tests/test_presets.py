"""Quality presets, time budgets and ensembles of seeds in a run."""

import os

import keras
import pytest

from keras_mmtl.config import RunConfig
from keras_mmtl.experiment import resolve_preset, run_experiment
from keras_mmtl.models import EnsembleHead
from keras_mmtl.presets import (
    PRESETS,
    choose_preset,
    estimated_minutes,
    parse_duration,
    preset_arguments,
)


def test_the_default_is_the_medium_recipe():
    config, why = resolve_preset(RunConfig(), rows=10_000)
    assert why == "the default" and config.training.preset == "medium"
    assert config.model.text_encoder == "ngrams"
    assert config.training.class_weight == "balanced"
    assert config.training.fine_tune_epochs == 5 and config.training.ensemble == 1
    # Resolving again changes nothing: a written config runs the same recipe.
    assert resolve_preset(config, rows=10_000)[0] == config


@pytest.mark.parametrize("preset, fine_tune_epochs, ensemble", [
    ("fast", 0, 1), ("medium", 5, 1), ("best", 5, 3)])
def test_a_preset_sets_what_the_config_leaves_at_its_defaults(preset, fine_tune_epochs, ensemble):
    config = RunConfig.from_dict({"model": {"text_encoder": "scratch"},
                                  "training": {"preset": preset, "epochs": 4}})
    config, why = resolve_preset(config, rows=1000)
    assert why == "chosen"
    assert config.training.fine_tune_epochs == fine_tune_epochs
    assert config.training.ensemble == ensemble
    # Set explicitly: kept.
    assert config.model.text_encoder == "scratch" and config.training.epochs == 4


@pytest.mark.parametrize("limit, rows, expected", [
    ("15m", 10_000, "medium"), ("1h", 10_000, "best"), ("6m", 10_000, "fast"),
    ("15m", 100_000, "fast"), (2400, 30_000, "medium")])
def test_a_time_limit_chooses_the_best_preset_that_fits(limit, rows, expected):
    name, why = choose_preset(limit, rows)
    assert name == expected and f"{rows:,} rows" in why
    seconds = parse_duration(limit)
    order = list(PRESETS)
    for better in order[order.index(name) + 1:]:  # each better preset would not have fitted
        assert estimated_minutes(better, rows) * 60 > 0.9 * seconds


def test_no_preset_fits_says_so():
    name, why = choose_preset("1m", 10_000)
    assert name == "fast" and "no preset fits" in why


@pytest.mark.slow
def test_an_ensemble_run_shares_the_feature_cache_and_serves_one_model(tmp_path, products):
    config = {
        "data": {"manifest": products, "split_column": "split"},
        "model": {"image_backbone": "small_cnn", "image_weights": None, "image_size": [16, 16],
                  "text_encoder": "scratch"},
        "training": {"epochs": 2, "fine_tune_epochs": 0, "batch_size": 8, "ensemble": 2,
                     "projector": False, "class_weight": None},
        "output": {"run_dir": str(tmp_path / "run"), "export_dir": str(tmp_path / "saved")},
    }
    result = run_experiment(config, verbose=0)
    assert isinstance(result.model.get_layer("head"), EnsembleHead)
    loaded = keras.models.load_model(tmp_path / "run" / "model.keras")
    assert isinstance(loaded.get_layer("head"), EnsembleHead)
    for member in ("member1", "member2"):
        assert os.path.exists(tmp_path / "run" / member / "model.keras")
        assert not os.path.exists(tmp_path / "run" / member / "cache")
    assert os.listdir(tmp_path / "run" / "cache")  # one cache for both members
    assert os.path.exists(result.export_path)
    assert result.report.accuracy >= 0.5  # 4 balanced classes: chance is 0.25
