"""Quality presets, time budgets and ensembles of seeds in a run."""

import dataclasses
import json
import os

import keras
import numpy as np
import pytest

from conftest import random_mobilenet_weights
from keras_mmtl import experiment
from keras_mmtl.cli import build_parser
from keras_mmtl.config import RunConfig, from_arguments
from keras_mmtl.evaluation import predict_records
from keras_mmtl.experiment import (
    _alone_arguments,
    _members,
    resolve_preset,
    run_experiment,
    run_fingerprint,
    train_arguments,
)
from keras_mmtl.models import EnsembleHead, build_classifier, describe
from keras_mmtl.presets import (
    PRESETS,
    choose_preset,
    estimated_minutes,
    parse_duration,
    with_preset,
)
from keras_mmtl.training import cache as cache_module
from keras_mmtl.training.run_state import StaleRunError
from keras_mmtl.training.trainer import _input_kinds


def test_the_default_is_the_medium_recipe():
    config, why = resolve_preset(RunConfig(), rows=10_000)
    assert why == "the default" and config.training.preset == "medium"
    assert config.model.text_encoder == "ngrams"
    assert config.training.class_weight == "balanced"
    assert config.training.fine_tune_epochs == 5 and config.training.ensemble == 1
    assert config.training.modality_experts
    # Resolving again changes nothing: a written config runs the same recipe.
    assert resolve_preset(config, rows=10_000)[0] == config


@pytest.mark.parametrize("preset, fine_tune_epochs, ensemble, experts, refit", [
    ("fast", 0, 1, False, False), ("medium", 5, 1, True, True), ("best", 5, 3, True, True)])
def test_a_preset_sets_what_the_config_leaves_at_its_defaults(preset, fine_tune_epochs, ensemble,
                                                              experts, refit):
    config = RunConfig.from_dict({"model": {"text_encoder": "scratch"},
                                  "training": {"preset": preset, "epochs": 4}})
    config, why = resolve_preset(config, rows=1000)
    assert why == "chosen"
    assert config.training.fine_tune_epochs == fine_tune_epochs
    assert config.training.ensemble == ensemble
    assert config.training.modality_experts == experts
    assert config.training.refit == refit
    # Set explicitly: kept.
    assert config.model.text_encoder == "scratch" and config.training.epochs == 4


@pytest.mark.parametrize("kinds, training, refit", [
    ((), {}, True), ({"image", "text"}, {}, True), ({"text"}, {}, False), ({"image"}, {}, False),
    ({"text"}, {"refit": True}, True), ({"image", "text"}, {"refit": False}, False)])
def test_models_of_several_kinds_of_input_are_refit(kinds, training, refit):
    config, why = resolve_preset(RunConfig.from_dict({"training": training}), rows=1000,
                                 kinds=kinds)
    assert config.training.refit == refit
    assert ("inputs of one kind are not refit" in why) == (len(kinds) == 1 and not training)


@pytest.mark.parametrize("argv, training, expected", [
    (["--preset", "fast"], {}, ("fast", 0, 1, False)),
    (["--preset", "fast", "--fine-tune-epochs", "5"], {}, ("fast", 5, 1, False)),
    (["--preset", "fast", "--modality-experts"], {}, ("fast", 0, 1, True)),
    (["--preset", "best", "--ensemble", "1"], {}, ("best", 5, 1, True)),
    (["--preset", "best"], {}, ("best", 5, 3, True)),
    ([], {"preset": "fast", "fine_tune_epochs": 5}, ("fast", 5, 1, False)),  # in the file
])
def test_settings_given_win_over_the_preset_even_at_the_defaults(argv, training, expected):
    base = RunConfig.from_dict({"training": training})
    config = from_arguments(build_parser().parse_args(["train", *argv]), base)
    fit = resolve_preset(config, rows=1000, kinds={"image", "text"})[0].training
    assert (fit.preset, fit.fine_tune_epochs, fit.ensemble, fit.modality_experts) == expected


@pytest.mark.parametrize("argv, edits, expected", [
    ([], {}, ("best", 3, 0.1, 5)),  # the same run again
    (["--preset", "medium"], {}, ("medium", 1, 0.1, 5)),
    (["--preset", "fast"], {}, ("fast", 1, None, 3)),
    (["--preset", "fast"], {"ensemble": 2}, ("fast", 2, None, 3)),  # edited in the file: kept
])
def test_a_written_config_runs_its_preset_again_or_takes_another(tmp_path, argv, edits,
                                                                  expected):
    written, _ = resolve_preset(RunConfig.from_dict({"training": {"preset": "best"}}),
                                rows=1000, kinds={"image"})
    path = written.replace(training=edits).save(str(tmp_path / "config.yaml"))
    config = from_arguments(build_parser().parse_args(["train", *argv]),
                            RunConfig.from_file(path))
    fit = resolve_preset(config, rows=1000, kinds={"image"})[0].training
    assert (fit.preset, fit.ensemble, fit.label_smoothing, fit.unfreeze_blocks) == expected


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


@pytest.mark.parametrize("preset, kinds, training, expected", [
    ("auto", {"image"}, {}, 0.1),
    ("best", {"image"}, {}, 0.1),
    ("auto", {"image", "text"}, {}, None),  # unset: the image expert's is the preset's
    ("auto", {"image", "tabular"}, {}, None),
    ("auto", {"text"}, {}, None),
    ("fast", {"image"}, {}, None),  # not measured without fine-tuning
    ("auto", {"image"}, {"label_smoothing": 0.05}, 0.05),  # set explicitly: kept
    ("auto", {"image"}, {"label_smoothing": 0.0}, 0.0),  # even to no smoothing
])
def test_models_of_images_alone_train_with_label_smoothing(preset, kinds, training, expected):
    config = RunConfig.from_dict({"training": {"preset": preset, **training}})
    config, why = resolve_preset(config, rows=1000, kinds=kinds)
    assert config.training.label_smoothing == expected
    said = "for a run of images alone, also" in why and "label_smoothing=0.1" in why
    assert said == (expected == 0.1)
    assert train_arguments(config)["label_smoothing"] == (expected or 0.0)


@pytest.mark.parametrize("kinds, modalities, training, expected", [
    ({"image"}, None, {}, 10),  # an image-only run
    ({"image", "text"}, None, {}, 5),  # the fused model
    ({"image", "text"}, ("image",), {}, 10),  # its image expert
    ({"image", "text"}, ("image",), {"fine_tune_epochs": 3}, 3),  # set explicitly: kept
    ({"image"}, None, {"fine_tune_epochs": 3}, 3),
])
def test_models_of_images_alone_fine_tune_longer(kinds, modalities, training, expected):
    config = RunConfig.from_dict({"training": {"preset": "medium", **training}})
    config, _ = resolve_preset(config, rows=1000, kinds=kinds)
    settings = {**train_arguments(config), **_alone_arguments(config.training, modalities)}
    assert settings["fine_tune_epochs"] == expected


@pytest.mark.parametrize("preset, kinds, training, expected", [
    ("auto", {"image"}, {}, 5),
    ("best", {"image"}, {}, 5),
    ("auto", {"image", "text"}, {}, 3),  # the fused model, and its image expert
    ("fast", {"image"}, {}, 3),  # nothing to fine-tune
    ("auto", {"image"}, {"unfreeze_blocks": 3}, 3),  # set explicitly: kept
])
def test_image_only_runs_fine_tune_more_blocks(preset, kinds, training, expected):
    config = RunConfig.from_dict({"training": {"preset": preset, **training}})
    config, why = resolve_preset(config, rows=1000, kinds=kinds)
    assert train_arguments(config)["unfreeze_blocks"] == expected
    assert ("unfreeze_blocks=5" in why) == (expected == 5)


@pytest.mark.parametrize("training, image_expert", [
    ({}, {"label_smoothing": 0.1, "fine_tune_epochs": 10}),
    ({"label_smoothing": 0.0}, {"fine_tune_epochs": 10}),  # set explicitly: every member's
    ({"label_smoothing": 0.05}, {"fine_tune_epochs": 10}),
    ({"preset": "fast"}, {}),
])
def test_the_image_expert_of_a_fused_run_smooths_unless_told_otherwise(training, image_expert):
    config = RunConfig.from_dict({"training": training})
    fit = resolve_preset(config, rows=1000, kinds={"image", "text"})[0].training
    assert _alone_arguments(fit, ("image",)) == image_expert
    assert _alone_arguments(fit, ("text",)) == _alone_arguments(fit, None) == {}


def test_train_reads_the_kinds_of_its_models_inputs():
    @with_preset("training", kinds=_input_kinds)
    def fit(model, label_smoothing=0.0, class_weight=None, **others):
        return label_smoothing, class_weight

    images = build_classifier(["a", "b"], image_backbone="small_cnn", image_weights=None,
                              image_size=(16, 16), text_encoder=None)
    both = build_classifier(["a", "b"], image_backbone="small_cnn", image_weights=None,
                            image_size=(16, 16), text_vocabulary=["x"])
    assert fit(images, preset="medium") == (0.1, "balanced")
    assert fit(both, preset="medium") == (0.0, "balanced")
    assert fit(images) == (0.0, None)


@pytest.mark.slow
def test_an_image_only_run_writes_the_smoothing_it_trained_with(tmp_path, products, capsys):
    config = {
        "data": {"manifest": products, "split_column": "split", "text_column": None},
        "model": {"image_backbone": "small_cnn", "image_weights": None, "image_size": [16, 16]},
        "training": {"epochs": 1, "fine_tune_epochs": 0, "batch_size": 8, "projector": False},
        "output": {"run_dir": str(tmp_path / "run"), "export": False},
    }
    run_experiment(config, verbose=0)
    written = RunConfig.from_file(str(tmp_path / "run" / "config.yaml"))
    assert written.training.label_smoothing == 0.1 and written.training.preset == "medium"
    assert "for a run of images alone, also label_smoothing=0.1" in capsys.readouterr().out


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
                     "modality_experts": False, "projector": False, "class_weight": None},
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


@pytest.mark.parametrize("data, model, training, expected", [
    ({}, {}, {}, [(0, None), (0, ("image",))]),
    ({}, {}, {"ensemble": 2}, [(0, None), (1, None), (0, ("image",)), (1, ("image",))]),
    ({}, {}, {"modality_experts": False}, [(0, None)]),
    ({"text_column": None}, {}, {}, [(0, None)]),  # one input: nothing to add
    ({"label_column": ["label", "split"]}, {}, {}, [(0, None)]),  # two tasks (any 2nd column)
    ({"allow_missing": True}, {}, {}, [(0, None)]),  # an expert cannot answer without its input
    ({}, {"modality_dropout": 0.2}, {}, [(0, None)]),
])
def test_a_run_plans_a_fused_model_and_an_expert_per_image_input(products, data, model, training,
                                                           expected):
    config = RunConfig.from_dict({"data": {"manifest": products, "split_column": "split",
                                           "seed": 0, **data},
                                  "model": model, "training": training})
    config, _ = resolve_preset(config, rows=24)
    records = config.data.read(check_images=False)
    assert _members(config, records, source=None) == expected
    assert _members(config, records, source=records) == expected[:config.training.ensemble]


def _with_image_expert_settings(monkeypatch, settings):
    """The medium preset, its settings for models of images alone replaced."""
    monkeypatch.setitem(PRESETS, "medium",
                        dataclasses.replace(PRESETS["medium"], image_only=settings))


@pytest.mark.parametrize("training, recorded", [
    ({}, {"label_smoothing": 0.1, "fine_tune_epochs": 10}),
    ({"fine_tune_epochs": 2}, {"label_smoothing": 0.1}),  # given: every member's
    ({"modality_experts": False}, None),
])
def test_a_run_fingerprints_what_its_image_expert_takes_from_the_preset(products, monkeypatch,
                                                                        training, recorded):
    config = RunConfig.from_dict({"data": {"manifest": products, "split_column": "split"},
                                  "training": training})
    config, _ = resolve_preset(config, rows=24)
    found = run_fingerprint(config, {})
    assert found["config"].get("training.image_expert") == recorded
    _with_image_expert_settings(monkeypatch, {"label_smoothing": 0.2})
    assert (run_fingerprint(config, {}) != found) == (recorded is not None)


@pytest.mark.slow
def test_a_run_whose_image_expert_the_preset_now_trains_otherwise_stops_before_any_work(
        tmp_path, products, monkeypatch):
    config = {
        "data": {"manifest": products, "split_column": "split"},
        "model": {"image_backbone": "small_cnn", "image_weights": None, "image_size": [16, 16]},
        "training": {"epochs": 1, "fine_tune_epochs": 0, "batch_size": 8, "projector": False,
                     "calibrate": False},
        "output": {"run_dir": str(tmp_path / "run"), "export": False},
    }
    run_experiment(config, verbose=0)
    trained = {name: os.path.getmtime(tmp_path / "run" / name / "model.keras")
               for name in ("member1", "member1-image")}
    _with_image_expert_settings(monkeypatch, {"label_smoothing": 0.2})
    with pytest.raises(StaleRunError, match=r"nothing was trained or exported.*"
                       r"training.image_expert .*'label_smoothing': 0.1.* -> .*0.2.*--overwrite"):
        run_experiment(config, verbose=0)
    assert trained == {name: os.path.getmtime(tmp_path / "run" / name / "model.keras")
                       for name in trained}
    run_experiment(config, overwrite=True, verbose=0)  # trained again with the new settings
    state = json.loads((tmp_path / "run" / "member1-image" / "state.json").read_text())
    assert state["fingerprint"]["config"]["training.label_smoothing"] == 0.2


@pytest.mark.slow
def test_a_fused_model_with_auxiliary_heads_has_an_image_expert_without(tmp_path, products):
    config = {
        "data": {"manifest": products, "split_column": "split"},
        "model": {"image_backbone": "small_cnn", "image_weights": None, "image_size": [16, 16],
                  "auxiliary_heads": True},
        "training": {"epochs": 1, "fine_tune_epochs": 0, "batch_size": 8, "projector": False,
                     "calibrate": False, "modality_experts": True},
        "output": {"run_dir": str(tmp_path / "run"), "export": False},
    }
    run_experiment(config, verbose=0)
    fused, expert = (keras.models.load_model(tmp_path / "run" / name / "model.keras")
                     for name in ("member1", "member1-image"))
    assert len(fused.outputs) > 1 and len(expert.outputs) == 1  # the auxiliary heads, none


@pytest.mark.slow
@pytest.mark.parametrize("time_limit", [None, "1s"])
def test_the_modality_report_is_left_out_when_it_would_end_past_the_time_limit(
        tmp_path, products, capsys, time_limit):
    config = {
        "data": {"manifest": products, "split_column": "split"},
        "model": {"image_backbone": "small_cnn", "image_weights": None, "image_size": [16, 16]},
        "training": {"epochs": 1, "fine_tune_epochs": 0, "batch_size": 8, "projector": False,
                     "calibrate": False, "modality_experts": False, "time_limit": time_limit},
        "output": {"run_dir": str(tmp_path / "run"), "export": False},
    }
    result = run_experiment(config, verbose=0)
    said = capsys.readouterr().out
    assert result.report is not None and (result.modalities is None) == (time_limit is not None)
    assert ("Modality report left out" in said) == (time_limit is not None), said
    assert (f"--config {tmp_path / 'run' / 'config.yaml'}`" in said) == (time_limit is not None)


@pytest.mark.slow
def test_the_members_of_a_timed_run_share_features_computed_before_the_time_is_shared(
        tmp_path, products, monkeypatch):
    passes, compute = [], cache_module._compute

    def counted(extractor, *args, **kwargs):  # n-gram counts are counted again in each phase
        if not cache_module._sparse_outputs(extractor):
            passes.append(1)
        return compute(extractor, *args, **kwargs)

    monkeypatch.setattr(cache_module, "_compute", counted)
    computed_in_training, real_train = [], experiment.train

    def recording_train(*args, **kwargs):
        before = len(passes)
        history = real_train(*args, **kwargs)
        computed_in_training.append(len(passes) - before)
        return history

    monkeypatch.setattr(experiment, "train", recording_train)
    config = {
        "data": {"manifest": products, "split_column": "split"},
        "model": {"image_backbone": "mobilenet_v2_0.35", "image_size": [32, 32],
                  "image_weights": random_mobilenet_weights(str(tmp_path))},
        "training": {"preset": "medium", "epochs": 1, "fine_tune_epochs": 1,
                     "unfreeze_blocks": 1, "batch_size": 8, "projector": False,
                     "calibrate": False, "time_limit": "10m"},
        "output": {"run_dir": str(tmp_path / "run"), "export": False},
    }
    run_experiment(config, verbose=0)
    assert passes  # the frozen image backbone's features: computed once, before the members
    assert computed_in_training == [0, 0]  # the fused model and its image expert


@pytest.mark.slow
def test_image_experts_are_served_with_the_fused_model_as_their_geometric_mean(
        tmp_path, products, monkeypatch):
    smoothing, real_train = [], experiment.train

    def recording_train(model, *args, **kwargs):
        smoothing.append((describe(model).modalities, kwargs["label_smoothing"]))
        return real_train(model, *args, **kwargs)

    monkeypatch.setattr(experiment, "train", recording_train)
    config = {
        "data": {"manifest": products, "split_column": "split"},
        "model": {"image_backbone": "small_cnn", "image_weights": None, "image_size": [16, 16],
                  "text_encoder": "scratch"},
        "training": {"epochs": 2, "fine_tune_epochs": 0, "batch_size": 8, "projector": False,
                     "calibrate": False, "refit": False},  # the members as trained here
        "output": {"run_dir": str(tmp_path / "run"), "export": False},
    }
    result = run_experiment(config, verbose=0)  # the medium preset: experts on
    members = [keras.models.load_model(tmp_path / "run" / name / "model.keras")
               for name in ("member1", "member1-image")]
    assert [describe(m).modalities for m in members] == [("image", "text"), ("image",)]
    assert not os.path.exists(tmp_path / "run" / "member1-text")
    # The image expert trains as an image-only run would: with the preset's label smoothing.
    assert smoothing == [(("image", "text"), 0.0), (("image",), 0.1)]
    records = RunConfig.from_file(str(tmp_path / "run" / "config.yaml")).data.read()
    logs = sum(np.log(predict_records(m, records, "test")[1]) for m in members)
    expected = np.exp(logs / 2) / np.exp(logs / 2).sum(axis=1, keepdims=True)
    served = keras.models.load_model(tmp_path / "run" / "model.keras")
    np.testing.assert_allclose(predict_records(served, records, "test")[1], expected, atol=1e-5)
    assert result.history["epoch"]  # the fused member's
    # One feature cache for the run, none per member (the random small CNN trains, so images
    # are not cached: it holds the fused model's token ids).
    assert not any(os.path.exists(tmp_path / "run" / name / "cache") for name in os.listdir(
        tmp_path / "run") if name.startswith("member"))
    assert len([f for f in os.listdir(tmp_path / "run" / "cache") if f.startswith("train-")]) == 1
