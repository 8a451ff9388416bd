"""The main job: a `RunConfig` -> data, model, training, test report and a served SavedModel."""

import dataclasses
import os

import keras

from keras_mmtl.config import CONFIG_FILE, ConfigError, RunConfig
from keras_mmtl.data import read_manifest
from keras_mmtl.evaluation import evaluate
from keras_mmtl.export import export_saved_model
from keras_mmtl.models import build_classifier_for, clone_classifier
from keras_mmtl.models.text import needs_vocabulary, vocabulary_learner
from keras_mmtl.training import distribution_strategy, setup_precision, train, transfer
from keras_mmtl.training.distribute import is_chief, is_multi_worker


@dataclasses.dataclass
class ExperimentResult:
    """What `run_experiment` made: the trained model, its test report and where things are."""

    model: object
    report: object  # None on workers other than the chief
    run_dir: str
    export_path: str = None


def run_experiment(config, *, verbose="auto"):
    """Trains, evaluates and exports the classifier a `RunConfig` describes.

    The steps of `keras-mmtl train`: set up precision and distribution, read
    and check the manifest, build the classifier in the strategy's scope,
    train it (or transfer it from `transfer.source_manifest`), evaluate it on
    the test split (report in `<run_dir>/eval`) and export it. The complete
    config is written to `<run_dir>/config.yaml` first, so the run can be
    reproduced from it, and an interrupted run resumes when called again.

    Args:
        config: a `RunConfig`, a dict of its sections, or a YAML/JSON file.
        verbose: Keras progress output (`"auto"`, 0, 1, 2).

    Returns:
        an `ExperimentResult`.

    Example:

    >>> result = run_experiment("runs/products/config.yaml")  # doctest: +SKIP
    >>> print(result.report.summary())  # doctest: +SKIP
    """
    if isinstance(config, str):
        config = RunConfig.from_file(config)
    elif isinstance(config, dict):
        config = RunConfig.from_dict(config)
    data, options, fit, moved = config.data, config.model, config.training, config.transfer
    if not data.manifest:
        raise ConfigError("No manifest: set data.manifest (--manifest).")
    if (moved.joint or moved.domain_adversarial) and not moved.source_manifest:
        raise ConfigError("transfer.joint and transfer.domain_adversarial (--joint, "
                          "--domain-adversarial) need transfer.source_manifest "
                          "(--source-manifest).")
    # Precision first (GPU memory growth), then the strategy: a multi-worker
    # strategy must exist before TensorFlow runs anything else.
    setup_precision(fit.precision)
    strategy = distribution_strategy(fit.strategy)
    keras.utils.set_random_seed(data.seed)  # weight initialisation too, not only training
    run_dir = config.output_dir
    config.save(os.path.join(run_dir, CONFIG_FILE))
    records = _read(config, data.manifest)
    print(f"{len(records)} rows, {len(records.class_names)} classes, inputs "
          f"{list(records.modalities)}; run folder {run_dir}")
    source = _read(config, moved.source_manifest) if moved.source_manifest else None
    build = dict(image_backbone=options.image_backbone, image_weights=options.image_weights,
                 image_size=options.image_size and tuple(options.image_size),
                 text_encoder=options.text_encoder, sequence_length=options.sequence_length,
                 fusion=options.fusion, dropout=options.dropout)
    kwargs = dict(epochs=fit.epochs, learning_rate=fit.learning_rate,
                  batch_size=fit.batch_size, seed=data.seed, verbose=verbose)
    if not moved.joint:
        kwargs.update({name: getattr(fit, name) for name in (
            "fine_tune_epochs", "fine_tune_learning_rate", "unfreeze_blocks",
            "unfreeze_text_layers", "warmup", "layer_decay", "patience", "class_weight",
            "focal_gamma", "label_smoothing", "weight_decay", "augment_images", "augment_text",
            "cache_features")})
    with strategy.scope():
        if source is None:
            model = build_classifier_for(records, **build)
        else:
            vocabulary = _shared_vocabulary(options.text_encoder, source, records)
            model = build_classifier_for(source, text_vocabulary=vocabulary, **build)
    if source is None:
        train(model, records, run_dir, **kwargs)
    else:
        model = transfer(model, source, records, run_dir, joint=moved.joint, alpha=moved.alpha,
                         domain_adversarial=moved.domain_adversarial,
                         freeze=tuple(moved.freeze), **kwargs)
    if is_multi_worker(strategy):
        if not is_chief():
            return ExperimentResult(model, None, run_dir)  # the chief evaluates and exports
        # Evaluated on one device: predict under the strategy sees this worker's share only.
        model = clone_classifier(model)
    eval_dir = os.path.join(run_dir, "eval")
    result = ExperimentResult(model, evaluate(model, records, "test", out_dir=eval_dir), run_dir)
    if config.output.export:
        result.export_path = export_saved_model(
            model, config.output.export_dir or os.path.join("saved_models", config.name))
    return result


def _read(config, manifest):
    data = config.data
    return read_manifest(manifest, data.image_column, data.text_column, data.label_column,
                         data.split_column, min_class_count=data.min_class_count,
                         skip_bad_rows=data.skip_bad_rows, seed=data.seed)


def _shared_vocabulary(text_encoder, source, target):
    """The text vocabulary learned from the source and target training texts, if one is needed."""
    if not needs_vocabulary(text_encoder) or "text" not in source.modalities:
        return None
    texts = [*source.subset("train").texts, *target.subset("train").texts]
    return vocabulary_learner(text_encoder)(texts)
