"""Hyperparameter search with KerasTuner, where one trial is a whole two-phase `train` run."""

import collections
import dataclasses
import inspect
import json
import math
import os
import shutil

import keras

from keras_mmtl.checks import check_known
from keras_mmtl.files import save_atomic, write_json
from keras_mmtl.models.backbones import BACKBONE_NAME, backbone_blocks, backbone_network
from keras_mmtl.models.builder import build_classifier, build_classifier_for
from keras_mmtl.models.fusion import FUSIONS
from keras_mmtl.models.spec import describe
from keras_mmtl.progress import keras_verbose, logger
from keras_mmtl.training.run_state import MODEL_FILE
from keras_mmtl.training.trainer import train

try:
    import keras_tuner
except ImportError:  # optional: pip install keras-mmtl[tune]
    keras_tuner = None

# Search algorithm name -> KerasTuner oracle class (in `keras_tuner.oracles`).
TUNERS = {
    "random": "RandomSearchOracle",
    "bayesian": "BayesianOptimizationOracle",
    "hyperband": "HyperbandOracle",
}
# Objective -> direction; both are read from the `train` history, so need a val split.
OBJECTIVES = {"val_accuracy": "max", "val_loss": "min"}

TUNER_DIR = "tuner"  # KerasTuner's project: oracle state and one trial.json per trial
TRIALS_DIR = "trials"  # one `train` run folder per trial
SETTINGS_FILE = "tuning.json"

TrialResult = collections.namedtuple("TrialResult", ["trial_id", "hyperparameters", "score"])
TrialResult.__doc__ = "One trial: its id, the values it trained with, its score (`None`: failed)."


def default_search_space(model, fine_tune=True):
    """The search space `tune` uses by default for a classifier like `model`.

    - `learning_rate` (phase 1): log-uniform in [1e-4, 3e-3];
    - `fusion`: every name in `keras_mmtl.models.FUSIONS`, when the model has
      both an image and a text branch (and there is more than one fusion);
    - `unfreeze_blocks` (phase 2): an integer in [1, 6] (at most the
      backbone's number of blocks), when the model starts with a frozen image
      backbone and `fine_tune` (phase 2 runs);
    - `dropout` (before the softmax): 0.0 to 0.5 in steps of 0.1.

    Args:
        model: a classifier from `build_classifier` / `build_classifier_for`.
        fine_tune: whether the runs have a phase 2 (`fine_tune_epochs > 0`).

    Returns:
        dict of argument name -> spec, in the form `tune(search_space=...)`
        takes: edit it to restrict the search.

    Example:

    >>> from keras_mmtl.models import build_classifier
    >>> model = build_classifier(["a", "b"], image_backbone=None, text_vocabulary=["x"])
    >>> default_search_space(model)
    {'learning_rate': (0.0001, 0.003), 'dropout': (0.0, 0.5, 0.1)}
    """
    space = {"learning_rate": (1e-4, 3e-3)}
    if len(describe(model).modalities) > 1 and len(FUSIONS) > 1:
        space["fusion"] = sorted(FUSIONS)
    layers = {layer.name: layer for layer in model.layers}
    if fine_tune and BACKBONE_NAME in layers and not layers[BACKBONE_NAME].trainable:
        space["unfreeze_blocks"] = (1, min(6, len(backbone_blocks(backbone_network(model)))))
    space["dropout"] = (0.0, 0.5, 0.1)
    return space


@dataclasses.dataclass
class TuningResult:
    """What a search found.

    Attributes:
        objective: the objective name, e.g. `"val_accuracy"`.
        best_hyperparameters: the best trial's values of the searched
            arguments, named as `train` / `build_classifier` name them (and,
            with hyperband, the `epochs` the trial trained for).
        best_score: the best trial's score.
        best_run_dir: the best trial's `train` folder; its `model.keras` is
            the model `best_model()` loads.
        trials: `TrialResult`s in the order they ran; failed ones score `None`.
    """

    objective: str
    best_hyperparameters: dict
    best_score: float
    best_run_dir: str
    trials: list

    def best_model(self):
        """Loads the best trial's trained model (its `model.keras`)."""
        return _load_run_model(self.best_run_dir)

    def table(self):
        """The trials as a text table, best first (failed ones last).

        Example:

        >>> result = TuningResult("val_accuracy", {"dropout": 0.1}, 0.9, "runs/t/trials/1",
        ...                       [TrialResult("0", {"dropout": 0.3}, 0.5),
        ...                        TrialResult("1", {"dropout": 0.1}, 0.9)])
        >>> print(result.table())
        trial  dropout  val_accuracy
        1      0.1      0.9
        0      0.3      0.5
        """
        sign = -1 if OBJECTIVES.get(self.objective) == "max" else 1
        trials = sorted(self.trials, key=lambda t: (t.score is None, sign * (t.score or 0)))
        names = list(dict.fromkeys(name for t in trials for name in t.hyperparameters))
        rows = [["trial", *names, self.objective]] + [
            [t.trial_id, *(_format(t.hyperparameters.get(name, "")) for name in names),
             "failed" if t.score is None else _format(t.score)] for t in trials]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                         for row in rows)


class TrainTuner(keras_tuner.Tuner if keras_tuner else object):
    """A KerasTuner `Tuner` whose trial is a whole two-phase `train` run.

    Each trial builds a classifier with `build_classifier_for` and trains it
    with `keras_mmtl.training.train` in `<directory>/trials/<trial id>`,
    which keeps that trial's `model.keras`; its score is the best value of
    the objective over the epochs of both phases. With a `HyperbandOracle`,
    the trial's `tuner/epochs` is phase 1's `epochs`, and every trial trains
    from scratch (`tuner/initial_epoch` is ignored: `train` does not
    continue another trial's model).

    `tune` is the usual way in; the class is here for callers that want
    KerasTuner's own API (`search`, `get_best_models`, `results_summary`).

    Args:
        oracle: a KerasTuner oracle.
        search_space: function `hp -> dict` of argument name -> value; names
            that `build_classifier` takes go to the model, others to `train`.
        build_kwargs: more `build_classifier_for` arguments.
        seed: seed of weight initialisation and of each `train` run.
        **kwargs: `keras_tuner.Tuner` arguments (`directory`,
            `project_name`, `overwrite`).

    Example:

    >>> tuner = TrainTuner(keras_tuner.oracles.RandomSearchOracle(
    ...     keras_tuner.Objective("val_accuracy", "max"), max_trials=4),
    ...     lambda hp: {"dropout": hp.Float("dropout", 0.0, 0.5)},
    ...     directory="runs/search", project_name="tuner")  # doctest: +SKIP
    >>> tuner.search(records, epochs=5)  # doctest: +SKIP
    >>> model = tuner.get_best_models()[0]  # doctest: +SKIP
    """

    def __init__(self, oracle, search_space, *, build_kwargs=None, seed=0, **kwargs):
        super().__init__(oracle, **kwargs)
        self.search_space = search_space
        self.build_kwargs = dict(build_kwargs or {})
        self.seed = seed

    def run_trial(self, trial, records, **train_kwargs):
        """Builds and trains one model; returns the trial's objective value."""
        values = self.search_space(trial.hyperparameters)
        build, fit = _split_arguments(values)
        epochs = trial.hyperparameters.values.get("tuner/epochs")
        if epochs is not None:
            fit["epochs"] = epochs
        keras.backend.clear_session()  # frees the last trial's model, as KerasTuner does
        keras.utils.set_random_seed(self.seed)
        model = build_classifier_for(records, **self.build_kwargs, **build)
        # A trial's Projector embeddings would only slow the search.
        history = train(model, records, self.trial_run_dir(trial.trial_id), seed=self.seed,
                        **{**train_kwargs, **fit, "projector": False})
        return _score(history, self.oracle.objective, model)

    def trial_run_dir(self, trial_id):
        """The `train` folder of a trial."""
        return os.path.join(str(self.directory), TRIALS_DIR, str(trial_id))

    def save_model(self, trial_id, model, step=0):
        """Saves `model` as the trial's `model.keras` (`train` already does)."""
        save_atomic(model.save, os.path.join(self.trial_run_dir(trial_id), MODEL_FILE))

    def load_model(self, trial):
        """Loads the model a trial trained (its `model.keras`)."""
        return _load_run_model(self.trial_run_dir(trial.trial_id))


def tune(
    records,
    run_dir,
    *,
    tuner="random",
    max_trials=None,
    objective="val_accuracy",
    search_space=None,
    build_kwargs=None,
    tuner_options=None,
    overwrite=False,
    seed=0,
    verbose="auto",
    **train_kwargs,
):
    """Searches hyperparameters of the whole two-phase training with KerasTuner.

    Every trial builds a fresh classifier (`build_classifier_for(records,
    **build_kwargs, ...)`) and trains it with `train(model, records,
    run_dir/trials/<trial id>, **train_kwargs, ...)`, with the trial's values
    of the searched arguments; its score is the best `objective` over its
    epochs, measured on the val split. Trials share one feature cache
    (`run_dir/cache`, unless `cache_dir` is given): a frozen backbone's
    features are computed once for the whole search.

    The default search space is `default_search_space`'s: `learning_rate`
    (log-uniform, 1e-4 to 3e-3), `fusion` (image + text models),
    `unfreeze_blocks` (1 to 6, models with a frozen image backbone and a
    phase 2) and `dropout` (0 to 0.5, step 0.1), less any argument you fix
    in `train_kwargs` or `build_kwargs`. `search_space` replaces it; it is
    either a dict of argument name -> one of

    - a list: the values to choose from, e.g. `["concat"]`;
    - `(low, high)`: a range, integers if both are, sampled log-uniformly
      for learning rates (names ending in `learning_rate`);
    - `(low, high, step)`: a range with a step;

    or a function `hp -> dict` of argument name -> value that declares its
    own KerasTuner hyperparameters (`hp.Float(...)`, `hp.Choice(...)`).
    Any argument of `build_classifier` or `train` can be searched.

    KerasTuner's state lives in `run_dir/tuner`: calling `tune` again with
    the same `run_dir` continues an interrupted search (finished trials are
    kept, an interrupted one resumes its `train` run) unless `overwrite`.

    Args:
        records: `keras_mmtl.data.Records` with train and val splits.
        run_dir: folder of the search.
        tuner: search algorithm, a key of `TUNERS`: `"random"`,
            `"bayesian"` (Gaussian-process Bayesian optimisation; needs
            scikit-learn, `pip install keras-tuner[bayesian]`) or
            `"hyperband"` (runs many short trials and trains the best ones
            longer: the trial's budget is phase 1's `epochs`, at most the
            `epochs` you pass; each trial trains from scratch).
        max_trials: trials to run at most; default 10, and for hyperband
            its whole schedule (which `tuner_options` `max_epochs`, `factor`
            and `hyperband_iterations` set).
        objective: a key of `OBJECTIVES`: `"val_accuracy"` (maximised; of
            the main task, for a multi-task model) or `"val_loss"`
            (minimised; the weighted sum over the tasks).
        search_space: `None` (the default space), a dict or a function; see
            above.
        build_kwargs: more `build_classifier_for` arguments, the same in
            every trial (e.g. `image_backbone`).
        tuner_options: more arguments of the KerasTuner oracle, e.g.
            `{"factor": 2}` for hyperband, `{"num_initial_points": 3}` for
            bayesian.
        overwrite: start again, deleting an earlier search in `run_dir`.
        seed: seed of the search algorithm, and of every trial's weight
            initialisation and shuffling.
        verbose: progress output, of the search and of Keras
            (`"auto"`, 0, 1, 2).
        **train_kwargs: more `train` arguments, the same in every trial
            (e.g. `epochs`, `fine_tune_epochs`, `batch_size`).

    Returns:
        a `TuningResult`: best hyperparameters and score, every trial,
        `best_model()`.

    Raises:
        ValueError: an unknown tuner, objective or searched name; records
            without a val split; or a `run_dir` holding another search
            (another tuner, objective or search space).
        RuntimeError: no trial finished (the message names the last error).

    Example:

    >>> result = tune(records, "runs/search", max_trials=8, epochs=5)  # doctest: +SKIP
    >>> print(result.table())  # doctest: +SKIP
    >>> model = result.best_model()  # doctest: +SKIP
    >>> result = tune(records, "runs/search2", tuner="hyperband", epochs=9,
    ...               search_space={"learning_rate": (1e-4, 1e-2), "dropout": [0.1, 0.3]},
    ...               tuner_options={"factor": 3})  # doctest: +SKIP
    """
    if tuner not in TUNERS:
        raise ValueError(f"Unknown tuner {tuner!r}. Expected one of {sorted(TUNERS)}. "
                         f"Received: tuner={tuner!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"Unknown objective {objective!r}. Expected one of "
                         f"{sorted(OBJECTIVES)}. Received: objective={objective!r}")
    if keras_tuner is None:
        raise ImportError("tune() needs KerasTuner: pip install keras-mmtl[tune]")
    if not (records.splits == "val").any():
        raise ValueError(
            f"tune() scores each trial by {objective} on the val split, and the records have "
            "no val rows. Give them one: a 'val' split column, or val_fraction > 0 in "
            "read_manifest / from_arrays.")
    build_kwargs = dict(build_kwargs or {})
    _check_names(build_kwargs, _BUILD_ARGUMENTS, "build_kwargs", "build_classifier_for")
    _check_names(train_kwargs, _TRAIN_ARGUMENTS, "train arguments", "train")
    hyperband = tuner == "hyperband"
    if search_space is None:
        probe = build_classifier_for(records, **build_kwargs)
        fine_tune = train_kwargs.get("fine_tune_epochs", _train_default("fine_tune_epochs")) > 0
        search_space = {name: spec for name, spec in default_search_space(probe, fine_tune).items()
                        if name not in {*build_kwargs, *train_kwargs}}
        del probe
    space = _space_function(search_space)
    declared = keras_tuner.HyperParameters()
    names = space(declared)
    _check_searched(names, build_kwargs, train_kwargs, hyperband)

    settings = {"tuner": tuner, "objective": objective,
                "search_space": None if callable(search_space) else repr(search_space)}
    fresh = _start(run_dir, settings, overwrite)
    options = dict(tuner_options or {})
    if hyperband:
        options.setdefault("max_epochs",
                           train_kwargs.get("epochs", _train_default("epochs")))
    else:
        options.setdefault("max_trials", max_trials or 10)
    # KerasTuner takes seed=0 for "no seed", hence the + 1.
    oracle = getattr(keras_tuner.oracles, TUNERS[tuner])(
        objective=keras_tuner.Objective(objective, OBJECTIVES[objective]),
        hyperparameters=declared, seed=seed + 1, **options)
    if hyperband and max_trials:
        oracle.max_trials = max_trials  # hyperband stops early, as the others do
    search = TrainTuner(oracle, space, build_kwargs=build_kwargs, seed=seed,
                        directory=run_dir, project_name=TUNER_DIR, overwrite=fresh)
    train_kwargs.setdefault("cache_dir", os.path.join(run_dir, "cache"))
    search.search(records, verbose=keras_verbose(verbose), **train_kwargs)
    return _result(search, space, objective)


def _result(search, space, objective):
    """The `TuningResult` of a finished search."""
    trials, best, failed = [], None, []
    for trial_id in sorted(search.oracle.trials, key=int):
        trial = search.oracle.trials[trial_id]
        if trial.status not in ("COMPLETED", "FAILED", "INVALID"):
            continue  # interrupted, and not run again: nothing to report
        values = space(trial.hyperparameters)
        if "tuner/epochs" in trial.hyperparameters.values:
            values["epochs"] = trial.hyperparameters.values["tuner/epochs"]
        score = float(trial.score) if trial.status == "COMPLETED" else None
        trials.append(TrialResult(trial_id, values, score))
        if score is None:
            failed.append(trial)
        elif best is None or (score > best.score if OBJECTIVES[objective] == "max"
                              else score < best.score):
            best = trials[-1]
    if failed:
        logger.warning(f"{len(failed)} of {len(trials)} trials failed; the last error:\n"
                       f"{_last_line(failed[-1].message)}")
    if best is None:
        raise RuntimeError(
            f"No trial of the search in {search.directory} finished. The last error:\n"
            f"{failed[-1].message if failed else 'none recorded'}")
    return TuningResult(objective, best.hyperparameters, best.score,
                        search.trial_run_dir(best.trial_id), trials)


def _start(run_dir, settings, overwrite):
    """Prepares `run_dir`; returns whether the search starts afresh.

    A new search (no KerasTuner state, or `overwrite`) clears stale trial
    folders, so `train` never resumes a run of another search. A search
    continued with another tuner, objective or search space is refused.
    """
    path = os.path.join(run_dir, SETTINGS_FILE)
    # KerasTuner reloads a project when it finds its tuner file (written after each trial).
    tuner_file = f"{os.environ.get('KERASTUNER_TUNER_ID', 'tuner0')}.json"
    fresh = overwrite or not os.path.exists(os.path.join(run_dir, TUNER_DIR, tuner_file))
    if not fresh and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            before = json.load(f)
        if before != settings:
            raise ValueError(
                f"{run_dir} holds a search with {before}; this one has {settings}. Pass "
                "overwrite=True to replace it, or another run_dir.")
    if fresh:
        for name in (TUNER_DIR, TRIALS_DIR):
            shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
    os.makedirs(run_dir, exist_ok=True)

    write_json(path, settings)
    return fresh


def _space_function(search_space):
    """`search_space` (dict or function) as a function `hp -> dict of values`."""
    if callable(search_space):
        return search_space
    if not isinstance(search_space, dict):
        raise ValueError("search_space must be None, a dict of argument name -> spec, or a "
                         f"function hp -> dict. Received: search_space={search_space!r}")
    for name, spec in search_space.items():
        _declare(keras_tuner.HyperParameters(), name, spec)  # errors now, not mid-search

    def space(hp):
        return {name: _declare(hp, name, spec) for name, spec in search_space.items()}
    return space


def _declare(hp, name, spec):
    """Declares one searched argument on `hp`; returns its value."""
    if isinstance(spec, list) and spec:
        if all(_is_number(value) for value in spec) and any(isinstance(v, float) for v in spec):
            spec = [float(value) for value in spec]  # a Choice holds one type
        return hp.Choice(name, spec)
    if isinstance(spec, tuple) and len(spec) in (2, 3) and all(map(_is_number, spec)):
        low, high, *step = spec
        if low > high:
            raise ValueError(f"search_space[{name!r}]: low > high. Received: {spec!r}")
        if all(isinstance(value, int) for value in spec):
            return hp.Int(name, low, high, step=step[0] if step else None)
        if step:  # 0.1 * 3 is 0.30000000000000004: keep the digits of the step
            return round(hp.Float(name, low, high, step=step[0]), 12)
        return hp.Float(name, low, high,
                        sampling="log" if name.endswith("learning_rate") else "linear")
    raise ValueError(
        f"search_space[{name!r}] must be a non-empty list of values to choose from, or a "
        f"(low, high) or (low, high, step) range of numbers. Received: {spec!r}")


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parameters(function, leave_out):
    return [name for name in inspect.signature(function).parameters if name not in leave_out]


_BUILD_ARGUMENTS = (_parameters(build_classifier, {"class_names"})
                    + _parameters(build_classifier_for, {"records", "kwargs"}))
_TRAIN_ARGUMENTS = _parameters(train, {"model", "records", "run_dir", "seed", "verbose"})


def _train_default(name, parameters=inspect.signature(train).parameters):
    return parameters[name].default


def _split_arguments(values):
    """Searched values as `(build_classifier_for arguments, train arguments)`."""
    build = {name: value for name, value in values.items() if name in _BUILD_ARGUMENTS}
    return build, {name: value for name, value in values.items() if name not in build}


def _check_names(kwargs, allowed, what, function):
    check_known(kwargs, allowed, lambda unknown: (
        f"Unknown {what} {unknown}: {function}() takes {sorted(allowed)}."), TypeError)


def _check_searched(names, build_kwargs, train_kwargs, hyperband):
    if not isinstance(names, dict) or not names:
        raise ValueError("The search space is empty (or its function returned no dict of "
                         f"argument name -> value): nothing to search. Received: {names!r}")
    searchable = sorted({*_BUILD_ARGUMENTS, *_TRAIN_ARGUMENTS})
    check_known(names, searchable, lambda unknown: (
        f"Cannot search {unknown}: neither build_classifier nor train takes them. "
        f"Searchable: {searchable}"))
    fixed = sorted(set(names) & {*build_kwargs, *train_kwargs})
    if fixed:
        raise ValueError(f"{fixed} are both searched and fixed (passed as arguments): "
                         "leave them out of one or the other.")
    if hyperband and "epochs" in names:
        raise ValueError("The hyperband tuner chooses `epochs` itself (up to the `epochs` "
                         "argument): leave it out of search_space.")


def _score(history, objective, model):
    """The best value of the objective over the epochs of a `train` history.

    A model with several outputs logs each task's accuracy under its name:
    its `val_accuracy` is the first (main) task's.
    """
    spec = describe(model)
    name = objective.name
    if spec.multi_output and name == "val_accuracy":
        name = f"val_{next(iter(spec.tasks))}_accuracy"
    values = [value for value in history.get(name, []) if math.isfinite(value)]
    if not values:
        raise ValueError(f"The run recorded no finite {name}: {history!r}")
    return float(max(values) if objective.direction == "max" else min(values))


def _load_run_model(run_dir):
    path = os.path.join(run_dir, MODEL_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No trained model at {path}: the trial did not finish.")
    return keras.saving.load_model(path)  # keras_mmtl's layers are registered on import


def _format(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _last_line(message):
    lines = [line for line in (message or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


__all__ = ["OBJECTIVES", "TUNERS", "TrainTuner", "TrialResult", "TuningResult",
           "default_search_space", "tune"]
