"""Domain transfer: from a source dataset to a target one, in turn or jointly, optionally adversarial.

* In turn (`transfer(..., joint=False)`): train the classifier on the source, give it a new
  head for the target classes (`with_new_head`, optionally freezing shared layers), then
  train that on the target. The usual choice when the target has few labels.
* Jointly (`joint=True`): one shared network with a source head and a target head, trained
  on batches holding both, with loss `alpha * source_loss + (1 - alpha) * target_loss`.
* Domain-adversarial (`domain_adversarial=True`, joint only): a domain classifier behind a
  gradient-reversal layer pushes the shared features to look alike on both domains, so
  the source labels teach the target too; target rows without labels (`unlabeled`) help.
"""

import os

import keras
import tensorflow as tf

from keras_mmtl.data.pipeline import make_dataset
from keras_mmtl.files import save_atomic
from keras_mmtl.models.backbones import BACKBONE_NAME
from keras_mmtl.models.builder import clone_classifier
from keras_mmtl.models.heads import ClassifierHead, GradientReversal
from keras_mmtl.models.spec import describe, head_name
from keras_mmtl.progress import keras_verbose, logger
from keras_mmtl.training.callbacks import AtomicBackupAndRestore, BestWeights, StopOnNonFiniteLoss
from keras_mmtl.training.optimizers import LayerwiseAdam
from keras_mmtl.training.run_state import MODEL_FILE
from keras_mmtl.training.trainer import train

HEAD = head_name()


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
    train(model, source, os.path.join(run_dir, "source"), **train_kwargs)
    adapted = with_new_head(model, target.class_names, freeze=freeze)
    logger.info(f"Target: {len(target.subset('train'))} training rows, {len(target.class_names)} "
                f"classes, new head; frozen: {', '.join(freeze) or 'nothing'}.")
    train(adapted, target, os.path.join(run_dir, "target"), **train_kwargs)
    return adapted


def train_joint(model, source, target, run_dir, *, alpha=0.5, domain_adversarial=False,
                adversarial_weight=0.3, unlabeled=None, epochs=10, learning_rate=1e-3,
                batch_size=32, patience=3, seed=0, verbose="auto"):
    """Trains one shared network on source and target batches together.

    Each step sees `batch_size` source rows, `batch_size` target rows (the
    smaller set repeats) and, with `unlabeled`, `batch_size` unlabeled
    target rows. The loss is `alpha * source + (1 - alpha) * target` (each
    over its own rows), plus `adversarial_weight * domain` with
    `domain_adversarial`. An epoch is one pass over the larger labelled set.

    As in a phase of `train`: the loss of the classifier kept (the target's,
    or the source's without target labels) on its val split is the
    validation loss; training stops early when it stops improving
    (`patience`) and ends with the best epoch's weights
    (`checkpoints/joint.weights.h5`); an interrupted run resumes from its
    last epoch, from a backup written atomically. Without a val split, the
    kept classifier's training loss is monitored.

    Arguments are those of `transfer`, plus `epochs`, `learning_rate`,
    `batch_size`, `patience`, `seed` and `verbose` as in `train`.

    Returns:
        the target classifier (the source head when `target` is None).
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1]. Received: alpha={alpha}")
    if target is None and not (domain_adversarial and unlabeled is not None):
        raise ValueError("Without target labels, pass domain_adversarial=True and the target "
                         "rows as `unlabeled`.")
    keras.utils.set_random_seed(seed)
    clone, features = _trunk(model)
    # The head the returned classifier keeps is named "head", as in every classifier.
    source_head = "source_head" if target is not None else HEAD
    outputs = {"source": ClassifierHead(describe(model).class_names(), name=source_head)(features)}
    losses = {"source": alpha}
    if target is not None:
        outputs["target"] = ClassifierHead(target.class_names, name=HEAD)(features)
        losses["target"] = 1 - alpha
    if domain_adversarial:
        hidden = GradientReversal(adversarial_weight, name="gradient_reversal")(features)
        hidden = keras.layers.Dense(128, activation="relu", name="domain_hidden")(hidden)
        outputs["domain"] = keras.layers.Dense(
            1, activation="sigmoid", dtype="float32", name="domain")(hidden)
        losses["domain"] = adversarial_weight
    joint_model = keras.Model(clone.input, outputs, name="joint_transfer")
    joint_model.compile(
        optimizer=LayerwiseAdam(learning_rate=learning_rate),
        loss={name: ("binary_crossentropy" if name == "domain"
                     else "sparse_categorical_crossentropy") for name in outputs},
        loss_weights=losses,
        weighted_metrics={name: ["accuracy"] for name in outputs if name != "domain"},
    )
    parts = [("source", source)] + ([("target", target)] if target is not None else [])
    parts += [("unlabeled", unlabeled)] if unlabeled is not None else []
    data, steps = _joint_dataset(model, parts, tuple(outputs), batch_size, seed)
    kept = "target" if target is not None else "source"
    val = _joint_validation(model, dict(parts)[kept], kept, tuple(outputs), batch_size)
    # Without val rows, the kept classifier's own training loss (the domain loss may rise).
    monitor = "val_loss" if val is not None else f"{kept}_loss"
    best = os.path.join(run_dir, "checkpoints", "joint.weights.h5")
    os.makedirs(run_dir, exist_ok=True)
    joint_model.fit(
        data, epochs=epochs, steps_per_epoch=steps, validation_data=val,
        verbose=keras_verbose(verbose),
        callbacks=[AtomicBackupAndRestore(os.path.join(run_dir, "backup")),
                   keras.callbacks.TensorBoard(os.path.join(run_dir, "logs")),
                   BestWeights(best, monitor),
                   keras.callbacks.EarlyStopping(monitor=monitor, patience=patience, mode="min"),
                   StopOnNonFiniteLoss(run_dir)])
    if os.path.exists(best):
        joint_model.load_weights(best)
    adapted = keras.Model(clone.input, outputs[kept], name=model.name)
    save_atomic(adapted.save, os.path.join(run_dir, MODEL_FILE))
    return adapted


def _joint_validation(model, records, kept, outputs, batch_size):
    """The val rows of the kept classifier's data, weighing its output only; `None` without."""
    if not (records.splits == "val").any():
        return None

    def weigh(inputs, labels):
        rows = tf.shape(labels)[0]
        return (inputs,
                {name: labels if name == kept else tf.zeros([rows, 1]) if name == "domain"
                 else tf.zeros_like(labels) for name in outputs},
                {name: tf.fill([rows], 1.0 if name == kept else 0.0) for name in outputs})

    return make_dataset(records, "val", **describe(model).dataset_arguments(),
                        batch_size=batch_size, shuffle=False).map(weigh)


def _joint_dataset(model, parts, outputs, batch_size, seed):
    """Endless batches of `(inputs, labels, sample weights)` over all parts, and steps per epoch."""
    kwargs = dict(**describe(model).dataset_arguments(), batch_size=batch_size, seed=seed,
                  shuffle=True, drop_remainder=True)
    labelled = [len(records.subset("train")) for name, records in parts if name != "unlabeled"]
    steps = max(max(labelled) // batch_size, 1)
    streams = []
    for name, records in parts:
        # Unlabelled rows are all used, whatever their split.
        split = "train" if name != "unlabeled" else None
        rows = len(records.subset(split)) if split else len(records)
        if rows < batch_size:
            raise ValueError(f"The {name} data has {rows} training rows, fewer than "
                             f"batch_size={batch_size}: lower batch_size.")
        streams.append(make_dataset(records, split, **kwargs).repeat())
    names = [name for name, _ in parts]

    def merge(*batches):
        inputs = {key: tf.concat([x[key] for x, _ in batches], 0) for key in batches[0][0]}
        labels, weights = {}, {}
        for output in outputs:
            if output == "domain":
                labels[output] = tf.concat(
                    [tf.fill([batch_size, 1], 0.0 if name == "source" else 1.0)
                     for name in names], 0)
                weights[output] = tf.ones([batch_size * len(names)])
                continue
            labels[output] = tf.concat(
                [y if name == output else tf.zeros_like(y) for name, (_, y) in zip(names, batches)],
                0)
            weights[output] = tf.concat(
                [tf.fill([batch_size], 1.0 if name == output else 0.0) for name in names], 0)
        return inputs, labels, weights

    data = tf.data.Dataset.zip(tuple(streams)).map(merge, num_parallel_calls=tf.data.AUTOTUNE)
    return data.prefetch(tf.data.AUTOTUNE), steps

