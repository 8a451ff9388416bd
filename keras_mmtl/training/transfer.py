"""Domain transfer: from a source dataset to a target one, in turn or jointly, or adversarial.

* In turn (`transfer(..., joint=False)`): train the classifier on the source, give it a new
  head for the target classes (`with_new_head`, optionally freezing shared layers), then
  train that on the target. The usual choice when the target has few labels.
* Jointly (`joint=True`): one shared network with a source head and a target head, trained
  on batches holding both, with loss `alpha * source_loss + (1 - alpha) * target_loss`: a
  run of `train` on a dataset of both domains (`joint_records`), with all it gives.
* Domain-adversarial (`domain_adversarial=True`, joint only): a domain classifier behind a
  gradient-reversal layer pushes the shared features to look alike on both domains, so
  the source labels teach the target too; target rows without labels (`unlabeled`) help.
"""

import dataclasses

import keras
import numpy as np

from keras_mmtl.data.manifest import DataReport
from keras_mmtl.files import join_path, save_atomic
from keras_mmtl.models.backbones import BACKBONE_NAME
from keras_mmtl.models.builder import clone_classifier
from keras_mmtl.models.heads import ClassifierHead, GradientReversal
from keras_mmtl.models.spec import describe, head_name
from keras_mmtl.progress import logger
from keras_mmtl.training.run_state import MODEL_FILE
from keras_mmtl.training.trainer import train

HEAD = head_name()
# The tasks of joint training's dataset (`joint_records`) and its unlabeled part.
SOURCE, TARGET, DOMAIN, UNLABELED = "source", "target", "domain", "unlabeled"


def _trunk(model):
    """A clone of `model` (same weights and trainable flags) and its fused features."""
    if describe(model).multi_output:
        raise ValueError("Domain transfer adapts a classifier with one output; this one has "
                         f"{list(model.output)} (several tasks or auxiliary heads).")
    clone = clone_classifier(model)
    return clone, clone.get_layer(HEAD).input


def with_new_head(model, class_names, *, freeze=(BACKBONE_NAME,), dropout=None):
    """A copy of a trained classifier that predicts other classes with a fresh head.

    Args:
        model: a classifier trained on the source data.
        class_names: the target classes.
        freeze: names of layers to freeze for the target training. By default
            the image backbone, so `train` runs its two phases again (head
            first, then the backbone's top blocks); add `"fusion"`,
            `"text_embedding"`, ... to keep more of the source knowledge fixed.
        dropout: dropout of the new head (default: the old head's).

    Returns:
        an uncompiled classifier sharing nothing with `model`.

    Example:

    >>> target = with_new_head(source_model, ["new", "classes"])  # doctest: +SKIP
    """
    clone, features = _trunk(model)
    names = {layer.name for layer in clone.layers}
    unknown = set(freeze) - names
    if unknown:
        raise ValueError(f"Cannot freeze {sorted(unknown)}: the model has no such layer. "
                         f"Its layers: {sorted(names)}")
    for name in freeze:
        clone.get_layer(name).trainable = False
    rate = clone.get_layer(HEAD).dropout_rate if dropout is None else dropout
    outputs = ClassifierHead(class_names, dropout=rate, name=HEAD)(features)
    return keras.Model(clone.input, outputs, name=model.name)


def transfer(model, source, target, run_dir, *, joint=False, alpha=0.5,
             domain_adversarial=False, adversarial_weight=0.3, unlabeled=None,
             freeze=(BACKBONE_NAME,), **train_kwargs):
    """Trains on a source dataset and adapts to a target dataset.

    Args:
        model: a classifier for the source classes (e.g.
            `build_classifier_for(source)`); its vocabulary should cover both
            datasets' texts, so learn it from both when they differ.
        source: `Records` of the source dataset (train, and val for early stopping).
        target: `Records` of the target dataset, or `None` when it has no
            labels (then `joint` and `domain_adversarial` are needed, the
            classes are the source's and `unlabeled` holds the target rows).
        run_dir: folder of the run (`source/` and `target/` for the
            sequential way).
        joint: train both at once (`train_joint`) instead of in turn.
        alpha: weight of the source loss in joint training.
        domain_adversarial: add a domain classifier behind gradient reversal
            (joint training only).
        adversarial_weight: weight of the domain loss, and of its reversed
            gradient.
        unlabeled: `Records` of target-domain rows whose labels are not used
            (domain loss only).
        freeze: layers frozen for the target training (`with_new_head`).
        **train_kwargs: passed to `train` (sequential) or `train_joint`.

    Returns:
        the target classifier (trained, uncompiled, saved as `model.keras` in
        `run_dir` or `run_dir/target`).

    Example:

    >>> target_model = transfer(model, source, target, "runs/transfer")  # doctest: +SKIP
    """
    if joint or domain_adversarial:
        if not joint:
            raise ValueError("domain_adversarial=True trains both domains at once: "
                             "pass joint=True as well.")
        return train_joint(model, source, target, run_dir, alpha=alpha,
                           domain_adversarial=domain_adversarial,
                           adversarial_weight=adversarial_weight, unlabeled=unlabeled,
                           **train_kwargs)
    if target is None:
        raise ValueError("Without target labels, adapt with joint=True, "
                         "domain_adversarial=True and the target rows as `unlabeled`.")
    logger.info(f"Source: {len(source.subset('train'))} training rows, {len(source.class_names)} "
                f"classes.")
    train(model, source, join_path(run_dir, "source"), **train_kwargs)
    adapted = with_new_head(model, target.class_names, freeze=freeze)
    logger.info(f"Target: {len(target.subset('train'))} training rows, {len(target.class_names)} "
                f"classes, new head; frozen: {', '.join(freeze) or 'nothing'}.")
    train(adapted, target, join_path(run_dir, "target"), **train_kwargs)
    return adapted


def train_joint(model, source, target, run_dir, *, alpha=0.5, domain_adversarial=False,
                adversarial_weight=0.3, unlabeled=None, seed=0, **train_kwargs):
    """Trains one shared network on source and target rows together, with `train`.

    The network gets a head per domain (and, with `domain_adversarial`, a
    domain classifier behind gradient reversal) and `train` fits it on one
    dataset of both domains (`joint_records`) as a model of several tasks:
    each row is labelled for its own domain's classes only. So joint
    training has everything `train` gives: two phases on a pretrained
    backbone, the feature cache, atomic resume, early stopping on the val
    split and the best epoch's weights, TensorBoard logs.

    Each domain's training rows repeat (or, for `unlabeled`, are drawn) to
    as many as the larger labelled set has, so in expectation a batch holds
    as many source rows as target rows (and unlabeled ones), and the loss
    is `alpha * source + (1 - alpha) * target`, plus `adversarial_weight *
    domain`. The validation loss is the kept classifier's on its val rows,
    times its weight (the target's, or the source's without target labels):
    neither the other head nor the domain classifier sees val rows.

    Arguments are those of `transfer`; `seed` and `**train_kwargs` go to
    `train` (`task_weights` comes from `alpha` and `adversarial_weight`).

    Returns:
        the target classifier (the source head when `target` is None), also
        saved as `model.keras` in `run_dir`.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1]. Received: alpha={alpha}")
    if target is None and not (domain_adversarial and unlabeled is not None):
        raise ValueError("Without target labels, pass domain_adversarial=True and the target "
                         "rows as `unlabeled`.")
    if train_kwargs.pop("task_weights", None):
        raise ValueError("Joint training weighs its heads by alpha and adversarial_weight; "
                         "task_weights is not taken.")
    keras.utils.set_random_seed(seed)
    records = joint_records(source, target, unlabeled, domain=domain_adversarial, seed=seed)
    clone, features = _trunk(model)
    heads = {task: ClassifierHead(names, name=head_name(task))
             for task, names in records.tasks.items() if task != DOMAIN}
    outputs = {task: head(features) for task, head in heads.items()}
    weights = {SOURCE: alpha, TARGET: 1 - alpha}
    if domain_adversarial:
        hidden = GradientReversal(adversarial_weight, name="gradient_reversal")(features)
        hidden = keras.layers.Dense(128, activation="relu", name="domain_hidden")(hidden)
        outputs[DOMAIN] = ClassifierHead(records.tasks[DOMAIN], name=head_name(DOMAIN))(hidden)
        weights[DOMAIN] = adversarial_weight
    joint_model = keras.Model(clone.input, outputs, name="joint_transfer")
    train(joint_model, records, run_dir, seed=seed,
          task_weights={task: weights[task] for task in outputs}, **train_kwargs)
    kept = heads[records.label_name]
    head = ClassifierHead(kept.class_names, dropout=kept.dropout_rate, name=HEAD)
    adapted = keras.Model(clone.input, head(features), name=model.name)
    head.set_weights(kept.get_weights())
    save_atomic(adapted.save, join_path(run_dir, MODEL_FILE))
    return adapted


def joint_records(source, target, unlabeled=None, *, domain=False, seed=0):
    """One dataset of both domains for joint training, each row labelled in its own task.

    Tasks: `"target"` (the main one; `"source"` without a target), `"source"`,
    and with `domain` a `"domain"` task (`source`/`target`) on the training
    rows. Labels a row does not have are -1. The training rows of each part
    (source, target, unlabeled) are repeated in a shuffled order (or drawn)
    to as many as the larger labelled part has; the source's val and test
    rows are left out, so the val split is the kept classifier's.

    Example:

    >>> from keras_mmtl.data import from_arrays
    >>> source = from_arrays(["a", "b", "a", "b"], texts=["w"] * 4, splits=["train"] * 4)
    >>> target = from_arrays(["x", "y", "x"], texts=["v"] * 3, splits=["train", "train", "val"])
    >>> joint = joint_records(source, target, domain=True)
    >>> joint.tasks
    {'target': ['x', 'y'], 'source': ['a', 'b'], 'domain': ['source', 'target']}
    >>> len(joint), joint.task_labels("domain").tolist()
    (9, [0, 0, 0, 0, 1, 1, 1, 1, -1])
    """
    parts = {SOURCE: source.subset("train")}
    if target is not None:
        parts[TARGET] = target
    if unlabeled is not None:
        parts[UNLABELED] = dataclasses.replace(unlabeled, splits=np.full(len(unlabeled), "train"))
    first = parts[SOURCE]
    for name, records in parts.items():
        if records.modalities != first.modalities or records.image_kind != first.image_kind:
            raise ValueError(
                f"The {name} rows have inputs {records.modalities} ({records.image_kind} "
                f"images); the source rows have {first.modalities} ({first.image_kind}): joint "
                "training needs the same inputs, held alike.")
    rows = max(int((records.splits == "train").sum()) for name, records in parts.items()
               if name != UNLABELED)
    rng = np.random.default_rng(seed)
    for name, records in parts.items():
        train_rows = np.flatnonzero(records.splits == "train")
        others = np.flatnonzero(records.splits != "train")
        parts[name] = records.select(np.concatenate([np.resize(rng.permutation(train_rows), rows),
                                                     others]))
    kept = TARGET if target is not None else SOURCE
    names = {kept: parts[kept].class_names}
    names.update({SOURCE: source.class_names} if kept != SOURCE else {})
    names.update({DOMAIN: [SOURCE, TARGET]} if domain else {})

    def labels(task, name, records):
        if task == DOMAIN:
            own = np.full(len(records), 0 if name == SOURCE else 1, np.int32)
            return np.where(records.splits == "train", own, -1)
        return records.labels if name == task else np.full(len(records), -1, np.int32)

    def joined(values):
        return None if values[0] is None else np.concatenate(values)

    every = {task: np.concatenate([labels(task, name, records) for name, records in parts.items()])
             for task in names}
    records = list(parts.values())
    return dataclasses.replace(
        first, images=joined([r.images for r in records]), texts=joined([r.texts for r in records]),
        tabular=joined([r.tabular for r in records]),
        extra_inputs={key: joined([r.extra_inputs[key] for r in records])
                      for key in first.extra_inputs},
        splits=joined([r.splits for r in records]), labels=every[kept], class_names=names[kept],
        label_name=kept, extra_tasks={task: (every[task], names[task]) for task in names
                                      if task != kept},
        report=DataReport())
