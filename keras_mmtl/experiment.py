"""The main job: a `RunConfig` -> data, model, training, test report and a served SavedModel."""

import dataclasses
import os
import time
import warnings

import keras

from keras_mmtl.calibration import calibrate, set_temperature
from keras_mmtl.config import CONFIG_FILE, SECTIONS, ConfigError, RunConfig, TrainingConfig
from keras_mmtl.evaluation import evaluate, modality_report
from keras_mmtl.export import export_saved_model
from keras_mmtl.files import save_atomic
from keras_mmtl.modalities import modality_kind
from keras_mmtl.models import (
    build_classifier_for,
    clone_classifier,
    describe,
    ensemble,
    learn_text_vocabulary,
    mirror_averaged,
)
from keras_mmtl.presets import (
    DEFAULT_PRESET,
    alone_arguments,
    choose_preset,
    get_preset,
    parse_duration,
    preset_arguments,
)
from keras_mmtl.progress import logger
from keras_mmtl.training import (
    cache_frozen_features,
    distribution_strategy,
    refit,
    setup_precision,
    train,
    transfer,
    tune,
)
from keras_mmtl.training.distribute import is_chief, is_multi_worker
from keras_mmtl.training.run_state import MODEL_FILE, check_run_folder, fingerprint

# Of a run's time limit, the share kept for calibration, evaluation and export.
EVALUATION_SHARE = 0.15


@dataclasses.dataclass
class ExperimentResult:
    """What `run_experiment` made: the trained model, its test report and where things are."""

    model: object
    report: object  # None on workers other than the chief; a dict by task for several tasks
    run_dir: str
    history: dict = None  # per-epoch metrics of `train` (the first member's of an ensemble;
    # none for domain transfer)
    modalities: object = None  # ModalityReport of a multimodal model
    export_path: str = None


def run_experiment(config, *, overwrite=False, verbose="auto"):
    """Trains, evaluates and exports the classifier a `RunConfig` describes.

    The steps of `keras-mmtl train`: set up precision and distribution, read
    and check the manifest, apply the quality preset (`resolve_preset`),
    build the classifier in the strategy's scope, train it (with
    `training.ensemble` > 1, that many with consecutive seeds, in
    `<run_dir>/member<k>` sharing one feature cache, averaged into one model;
    with `training.modality_experts`, also a model on each image input
    alone, in `<run_dir>/member<k>-<input>`, all served as their
    geometric mean; with `training.time_limit`, each in its share of the
    budget) or transfer
    it from `transfer.source_manifest`, fit temperature
    scaling on the val split (`training.calibrate`; the saved model is
    updated), evaluate it on the test split (report in `<run_dir>/eval`) and
    export it. The complete
    config is written to `<run_dir>/config.yaml` first, so the run can be
    reproduced from it, and an interrupted run resumes when called again.

    The run folder keeps a fingerprint of the settings that shape the model
    and of the data (`<run_dir>/fingerprint.json`, see
    `keras_mmtl.training.run_state`). Called again with the same ones, an
    interrupted run resumes and a finished one is reused; with others, it
    stops before any work (`StaleRunError`, saying what changed) unless
    `overwrite`, so a model is never exported for settings that did not
    train it.

    Args:
        config: a `RunConfig`, a dict of its sections, or a YAML/JSON file.
        overwrite: clear the training state of a run found in the run
            folder and train again (its feature cache is kept).
        verbose: Keras progress output (`"auto"`, 0, 1, 2).

    Returns:
        an `ExperimentResult`.

    Example:

    >>> result = run_experiment("runs/products/config.yaml")  # doctest: +SKIP
    >>> print(result.report.summary())  # doctest: +SKIP
    """
    config = _as_config(config)
    data, options, fit, moved = config.data, config.model, config.training, config.transfer
    if not data.manifest:
        raise ConfigError("No manifest: set data.manifest (--manifest).")
    if (moved.joint or moved.domain_adversarial) and not moved.source_manifest:
        raise ConfigError("transfer.joint and transfer.domain_adversarial (--joint, "
                          "--domain-adversarial) need transfer.source_manifest "
                          "(--source-manifest).")
    # Precision first (GPU memory growth), then the strategy: a multi-worker
    # strategy must exist before TensorFlow runs anything else.
    started = time.monotonic()
    setup_precision(fit.precision)
    strategy = distribution_strategy(fit.strategy)
    run_dir = config.output_dir
    # Rows read and checked, images not decoded yet: enough to know the run before any work.
    datasets = {"data.manifest": _read_quickly(config, data.manifest)}
    if moved.source_manifest:
        datasets["transfer.source_manifest"] = _read_quickly(config, moved.source_manifest)
    quick = datasets["data.manifest"]
    config, why = resolve_preset(config, int((quick.splits != "test").sum()),
                                 kinds={modality_kind(name) for name in quick.modalities})
    config = _prepared_image_size(config, quick)
    options, fit = config.model, config.training
    if fit.ensemble > 1 and moved.source_manifest:
        raise ConfigError("training.ensemble (--ensemble) trains several models on one "
                          "dataset; it does not combine with transfer.source_manifest.")
    if is_chief():  # the chief owns the run folder
        check_run_folder(run_dir, run_fingerprint(config, datasets), overwrite)
    records = data.read()
    config.save(os.path.join(run_dir, CONFIG_FILE))
    classes = ", ".join(f"{len(names)} {task} classes" for task, names in records.tasks.items())
    logger.info(f"{len(records)} rows, {classes}, inputs {list(records.modalities)}; "
                f"run folder {run_dir}")
    if records.report.duplicates:
        logger.warning(records.report.overlap())
    logger.info(f"Preset {fit.preset!r} ({why}): {get_preset(fit.preset).description}.")
    source = data.read(moved.source_manifest) if moved.source_manifest else None
    build = build_arguments(config)
    kwargs = train_arguments(config, verbose=verbose)
    budget = fit.time_limit and parse_duration(fit.time_limit)
    members = _members(config, records, source)
    models, history = [], None
    for number, (seed, modalities) in enumerate(members, 1):
        if source is None:
            model = _build_member(records, build, seed, modalities, strategy)
        else:
            keras.utils.set_random_seed(seed)  # weight initialisation too, not only training
            with strategy.scope():
                vocabulary = None
                if "text" in source.modalities:  # one vocabulary for source and target texts
                    vocabulary = learn_text_vocabulary([source, records], options.text_encoder,
                                                       options.text_tokenizer)
                model = build_classifier_for(source, text_vocabulary=vocabulary, **build)
        if budget and source is None:  # left, shared by the members to train, less evaluation
            if number == 1 and len(members) > 1 and kwargs["cache_features"] and not (
                    is_multi_worker(strategy)):
                # The members read one cache of frozen features: computed first, so that
                # every member's share of the time goes to training.
                with strategy.scope():
                    cache_frozen_features(model, records, os.path.join(run_dir, "cache"), **{
                        key: kwargs[key] for key in (
                            "fine_tune_epochs", "unfreeze_blocks", "unfreeze_text_layers",
                            "augment_images", "augment_text")})
            kwargs["time_limit"] = _time_share(budget, started, len(members) - number + 1)
        if source is None:
            folder, arguments = _member_run(config, run_dir, kwargs, seed, modalities, members)
            if len(members) > 1:
                logger.info(f"Ensemble member {number}/{len(members)} (seed {seed}, "
                            f"{_what(fit, modalities)}):")
            trained = train(model, records, folder, **arguments)
            history = history or trained
        else:
            model = transfer(model, source, records, run_dir, joint=moved.joint,
                             alpha=moved.alpha, domain_adversarial=moved.domain_adversarial,
                             freeze=tuple(moved.freeze), **kwargs)
        models.append(model)
    model = _served(models, members, fit)
    # Where the served model is saved: the target's folder after in-turn transfer.
    model_path = os.path.join(run_dir, "target" if moved.source_manifest and not moved.joint
                              else "", MODEL_FILE)
    if model is not models[0]:  # an ensemble, or mirror-averaged
        save_atomic(model.save, model_path)
    again = _refits(config, records, source, strategy, started, budget)
    if is_multi_worker(strategy) and not is_chief():
        if again:
            model = _refit_members(records, build, kwargs, members, strategy, config, budget,
                                   started)
        return ExperimentResult(model, None, run_dir, history)  # the chief evaluates
    if is_multi_worker(strategy):
        # Evaluated on one device: predict under the strategy sees this worker's share only.
        model = clone_classifier(model)
    eval_dir = os.path.join(run_dir, "eval")
    calibration = None
    if fit.calibrate and (records.splits == "val").any():
        # Fitted on the models that did not train on val, also where they are refit after.
        calibration = calibrate(model, records, "val")
        for task, one in (calibration.items() if isinstance(calibration, dict)
                          else [(None, calibration)]):
            logger.info(f"Temperature scaling{'' if task is None else f' of {task}'}: "
                        f"T={one.temperature:.3f}, val ECE {one.ece_before:.4f} -> "
                        f"{one.ece_after:.4f}")
        save_atomic(model.save, model_path)
    if again:
        model = _refit_members(records, build, kwargs, members, strategy, config, budget,
                               started)
        if is_multi_worker(strategy):
            model = clone_classifier(model)
        if calibration is not None:
            set_temperature(model, calibration)
        save_atomic(model.save, model_path)
    scoring = time.monotonic()
    result = ExperimentResult(model, evaluate(model, records, "test", out_dir=eval_dir), run_dir,
                              history)
    modalities = describe(model).modalities
    if len(modalities) > 1:
        # One more pass over the test split per modality, each about as long as the first.
        needed = len(modalities) * (time.monotonic() - scoring)
        left = budget and budget - (time.monotonic() - started)
        if budget and needed > left:
            logger.info(f"Modality report left out: its {len(modalities)} passes over the test "
                        f"split (about {needed:.0f} s) would end past the time limit "
                        f"({fit.time_limit}, {max(left, 0):.0f} s left). `keras-mmtl evaluate "
                        f"--model {model_path} --config "
                        f"{os.path.join(run_dir, CONFIG_FILE)}` writes it.")
        else:
            result.modalities = modality_report(model, records, "test", out_dir=eval_dir,
                                                scored=result.report)
    if config.output.export:
        result.export_path = export_saved_model(
            model, config.output.export_dir or os.path.join("saved_models", config.name),
            max_megapixels=data.max_megapixels)
    return result


def _time_share(budget, started, models):
    """Seconds for the next of `models` left to train: an equal share of the training time left."""
    left = budget * (1 - EVALUATION_SHARE) - (time.monotonic() - started)
    return max(left / models, 1.0)


def _build_member(records, build, seed, modalities, strategy):
    """A member's classifier, built from its seed (the same starting weights each time)."""
    keras.utils.set_random_seed(seed)  # weight initialisation too, not only training
    with strategy.scope():
        # An expert has one input: nothing to fuse, no per-modality heads.
        return build_classifier_for(records, modalities=modalities, **(
            {**build, "auxiliary_heads": False} if modalities else build))


def _member_run(config, run_dir, kwargs, seed, modalities, members):
    """`(run folder, train arguments)` of one member of a run without transfer.

    One member trains in the run folder; several in `member<k>[-<input>]`,
    sharing the run's cache of frozen features, each with its seed and an
    expert with the preset's settings for its modality alone.
    """
    if len(members) == 1:
        return run_dir, kwargs
    folder = f"member{seed - config.data.seed + 1}" + (f"-{modalities[0]}" if modalities else "")
    return os.path.join(run_dir, folder), {
        **kwargs, **_alone_arguments(config.training, modalities), "seed": seed,
        "cache_dir": os.path.join(run_dir, "cache")}


def _what(fit, modalities):
    """A member's inputs and the settings it takes for them alone, as the log names them."""
    return (f"{modalities[0]} only" if modalities else "all inputs") + "".join(
        f", {key}={value}" for key, value in _alone_arguments(fit, modalities).items())


def _served(models, members, fit):
    """The served model: the members combined (experts by a geometric mean), mirrored if asked."""
    model = models[0]
    if len(models) > 1:
        # Experts on one modality each: their product with the fused models (a geometric mean).
        combine = "geometric" if any(modalities for _, modalities in members) else "mean"
        model = ensemble(models, name=f"{models[0].name}_ensemble", combine=combine)
    if fit.test_time_mirror and _mirrorable(model):
        logger.info("Test-time augmentation: the model averages each image's answer with its "
                    "mirror image's.")
        model = mirror_averaged(model)
    elif fit.test_time_mirror:
        logger.warning("Test-time mirroring takes a model of one task with an image input; "
                       "this one is served as trained.")
    return model


def _refits(config, records, source, strategy, started, budget):
    """Whether the members are refit on the train and val rows (`training.refit`), and why not."""
    if not config.training.refit:
        return False
    why = None
    if not (records.splits == "val").any():
        why = "the data has no val split to choose the epochs on"
    elif source is not None:
        why = "a transfer run trains on two datasets"
    elif records.prepared is not None:
        why = "prepared data is read one split at a time; train from the manifest to refit"
    elif budget and is_multi_worker(strategy):
        why = "with a time limit, workers could disagree on whether there is time for it"
    elif budget:  # the run so far again, for the train and val rows in place of train's
        took = time.monotonic() - started
        needed = took * (records.splits != "test").sum() / (records.splits == "train").sum()
        left = budget * (1 - EVALUATION_SHARE) - took
        if needed > left:
            why = (f"it would take about {needed:.0f} s and the time limit leaves {left:.0f} s "
                   f"({config.training.time_limit})")
    if why:
        logger.info(f"Refit on the train and val rows left out: {why}.")
    return why is None


def _refit_members(records, build, kwargs, members, strategy, config, budget, started):
    """Each member trained again on the train and val rows (`refit`), combined as served."""
    run_dir, models = config.output_dir, []
    for number, (seed, modalities) in enumerate(members, 1):
        model = _build_member(records, build, seed, modalities, strategy)
        folder, arguments = _member_run(config, run_dir, kwargs, seed, modalities, members)
        if budget:
            arguments = {**arguments, "time_limit": _time_share(budget, started,
                                                                len(members) - number + 1)}
        logger.info(f"Refit {number}/{len(members)} (seed {seed}, "
                    f"{_what(config.training, modalities)}):")
        refit(model, records, folder, **{"cache_dir": os.path.join(run_dir, "cache"),
                                         **arguments})
        models.append(model)
    return _served(models, members, config.training)


def _members(config, records, source):
    """`(seed, modalities)` of each model a run trains: `None` for all the inputs.

    `training.ensemble` models on all inputs with consecutive seeds; with
    `training.modality_experts`, also one model per image input with each of
    those seeds, where the model also reads another image or a text
    (classifiers of one task whose inputs are never missing: the experts
    could not answer for a missing input). Text experts are not trained:
    on four selection cuts of the fashion task they moved the served
    ensemble by 0.0 points on average (-0.3 to +0.2), at a minute or more
    of training each (`benchmarks/RESULTS.md`, 2026-12-03 22:10).
    """
    fit, seeds = config.training, [config.data.seed + k for k in range(config.training.ensemble)]
    members = [(seed, None) for seed in seeds]
    if not fit.modality_experts or source is not None:
        return members
    inputs = [name for name in records.modalities if modality_kind(name) in ("image", "text")]
    missing = config.model.missing_modalities or config.data.allow_missing or (
        config.model.modality_dropout > 0)
    if len(inputs) < 2 or len(records.tasks) > 1 or missing:
        if len(inputs) >= 2:
            logger.info("Modality experts are left out: they serve a model of one task whose "
                        "inputs are never missing.")
        return members
    return members + [(seed, (name,)) for seed in seeds for name in inputs
                      if modality_kind(name) == "image"]


def run_fingerprint(config, datasets):
    """The fingerprint of a run (`run_state.fingerprint`), with its image experts' settings.

    An image expert trains with settings that the config does not hold: the
    preset's for models of images alone (`_alone_arguments`). They are
    fingerprinted too, so that a run folder trained with other ones (by an
    earlier version of the preset) stops before any work, as another config
    does, and no stale expert is reused.

    Args:
        config: the `RunConfig`, its preset resolved.
        datasets: dict of name (`"data.manifest"`...) -> `Records`.
    """
    found = fingerprint(config.to_dict(), datasets)
    if config.training.modality_experts:
        found["config"]["training.image_expert"] = _alone_arguments(config.training, ("image",))
    return found


def _alone_arguments(fit, modalities):
    """The preset's settings for a member on `modalities` alone that `fit` leaves at their defaults.

    An image expert of a fused run takes the preset's settings for models of
    images alone, less those for image-only runs (see `alone_arguments`);
    settings given explicitly apply to every member.
    """
    kinds = {modality_kind(name) for name in modalities or ()}
    defaults = TrainingConfig()
    return {key: value for key, value in alone_arguments(fit.preset, kinds, expert=True).items()
            if getattr(fit, key) == getattr(defaults, key)}


def _mirrorable(model):
    """Whether `mirror_averaged` applies: one task, and an image input."""
    spec = describe(model)
    return len(spec.tasks) == 1 and any(modality_kind(name) == "image" for name in spec.modalities)


def resolve_preset(config, rows, kinds=()):
    """The config with its preset's settings, and why that preset.

    The preset (`training.preset`; `"auto"` is the default preset, or with
    `training.time_limit` the best one that fits, see `choose_preset`) sets
    the keys that the config does not set explicitly (`RunConfig.given`: keys
    of its file or dict, flags given) and leaves at their defaults (the
    medium preset's values). The returned config names the preset it used,
    so running it again gives the same settings.

    Args:
        config: a `RunConfig`.
        rows: the rows that train and validate (for the time estimate).
        kinds: the kinds of the data's inputs (`"image"`, `"text"`,
            `"tabular"`): images alone take the preset's `image_only` and
            `image_run` settings, and inputs of one kind are not refit.

    Returns:
        `(config, a phrase saying why this preset)`.

    Example:

    >>> config, why = resolve_preset(RunConfig(), rows=10_000)
    >>> config.training.preset, config.model.text_encoder, why
    ('medium', 'ngrams', 'the default')
    """
    fit = config.training
    name, why = fit.preset, "chosen"
    if name == "auto" and fit.time_limit:
        name, why = choose_preset(fit.time_limit, rows)
    elif name == "auto":
        name, why = DEFAULT_PRESET, "the default"
    def unset(section, key):
        default = getattr(SECTIONS[section](), key)
        return (f"{section}.{key}" not in config.given
                and getattr(getattr(config, section), key) == default)

    changes = {}
    for section in ("model", "training"):
        changes[section] = {key: value for key, value in
                            preset_arguments(name, section, kinds).items()
                            if unset(section, key)}
    alone = {key: value for key, value in changes["training"].items()
             if key in alone_arguments(name, kinds)}
    if alone:
        why += "; for a run of images alone, also " + ", ".join(
            f"{key}={value}" for key, value in alone.items())
    for key in ("ensemble", "modality_experts", "refit"):  # run-level settings, not train's
        if unset("training", key):
            changes["training"][key] = getattr(get_preset(name), key)
    if unset("training", "refit") and len(set(kinds)) == 1 and get_preset(name).refit:
        # Measured for a model of images and texts (and its image expert); for models of one
        # kind of input alone it moved macro-F1 by -0.1 (text) and +0.2 (image): not for them.
        changes["training"]["refit"] = False
        why += "; inputs of one kind are not refit"
    resolved = config.replace(explicit=False, **changes)
    return resolved.replace(training={"preset": name}), why


def build_arguments(config):
    """The `build_classifier_for` arguments a config gives."""
    options = config.model
    return dict(image_backbone=options.image_backbone, image_weights=options.image_weights,
                image_size=options.image_size and tuple(options.image_size),
                text_encoder=options.text_encoder, sequence_length=options.sequence_length,
                text_tokenizer=options.text_tokenizer,
                fusion=options.fusion, dropout=options.dropout,
                missing_modalities=options.missing_modalities or config.data.allow_missing,
                modality_dropout=options.modality_dropout, auxiliary_heads=options.auxiliary_heads)


def train_arguments(config, verbose="auto"):
    """The `train` arguments a config gives."""
    fit = config.training
    return dict(seed=config.data.seed, verbose=verbose, **{name: getattr(fit, name) for name in (
        "epochs", "learning_rate", "batch_size", "patience", "fine_tune_epochs",
        "fine_tune_learning_rate", "unfreeze_blocks", "unfreeze_text_layers", "warmup",
        "layer_decay", "class_weight", "focal_gamma", "weight_decay", "ema_momentum",
        "augment_images", "augment_text", "task_weights", "auxiliary_weight", "cache_features",
        "projector")}, label_smoothing=fit.label_smoothing or 0.0)


def tune_experiment(config, *, tuner="random", max_trials=None, objective="val_accuracy",
                    search=("learning_rate", "fusion", "unfreeze_blocks", "dropout"),
                    overwrite=False, verbose="auto"):
    """Searches the hyperparameters `search` names for a config's data; writes the best config.

    Everything not searched is the config's. The search runs in
    `<run_dir>/` (one `train` folder per trial, see `keras_mmtl.tune`), and
    `<run_dir>/best_config.yaml` is the config with the best values, its run
    folder `<run_dir>/best`: `keras-mmtl train --config` it to train, evaluate
    and export the final model.

    Args:
        config: a `RunConfig`, dict or YAML/JSON file, as for `run_experiment`.
        tuner: `"random"`, `"bayesian"` or `"hyperband"`.
        max_trials: trials at most (see `keras_mmtl.tune`).
        objective: `"val_accuracy"` or `"val_loss"`.
        search: names of the model and training settings to search, from
            `tune`'s default space (those a model does not have, such as
            fusion without two inputs, are left out).
        overwrite: start the search again instead of continuing it.
        verbose: progress output.

    Returns:
        `(TuningResult, path of best_config.yaml)`.

    Example:

    >>> result, best = tune_experiment("products.yaml", tuner="bayesian")  # doctest: +SKIP
    """
    config = _as_config(config)
    setup_precision(config.training.precision)
    records = config.data.read()
    config = _prepared_image_size(config, records)
    build, kwargs = build_arguments(config), train_arguments(config, verbose=verbose)
    for name in search:
        build.pop(name, None)
        kwargs.pop(name, None)
    kwargs.pop("seed")
    result = tune(records, config.output_dir, tuner=tuner, max_trials=max_trials,
                  objective=objective, build_kwargs=build, overwrite=overwrite,
                  seed=config.data.seed, **kwargs)
    best = {section: {name: value for name, value in result.best_hyperparameters.items()
                      if name in {f.name for f in dataclasses.fields(cls)}}
            for section, cls in SECTIONS.items()}
    best["output"] = {"run_dir": os.path.join(config.output_dir, "best")}
    path = config.replace(**best).save(os.path.join(config.output_dir, "best_config.yaml"))
    return result, path


def _prepared_image_size(config, records):
    """The config, its model's image size that of prepared data when it names none."""
    if records.prepared and not config.model.image_size:
        return config.replace(model={"image_size": records.prepared["image_size"]})
    return config


def _as_config(config):
    if isinstance(config, str):
        return RunConfig.from_file(config)
    if isinstance(config, dict):
        return RunConfig.from_dict(config)
    return config


def _read_quickly(config, manifest):
    """The manifest's good rows, images not decoded; quiet (`DataConfig.read` reports after)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return config.data.read(manifest, check_images=False, skip_bad_rows=True)

