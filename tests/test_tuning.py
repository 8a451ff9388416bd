import importlib.util
import os

import numpy as np
import pytest
import tensorflow as tf

from keras_mmtl.data import from_arrays
from keras_mmtl.models import FUSIONS, build_classifier_for
from keras_mmtl.training import tuning
from keras_mmtl.training.tuning import default_search_space, tune

pytest.importorskip("keras_tuner")

# A frozen random small CNN stands in for a pretrained backbone (as in test_training).
SMALL = dict(image_backbone="small_cnn", image_weights=None, image_size=(16, 16),
             freeze_backbone=True)
QUIET = dict(verbose=0, batch_size=8)


@pytest.fixture
def texts():
    """Text-only records, 3 classes told apart by one word, with a val split."""
    words = ["cotton", "wool", "silk"]
    labels = [words[i % 3] for i in range(30)]
    return from_arrays(labels, texts=[f"a nice {word} thing" for word in labels],
                       splits=(["train"] * 4 + ["val"]) * 6)


class _Calls(list):
    """The calls of the fake `train`; `crash` maps a learning rate to the error it raises once."""

    def __init__(self):
        super().__init__()
        self.crash = {}


@pytest.fixture
def fake_train(monkeypatch):
    """Replaces `train` in the tuner by a quick fake whose val accuracy is `100 * learning_rate`.

    Returns the `_Calls`: dicts of the `train` arguments plus `model` and `run_dir`.
    """
    calls = _Calls()

    def train(model, records, run_dir, **kwargs):
        calls.append({"model": model, "run_dir": run_dir, **kwargs})
        rate = kwargs.get("learning_rate", 1e-3)
        if rate in calls.crash:
            raise calls.crash.pop(rate)
        return {"val_accuracy": [0.0, 100 * rate], "val_loss": [1.0, 1 - 100 * rate],
                "epoch": [0, 1], "phase": [1, 1]}

    monkeypatch.setattr(tuning, "train", train)
    return calls


def _scores(result):
    return [trial.score for trial in result.trials]


# --- errors: nothing trains ------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, message", [
    ({"tuner": "grid"}, ValueError,
     r"Unknown tuner 'grid'. Expected one of \['bayesian', 'hyperband', 'random'\]. "
     r"Received: tuner='grid'"),
    ({"objective": "accuracy"}, ValueError, r"Expected one of \['val_accuracy', 'val_loss'\]"),
    ({"epoch": 3}, TypeError, r"Unknown train arguments \['epoch'\]"),
    ({"build_kwargs": {"backbone": "x"}}, TypeError, r"Unknown build_kwargs \['backbone'\]"),
    ({"search_space": {"dropout": 0.2}}, ValueError, r"search_space\['dropout'\] must be"),
    ({"search_space": {"dropout": []}}, ValueError, r"search_space\['dropout'\] must be"),
    ({"search_space": {"dropout": ("a", "b")}}, ValueError, r"search_space\['dropout'\] must"),
    ({"search_space": {"dropout": (0.5, 0.1)}}, ValueError, "low > high"),
    ({"search_space": {"dropot": [0.1]}}, ValueError, r"Cannot search \['dropot'\]"),
    ({"search_space": {}}, ValueError, "nothing to search"),
    ({"search_space": lambda hp: None}, ValueError, "nothing to search"),
    ({"search_space": {"learning_rate": [1e-3]}, "learning_rate": 1e-3}, ValueError,
     "both searched and fixed"),
    ({"search_space": {"epochs": [1, 2]}, "tuner": "hyperband"}, ValueError,
     "chooses `epochs` itself"),
])
@pytest.mark.bad_input
def test_bad_arguments_are_refused(tmp_path, texts, kwargs, error, message):
    with pytest.raises(error, match=message):
        tune(texts, str(tmp_path), **kwargs)
    assert not os.path.exists(tmp_path / "tuner")


@pytest.mark.bad_input
def test_records_without_val_rows_are_refused(tmp_path, texts):
    with pytest.raises(ValueError, match="no val rows"):
        tune(texts.select(texts.splits != "val"), str(tmp_path))


@pytest.mark.parametrize("build, fine_tune, expected", [
    ({"modalities": ("text",)}, True, {"learning_rate": (1e-4, 3e-3), "dropout": (0.0, 0.5, 0.1)}),
    (SMALL, True, {"learning_rate": (1e-4, 3e-3), "fusion": sorted(FUSIONS),
                   "unfreeze_blocks": (1, 4), "dropout": (0.0, 0.5, 0.1)}),  # small_cnn: 4 blocks
    (SMALL, False, {"learning_rate": (1e-4, 3e-3), "fusion": sorted(FUSIONS),
                    "dropout": (0.0, 0.5, 0.1)}),
    ({**SMALL, "freeze_backbone": False}, True,  # trains whole from the start: no phase 2
     {"learning_rate": (1e-4, 3e-3), "fusion": sorted(FUSIONS), "dropout": (0.0, 0.5, 0.1)}),
])
def test_default_search_space(product_records, build, fine_tune, expected):
    model = build_classifier_for(product_records, **build)
    assert default_search_space(model, fine_tune) == expected


# --- the search, with a fake train ---------------------------------------------------------

def test_random_search_runs_its_trials_and_keeps_the_best(tmp_path, texts, fake_train):
    result = tune(texts, str(tmp_path), max_trials=3, epochs=2, **QUIET)
    assert len(fake_train) == len(result.trials) == 3
    assert [call["run_dir"] for call in fake_train] == [
        str(tmp_path / "trials" / trial.trial_id) for trial in result.trials]
    for trial, call in zip(result.trials, fake_train):
        # Text only: no fusion, no backbone to unfreeze.
        assert set(trial.hyperparameters) == {"learning_rate", "dropout"}
        assert 1e-4 <= trial.hyperparameters["learning_rate"] <= 3e-3
        assert trial.hyperparameters["dropout"] in np.round(np.arange(0, 0.51, 0.1), 6)
        # Train arguments reach train, build arguments the model; fixed ones stay.
        assert call["learning_rate"] == trial.hyperparameters["learning_rate"]
        assert call["model"].get_layer("head").dropout_rate == pytest.approx(
            trial.hyperparameters["dropout"])
        assert call["epochs"] == 2 and call["seed"] == 0
        assert call["cache_dir"] == str(tmp_path / "cache")  # shared by the trials
        assert trial.score == pytest.approx(100 * trial.hyperparameters["learning_rate"])
    best = max(result.trials, key=lambda trial: trial.score)
    assert result.best_score == max(_scores(result))
    assert result.best_hyperparameters == best.hyperparameters
    assert result.best_run_dir == str(tmp_path / "trials" / best.trial_id)
    lines = result.table().splitlines()
    assert lines[0].split() == ["trial", "learning_rate", "dropout", "val_accuracy"]
    assert lines[1].split()[0] == best.trial_id and len(lines) == 4


def test_val_loss_is_minimised(tmp_path, texts, fake_train):
    result = tune(texts, str(tmp_path), max_trials=3, objective="val_loss", **QUIET)
    assert result.best_score == min(_scores(result))
    assert result.best_hyperparameters["learning_rate"] == max(
        trial.hyperparameters["learning_rate"] for trial in result.trials)


def test_search_space_restricts_the_search(tmp_path, texts, fake_train):
    space = {"learning_rate": [1e-3], "unfreeze_blocks": (1, 3), "dropout": (0.0, 0.5, 0.25),
             "fine_tune_learning_rate": (1e-5, 1e-3)}
    result = tune(texts, str(tmp_path), max_trials=4, search_space=space, **QUIET)
    assert len(fake_train) == 4
    for trial in result.trials:
        values = trial.hyperparameters
        assert set(values) == set(space)
        assert values["learning_rate"] == 1e-3
        assert isinstance(values["unfreeze_blocks"], int) and 1 <= values["unfreeze_blocks"] <= 3
        assert values["dropout"] in (0.0, 0.25, 0.5)
        assert 1e-5 <= values["fine_tune_learning_rate"] <= 1e-3


def test_search_space_function(tmp_path, texts, fake_train):
    def space(hp):
        return {"learning_rate": hp.Choice("rate", [1e-3, 2e-3]),
                "sequence_length": hp.Choice("length", [4, 8])}

    result = tune(texts, str(tmp_path), max_trials=2, search_space=space, **QUIET)
    for trial, call in zip(result.trials, fake_train):
        assert trial.hyperparameters["learning_rate"] in (1e-3, 2e-3)
        assert call["model"].input["text"] is not None
        assert call["learning_rate"] == trial.hyperparameters["learning_rate"]


@pytest.mark.parametrize("max_trials, epochs", [
    (2, [1, 1]), pytest.param(None, [1, 1, 1, 3, 3, 3], marks=pytest.mark.slow)])
def test_hyperband_trains_each_trial_for_its_epochs(tmp_path, texts, fake_train,
                                                      max_trials, epochs):
    # max_epochs 3, factor 3: a bracket of 3 one-epoch trials whose best goes on to 3
    # epochs (from scratch), then a bracket of 2 three-epoch trials.
    result = tune(texts, str(tmp_path), tuner="hyperband", max_trials=max_trials, epochs=3,
                  tuner_options={"factor": 3}, **QUIET)
    assert [call["epochs"] for call in fake_train] == epochs
    assert [trial.hyperparameters["epochs"] for trial in result.trials] == epochs
    assert result.best_score == max(_scores(result))
    assert "epochs" in result.best_hyperparameters


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                    reason="bayesian needs scikit-learn")
def test_bayesian_search_follows_its_model(tmp_path, texts, monkeypatch):
    """The same two random trials, then proposals that go where the scores are better.

    A random search draws the same rates whatever the scores (its draws follow the
    seed alone); the Gaussian process proposes higher rates when the score rises with
    the rate than when it falls.
    """
    model = build_classifier_for(texts)
    # A trial builds nothing and trains nothing: its score is a known function of the rate.
    monkeypatch.setattr(tuning, "build_classifier_for", lambda records, **kwargs: model)
    # clear_session's gc.collect costs 0.2 s a trial, and there is no model to free.
    monkeypatch.setattr(tuning.keras.backend, "clear_session", lambda: None)
    starts, proposed = {}, {}
    for direction in (1, -1):  # the score rises, or falls, with log10(learning_rate)
        def train(model, records, run_dir, learning_rate, direction=direction, **kwargs):
            score = direction * float(np.log10(learning_rate))
            return {"val_accuracy": [score], "val_loss": [-score], "epoch": [0], "phase": [1]}

        monkeypatch.setattr(tuning, "train", train)
        result = tune(texts, str(tmp_path / str(direction)), tuner="bayesian", max_trials=3,
                      search_space={"learning_rate": (1e-4, 1e-2)},
                      tuner_options={"num_initial_points": 2}, **QUIET)
        rates = [trial.hyperparameters["learning_rate"] for trial in result.trials]
        assert len(rates) == 3 and result.best_score == max(_scores(result))
        starts[direction], proposed[direction] = rates[:2], rates[2]
    # Both searches started from the same random trials; the model's proposals part ways,
    # each into the half of the (log) range where its scores are better.
    assert starts[1] == starts[-1]
    assert proposed[1] > 1e-3 > proposed[-1], proposed


@pytest.mark.slow
def test_an_interrupted_search_continues(tmp_path, texts, fake_train, monkeypatch):
    run = dict(search_space={"learning_rate": [1e-3, 2e-3, 3e-3]}, **QUIET)
    first = tune(texts, str(tmp_path), max_trials=1, **run)
    interrupted = []

    def interrupt(model, records, run_dir, **kwargs):
        interrupted.append(run_dir)
        raise KeyboardInterrupt  # a kill: KerasTuner lets it through, the trial stays open

    with monkeypatch.context() as patch:
        patch.setattr(tuning, "train", interrupt)
        with pytest.raises(KeyboardInterrupt):
            tune(texts, str(tmp_path), max_trials=2, **run)
    again = tune(texts, str(tmp_path), max_trials=2, **run)
    # Only the interrupted trial ran again, in its own folder (so train resumes it).
    assert [call["run_dir"] for call in fake_train[1:]] == interrupted
    assert len(again.trials) == 2 and again.trials[0] == first.trials[0]
    # Finished: nothing runs; more trials: only the new one runs.
    assert tune(texts, str(tmp_path), max_trials=2, **run) == again and len(fake_train) == 2
    more = tune(texts, str(tmp_path), max_trials=3, **run)
    assert len(fake_train) == 3 and more.trials[:2] == again.trials
    # overwrite starts again.
    tune(texts, str(tmp_path), max_trials=2, overwrite=True, **run)
    assert len(fake_train) == 5


@pytest.mark.bad_input
@pytest.mark.parametrize("change", [{"objective": "val_loss"}, {"tuner": "hyperband"},
                                    {"search_space": {"learning_rate": [1e-3]}}])
def test_continuing_another_search_is_refused(tmp_path, texts, fake_train, change):
    tune(texts, str(tmp_path), max_trials=1, **QUIET)
    with pytest.raises(ValueError, match="holds a search with"):
        tune(texts, str(tmp_path), max_trials=2, **change, **QUIET)
    assert len(fake_train) == 1


def test_failed_trials_are_reported(tmp_path, texts, fake_train, capsys):
    fake_train.crash[1e-3] = FloatingPointError("loss became nan")
    result = tune(texts, str(tmp_path), max_trials=2,
                  search_space={"learning_rate": [1e-3, 2e-3]}, **QUIET)
    scores = {trial.hyperparameters["learning_rate"]: trial.score for trial in result.trials}
    assert scores == {1e-3: None, 2e-3: pytest.approx(0.2)}
    assert result.best_hyperparameters == {"learning_rate": 2e-3}
    assert "failed" in result.table().splitlines()[-1]
    assert "loss became nan" in capsys.readouterr().out


def test_a_search_where_every_trial_fails_raises(tmp_path, texts, fake_train):
    fake_train.crash.update({1e-3: ValueError("bad data"), 2e-3: ValueError("bad data")})
    with pytest.raises(RuntimeError, match="bad data"):
        tune(texts, str(tmp_path), max_trials=2,
             search_space={"learning_rate": [1e-3, 2e-3]}, **QUIET)


# --- the real thing ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("tuner, options", [
    ("random", {}),
    pytest.param("bayesian", {"num_initial_points": 1}, marks=pytest.mark.skipif(
        importlib.util.find_spec("sklearn") is None, reason="bayesian needs scikit-learn")),
    ("hyperband", {"factor": 2}),
])
def test_tune_trains_and_loads_the_best_model(tmp_path, product_records, tuner, options):
    run = dict(tuner=tuner, max_trials=2, tuner_options=options, build_kwargs=SMALL, epochs=2,
               fine_tune_epochs=1, **QUIET)
    result = tune(product_records, str(tmp_path), **run)
    assert len(result.trials) == 2
    space = default_search_space(build_classifier_for(product_records, **SMALL))
    for trial in result.trials:
        values = trial.hyperparameters
        assert set(values) - {"epochs"} == set(space)
        assert 1e-4 <= values["learning_rate"] <= 3e-3
        assert values["fusion"] in FUSIONS
        assert 1 <= values["unfreeze_blocks"] <= 4
        assert 0.0 <= values["dropout"] <= 0.5
        assert os.path.exists(tmp_path / "trials" / trial.trial_id / "model.keras")
    assert result.best_score == max(_scores(result))
    model = result.best_model()
    probabilities = model.predict({"image": np.zeros((3, 16, 16, 3), "float32"),
                                   "text": tf.constant(["a nice wool thing"] * 3)}, verbose=0)
    assert probabilities.shape == (3, 4)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    # Continuing the finished search trains nothing and answers the same.
    stamp = os.path.getmtime(os.path.join(result.best_run_dir, "model.keras"))
    assert tune(product_records, str(tmp_path), **run) == result
    assert os.path.getmtime(os.path.join(result.best_run_dir, "model.keras")) == stamp
