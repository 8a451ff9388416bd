"""Two-phase transfer learning: train the head on a frozen backbone, then fine-tune its top."""

import hashlib
import json
import time

import keras
import numpy as np
import tensorflow as tf

from keras_mmtl.checks import check_known
from keras_mmtl.data.augmentation import make_augmentation
from keras_mmtl.data.pipeline import make_dataset
from keras_mmtl.files import (
    exists,
    join_path,
    make_folder,
    read_bytes,
    remove,
    save_atomic,
    write_json,
)
from keras_mmtl.keras_internals import build_from_spec, distribute_strategy
from keras_mmtl.modalities import modality_kind
from keras_mmtl.models import text
from keras_mmtl.models.backbones import (
    BACKBONE_NAME,
    backbone_network,
    unfreeze_top_blocks,
)
from keras_mmtl.models.builder import embedding_model
from keras_mmtl.models.spec import describe, output_tasks
from keras_mmtl.presets import parse_duration, with_preset
from keras_mmtl.progress import (
    expected_retracing,
    keras_verbose,
    logger,
    predict_with_progress,
)
from keras_mmtl.training.cache import (
    cache_whole_from_bottom,
    canonical_config,
    compute_features,
    split_model,
)
from keras_mmtl.training.callbacks import (
    AtomicBackupAndRestore,
    BestWeights,
    ConfusionMatrixImage,
    StopOnNonFiniteLoss,
    TimeLimit,
    write_hparams,
    write_projector,
)
from keras_mmtl.training.distribute import (
    describe_strategy,
    is_chief,
    is_multi_worker,
    num_workers,
    worker_id,
    worker_rank,
)
from keras_mmtl.training.losses import ClassificationLoss
from keras_mmtl.training.metrics import LabelledAccuracy, MacroF1
from keras_mmtl.training.optimizers import (
    LayerwiseAdam,
    decoupled_weight_decay,
    fine_tuning_optimizer,
    moving_average,
)
from keras_mmtl.training.run_state import (
    LOGS,
    MODEL_FILE,
    REFIT_FOLDER,
    STATE_FILE,
    StaleRunError,
    changes,
)

PROJECTOR_POINTS = 5000  # the Projector stays responsive up to ~10k points


def compile_classifier(model, optimizer, steps_per_execution=1, loss=None, task_weights=None,
                       auxiliary_weight=0.3, jit_compile="auto"):
    """Compiles a classifier with cross-entropy, accuracy and macro-F1.

    A model with several outputs gets the loss on each, weighed by
    `task_weights` (auxiliary heads by `auxiliary_weight` times their
    task's weight), and accuracy and macro-F1 for each task's main output
    (logged as `<task>_accuracy`, `<task>_macro_f1`); the loss it minimises
    and logs as `loss` is the weighted sum.

    Args:
        model: the classifier.
        optimizer: a Keras optimizer, or a learning rate for `LayerwiseAdam`
            (Adam with fused and lazy updates, no multipliers).
        steps_per_execution: batches per compiled call; more cuts Python
            overhead where a step is tiny (a head on cached features).
        loss: a loss on integer labels; default `ClassificationLoss()`
            (sparse categorical cross-entropy).
        task_weights: dict of task -> loss weight (tasks left out weigh 1).
        auxiliary_weight: loss weight of each auxiliary head.
        jit_compile: XLA for the train and predict steps: `"auto"` (Keras:
            on a GPU, for models whose layers all support it), True or False.

    Returns:
        the main task's `MacroF1` metric (its confusion matrix is the one drawn).
    """
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        optimizer = LayerwiseAdam(learning_rate=optimizer)
    loss = loss or ClassificationLoss()
    tasks = output_tasks(model)
    weights = _loss_weights(tasks, task_weights, auxiliary_weight)

    def metrics(output):
        return [LabelledAccuracy(), MacroF1(output.shape[-1])]

    metrics = metrics(model.output) if tasks is None else {
        name: metrics(model.output[name]) if name == task else [] for name, task in tasks.items()}
    model.compile(
        optimizer=optimizer,
        loss=loss if tasks is None else {name: loss for name in tasks},
        loss_weights=weights,
        metrics=metrics,
        steps_per_execution=steps_per_execution,
        jit_compile=jit_compile,
    )
    # The first task's (`describe(model).class_names()`): the model's first main output.
    return (metrics if tasks is None else next(m for m in metrics.values() if m))[-1]


def _loss_weights(tasks, task_weights, auxiliary_weight):
    """`{output: loss weight}` of a model's outputs (`None` for a one-output model)."""
    if tasks is None:
        if task_weights:
            raise ValueError("task_weights is for models with several tasks (label columns); "
                             f"this model has one output. Received: task_weights={task_weights}")
        return None
    task_weights = dict(task_weights or {})
    check_known(task_weights, tasks.values(), lambda unknown: (
        f"task_weights names tasks {unknown} that the model does not have; "
        f"its tasks: {sorted(set(tasks.values()))}."))
    return {name: float(task_weights.get(task, 1.0)) * (1.0 if name == task else auxiliary_weight)
            for name, task in tasks.items()}


def _input_kinds(model, *args, **kwargs):
    """The kinds of a classifier's inputs, for its preset's settings."""
    return {modality_kind(name) for name in describe(model).modalities}


@with_preset("training", kinds=_input_kinds)
def train(
    model,
    records,
    run_dir,
    *,
    epochs=30,
    fine_tune_epochs=5,
    learning_rate=1e-3,
    fine_tune_learning_rate=1e-4,
    unfreeze_blocks=3,
    unfreeze_text_layers=0,
    warmup=0.1,
    layer_decay=0.8,
    batch_size=32,
    patience=3,
    class_weight=None,
    focal_gamma=0.0,
    label_smoothing=0.0,
    weight_decay=0.0,
    ema_momentum=None,
    augment_images=False,
    augment_text=False,
    task_weights=None,
    auxiliary_weight=0.3,
    cache_features=True,
    cache_dir=None,
    projector=True,
    resume=True,
    seed=0,
    time_limit=None,
    callbacks=(),
    jit_compile="auto",
    verbose="auto",
):
    """Trains a classifier the way transfer learning is done, in two phases.

    Phase 1 trains everything but the frozen pretrained backbones (as
    `build_classifier` leaves them). With `cache_features`, their outputs are
    computed once per sample and phase 1 trains the layers above them on
    those features, which is many times faster and gives the same model.
    Phase 2 unfreezes the image backbone's top `unfreeze_blocks` blocks
    (BatchNorm stays frozen, in inference mode) and, optionally, the top
    `unfreeze_text_layers` layers of a pretrained text encoder; a text
    encoder left frozen stays cached. It trains at `fine_tune_learning_rate`
    after a linear warmup, with cosine decay, and with layer-wise decay
    (each block down a backbone learns `layer_decay` times slower). Each
    phase stops early when validation loss stops improving and keeps its
    best epoch; the model ends with the better of the two phases.

    A model built inside a `tf.distribute` strategy's scope (see
    `distribution_strategy`) trains with it: optimizer and metrics are made
    in the same scope and each step takes `batch_size` samples per replica.
    With several workers, each trains the same model in step; the chief
    writes `run_dir` and the others `run_dir/workers/<type><index>`.

    Everything lands in `run_dir`: TensorBoard logs (`logs/`), each phase's
    best checkpoint (`checkpoints/`, then `phase<N>.weights.h5`), the final
    model (`model.keras`), `state.json`, and the feature cache (`cache/`). A
    run that was interrupted resumes from its last finished epoch when called
    again with the same `run_dir`.

    Args:
        model: a classifier from `keras_mmtl.models.build_classifier`.
        records: `keras_mmtl.data.Records` with train (and val) splits.
        run_dir: folder of this run.
        preset: a quality preset (`"fast"`, `"medium"`, `"best"`; see
            `keras_mmtl.presets`) whose training settings fill the arguments
            not passed (with its `image_only` and `image_run` ones for a
            model of images alone); `None` for the defaults below. Its model
            settings go to `build_classifier_for(preset=...)`, and its
            ensemble to `run_experiment`.
        epochs: maximum epochs of phase 1.
        fine_tune_epochs: maximum epochs of phase 2 (0 skips it). Phase 2
            needs something to fine-tune: a frozen pretrained image backbone,
            or a pretrained text encoder with `unfreeze_text_layers`; other
            models (text-only n-grams, a backbone trained from scratch) train
            in one phase.
        learning_rate: Adam learning rate of phase 1.
        fine_tune_learning_rate: peak learning rate of phase 2, lower so the
            pretrained features are adjusted, not overwritten.
        unfreeze_blocks: top backbone blocks to train in phase 2, or `"all"`.
        unfreeze_text_layers: top transformer layers of a pretrained text
            encoder to train in phase 2, or `"all"`; 0 keeps it frozen (and
            cached), the fast choice on a CPU.
        warmup: fraction of phase 2's steps that ramp the learning rate up.
        layer_decay: learning-rate factor per block down each backbone in
            phase 2; 1 gives every layer the same rate.
        batch_size: samples per batch and replica (the global batch is
            `batch_size * strategy.num_replicas_in_sync`).
        patience: epochs without validation improvement before a phase stops.
        class_weight: `None`, `"balanced"` (each class weighs
            `rows / (classes * rows of the class)`, so rare classes count as
            much as frequent ones: better macro-F1 on imbalanced data), or a
            dict of class name -> weight (see `class_weights`).
        focal_gamma: focal loss exponent (0: plain cross-entropy; 2 is
            usual): concentrates training on hard, often rare, samples.
        label_smoothing: target mass spread over all classes (e.g. 0.1).
        weight_decay: decoupled weight decay (AdamW) of kernels; biases,
            normalisation and embedding weights are not decayed.
        ema_momentum: keep an exponential moving average of the weights in
            each phase with this momentum (e.g. 0.99), and validate and keep
            it in place of the raw weights (`moving_average`); `None` for none.
        augment_images: random flip, rotation, zoom, crop and contrast of
            training images: `True`, or a dict of `ImageAugmentation`
            arguments. Augmented images go through the image backbone each
            step, so that branch is not cached.
        augment_text: random word deletion and swap in training texts:
            `True`, or a dict of `TextAugmentation` arguments.
        task_weights: for a multi-task model, dict of task -> loss weight
            (tasks left out weigh 1); the phases stop and keep their best
            epoch on the weighted validation loss of all tasks.
        auxiliary_weight: loss weight of each auxiliary head
            (`auxiliary_heads=True`), times its task's weight.
        cache_features: train on cached features of the frozen branches (and
            of a partly fine-tuned backbone's frozen bottom). With several
            workers, one cache in the chief's run folder: each worker computes
            every n-th row and reads the others' (the folder must be shared).
        cache_dir: where cached features are kept, keyed by the frozen
            weights and the data (default `run_dir/cache`), so a stale cache
            is never read.
        projector: at the end, write the fused embeddings of (up to 5,000)
            validation samples for TensorBoard's Projector: one more pass
            over them, worth skipping for quick or many runs.
        resume: continue an interrupted run found in `run_dir`.
        seed: seed of shuffling and weight initialisation.
        time_limit: wall time this call may take, in seconds or as a
            duration such as `"15m"` (`parse_duration`); `None` for no limit.
            Phase 1 stops by half of the time left once its frozen features
            are computed (phase 2 can have what phase 1 left) and phase 2
            by all of it, each at the end of an epoch when
            another would not end in time (`TimeLimit`); each keeps its
            best epoch as usual.
        callbacks: more Keras callbacks, run in both phases (after ours).
        jit_compile: XLA for the training steps (see `compile_classifier`).
        verbose: Keras progress output (`"auto"`, 0, 1, 2).

    Returns:
        dict of per-epoch metric lists over both phases (`loss`, `accuracy`,
        `val_loss`, `val_accuracy`, `epoch`, `phase`), also kept in
        `state.json` after every epoch.

    Example:

    >>> history = train(model, records, "runs/products", epochs=5)  # doctest: +SKIP
    """
    started = time.monotonic()
    verbose = keras_verbose(verbose)
    hparams = {name: value for name, value in locals().items() if name not in (
        "model", "records", "run_dir", "cache_dir", "projector", "resume", "callbacks",
        "verbose", "started", "time_limit")}
    budget = None if time_limit is None else parse_duration(time_limit)
    keras.utils.set_random_seed(seed)
    _loss_weights(describe(model).outputs, task_weights, auxiliary_weight)  # checks them early
    moving_average(ema_momentum)  # checks it before the run folder is written
    strategy = model.distribute_strategy
    shard = None
    if is_multi_worker(strategy):
        # One feature cache in the chief's run folder: each worker computes its shard of rows.
        cache_dir, shard = cache_dir or join_path(run_dir, "cache"), (worker_rank(),
                                                                          num_workers())
        if not is_chief():
            run_dir = join_path(run_dir, "workers/" + "".join(map(str, worker_id())))
    if strategy.num_replicas_in_sync > 1:
        logger.info(f"Training with {describe_strategy(strategy)}; global batch "
                    f"{batch_size * strategy.num_replicas_in_sync}.")
    augment = make_augmentation(image=augment_images, text=augment_text, seed=seed)
    loss = ClassificationLoss(gamma=focal_gamma, label_smoothing=label_smoothing)
    weights = _class_weights_by_output(model, records, class_weight)
    make_folder(run_dir)
    state_path = join_path(run_dir, STATE_FILE)
    if not resume:
        _clear_run(run_dir)
    state = _read_state(state_path)
    found = run_fingerprint(model, records, {name: value for name, value in hparams.items()
                                             if name not in ("cache_features", "jit_compile")})
    recorded = state.get("fingerprint", found)  # runs from before fingerprints pass
    if recorded != found:
        raise StaleRunError(
            f"The run folder {run_dir} holds a run of another model, other settings or other "
            f"data, so it can neither resume nor be reused; nothing was trained. What changed: "
            f"{changes(recorded, found)}. To train this one, pass resume=False (which clears "
            "the folder's training state; keras-mmtl train: --overwrite) or another run_dir.")
    if not state:  # a new run
        state["fingerprint"] = found  # written with the first epoch
        write_hparams(join_path(run_dir, LOGS), {**_model_hparams(model), **hparams})
    has_val = bool((records.splits == "val").any())
    monitor = "val_loss" if has_val else "loss"
    # Two phases when the model starts with a frozen pretrained backbone that
    # phase 2 fine-tunes; a backbone that trains from the start (random
    # weights) needs only one.
    frozen = [name for name, layer in (("image backbone", BACKBONE_NAME),
                                       ("text encoder", text.TEXT_BACKBONE))
              if _frozen(model, layer)]
    image_frozen = "image backbone" in frozen
    two_phase = _two_phase(model, fine_tune_epochs, unfreeze_text_layers)
    phases = [(epochs, learning_rate)] + ([(fine_tune_epochs, fine_tune_learning_rate)]
                                          if two_phase else [])
    if state.get("phases_done", 0) >= len(phases):
        logger.info(f"The run in {run_dir} is finished; loading its best weights "
                    "(resume=False trains again).")
    for number, (phase_epochs, rate) in enumerate(phases, start=1):
        if state.get("phases_done", 0) >= number:
            continue
        if number == 2:
            model.load_weights(_phase_weights(run_dir, 1))
            title = _unfreeze(model, image_frozen and unfreeze_blocks, unfreeze_text_layers)
        else:
            title = f"frozen {' and '.join(frozen)}" if frozen else "all layers"
        with strategy.scope():
            if number == 1 and cache_features and shard is None:  # _fit_setup does the rest
                _cache_from_bottom(model, records, ("train", "val") if has_val else ("train",),
                                   cache_dir or join_path(run_dir, "cache"), augment,
                                   fine_tune_epochs, unfreeze_blocks, unfreeze_text_layers)
            fit_model, clone, train_ds, val_ds, cached = _fit_setup(
                model, records, run_dir, cache=cache_features, cache_dir=cache_dir,
                has_val=has_val, batch_size=batch_size * strategy.num_replicas_in_sync,
                seed=seed, augment=augment, shard=shard)
            train_ds = _weigh_classes(train_ds, weights)
            if number == 2:
                steps = phase_epochs * len(train_ds)
                # The clone holds the backbones whole (a top on cached features holds part).
                optimizer = fine_tuning_optimizer(clone or fit_model, rate, steps, warmup=warmup,
                                                  layer_decay=layer_decay,
                                                  weight_decay=weight_decay,
                                                  ema_momentum=ema_momentum)
                schedule = (f"peak learning rate {rate:g} (warmup {warmup:g}, cosine, "
                            f"layer decay {layer_decay:g})")
            else:
                optimizer = decoupled_weight_decay(LayerwiseAdam(
                    learning_rate=rate, weight_decay=weight_decay or None,
                    **moving_average(ema_momentum)))
                schedule = f"learning rate {rate:g}"
            # A top on cached features takes a few ms a step: run many steps per call (phase 2
            # on the cached bottom: about 9% more samples/s); not with several replicas, where
            # Keras' loop of steps fails (keras-team/keras#19246).
            many = bool(cached) and strategy.num_replicas_in_sync == 1
            macro_f1 = compile_classifier(
                fit_model, optimizer, loss=loss, task_weights=task_weights,
                auxiliary_weight=auxiliary_weight, jit_compile=jit_compile,
                steps_per_execution=32 if many else 1)
        if cached:
            title += f", on cached {' and '.join(cached)} features"
            if number == 2 and image_frozen and any(m.startswith("image") for m in cached):
                title += " (images: the frozen blocks below the fine-tuned ones)"
        # Epochs of earlier phases; BackupAndRestore resumes inside this one.
        start = sum(1 for phase in state.get("history", {}).get("phase", []) if phase < number)
        logger.info(f"Phase {number}/{len(phases)}: {title}; {phase_epochs} epochs at most, "
                    f"{schedule}, {_count(fit_model.trainable_weights):,} trainable parameters.")
        best = join_path(run_dir, f"checkpoints/phase{number}.weights.h5")
        limit = []
        if budget is not None:  # phase 1 of two gets half of what is left once its data is ready
            ready = time.monotonic()
            share = 0.5 if number < len(phases) else 1.0
            limit = [TimeLimit(ready + share * (started + budget - ready))]
        _build_in_scope(fit_model, train_ds)
        with expected_retracing():
            fit_model.fit(
                train_ds,
                validation_data=val_ds,
                initial_epoch=start,
                epochs=start + phase_epochs,
                callbacks=[*([keras.callbacks.SwapEMAWeights()] if ema_momentum else []),
                           _RecordEpochs(state, state_path, number),
                           *_callbacks(run_dir, number, monitor, patience, best,
                                       _best(state, monitor, number), macro_f1,
                                       describe(model).class_names()),
                           *limit, *callbacks],
                shuffle=False,  # the dataset shuffles itself
                verbose=verbose,
            )
        if limit and limit[0].stopped:
            given = time_limit if isinstance(time_limit, str) else f"{budget:.0f} s"
            logger.info(f"Phase {number} stopped by the time limit ({given}) after "
                        f"{time.monotonic() - started:.0f} s of training.")
        if exists(best):
            fit_model.load_weights(best)
        if clone is not None:
            model.set_weights(clone.get_weights())
        save_atomic(model.save_weights, _phase_weights(run_dir, number))
        state.setdefault("best", {})[str(number)] = _best(state, monitor, number)
        state["phases_done"] = number
        _write_state(state_path, state)
    if state.get("best"):
        best_phase = min(state["best"], key=state["best"].get)
        model.load_weights(_phase_weights(run_dir, best_phase))
    save_atomic(model.save, join_path(run_dir, MODEL_FILE))
    if projector and not is_multi_worker(strategy):  # predict would see one worker's share
        _write_embeddings(model, records.subset("val" if has_val else "train"),
                          join_path(run_dir, LOGS), batch_size)
    return state.get("history", {})


def refit(model, records, run_dir, **kwargs):
    """Trains a model again on the train and val rows together, for the epochs val chose.

    The last step of a refit (as AutoGluon's `refit_full`): `train` has
    trained a model with the same settings in `run_dir`, each phase keeping
    its best epoch on the val split. This trains `model`, built as that one
    was (the same seed, so the same starting weights), on the train and val
    rows as one training split, each phase for as many epochs as it took
    there to reach its best (phase 2 left out where phase 1 ended better),
    in `run_dir/refit`. The model learns from every labelled row; what it
    scores on new data is estimated by the held-out run's val scores, since
    its own val rows are training rows. Val chose the epochs, so nothing
    stops early (the training loss is monitored, as in a run without val).
    It writes no projector embeddings: it has no rows it did not train on
    (the held-out run's projector shows its val rows).

    Args:
        model: a classifier built as the one trained in `run_dir`, untrained.
        records: the `Records` of that run, with a val split.
        run_dir: the folder of the finished `train` run.
        **kwargs: that run's `train` arguments (`epochs` and
            `fine_tune_epochs` are replaced by the chosen ones); pass its
            `cache_dir` so that the frozen features are shared.

    Returns:
        the refit run's history, as `train` returns it.

    Example:

    >>> history = train(model, records, "runs/products", seed=0)  # doctest: +SKIP
    >>> keras.utils.set_random_seed(0)  # doctest: +SKIP
    >>> again = build_classifier_for(records)  # doctest: +SKIP
    >>> refit(again, records, "runs/products", seed=0)  # doctest: +SKIP
    """
    epochs = refit_epochs(_read_state(join_path(run_dir, STATE_FILE)))
    if epochs is None:
        raise ValueError(f"refit() needs a finished train() run with a val split in {run_dir}; "
                         "it retrains for the epochs that run chose on val.")
    if records.prepared is not None:
        raise ValueError("refit() trains on the train and val rows as one split; prepared data "
                         "is read one split at a time. Train from the manifest to refit.")
    merged = records.merge_splits("val", into="train")
    rows = int((merged.splits == "train").sum())
    logger.info(f"Refit on the train and val rows ({rows:,}): phase 1 for {epochs[0]} epochs"
                + (f", phase 2 for {epochs[1]}" if epochs[1] else "") + ", as val chose.")
    return train(model, merged, join_path(run_dir, REFIT_FOLDER),
                 **{**kwargs, "epochs": epochs[0], "fine_tune_epochs": epochs[1],
                    "projector": False})


def refit_epochs(state):
    """`(phase 1 epochs, phase 2 epochs)` to refit a finished run's model for, or `None`.

    Each phase's count is the epoch at which it reached its lowest val loss;
    phase 2's is 0 where phase 1 ended better (the run kept phase 1's
    weights). `None` for a run without val loss or not finished.

    Example:

    >>> history = {"phase": [1, 1, 1, 2, 2], "val_loss": [0.9, 0.5, 0.6, 0.45, 0.4]}
    >>> refit_epochs({"history": history, "best": {"1": 0.5, "2": 0.4}, "phases_done": 2})
    (2, 2)
    >>> refit_epochs({"history": history, "best": {"1": 0.5, "2": 0.7}, "phases_done": 2})
    (2, 0)
    """
    history, best = state.get("history", {}), state.get("best", {})
    if "val_loss" not in history or len(best) != state.get("phases_done"):
        return None
    losses = {}
    for phase, loss in zip(history["phase"], history["val_loss"]):
        losses.setdefault(phase, []).append(loss)
    counts = [int(np.argmin(losses[phase])) + 1 for phase in sorted(losses)]
    if len(counts) == 1 or min(best, key=best.get) == "1":
        return counts[0], 0
    return counts[0], counts[1]


def run_fingerprint(model, records, settings):
    """What a `train` call trains: the model's architecture, the settings and the data.

    In the form of `run_state.fingerprint` (`{"config": ..., "data": ...}`),
    so `run_state.changes` says what differs. The architecture is a digest
    of the model's config without layer names' numbering or trainable flags;
    the data a digest of the records' inputs (images by path, size and
    modification time), labels and splits. `train` keeps it in the run's
    state, and refuses to resume or reuse a run of another one.
    """
    data = hashlib.sha256(records.input_digest().encode())
    for task, names in records.tasks.items():
        data.update(json.dumps([task, names]).encode())
        data.update(np.ascontiguousarray(records.task_labels(task)).tobytes())
    data.update("\0".join(map(str, records.splits)).encode())
    architecture = hashlib.sha256(canonical_config(model, trainable=False).encode())
    config = {"model.architecture": architecture.hexdigest()[:24],
              **{f"training.{name}": value for name, value in settings.items()}}
    return {"config": json.loads(json.dumps(config, sort_keys=True, default=str)),
            "data": {"records": data.hexdigest()[:24]}}


def _class_weights_by_output(model, records, class_weight):
    """`class_weights` of a one-output model, or `{output: them}`, each of its own task."""
    tasks = describe(model).outputs
    if class_weight is None or tasks is None:
        return class_weights(records, class_weight)
    return {name: class_weights(records, class_weight, task) for name, task in tasks.items()}


def _weigh_classes(dataset, weights):
    """Training batches with sample weights: each sample weighs its class's weight.

    As Keras' `fit(class_weight=)` does, but for every output of a model
    with several (each by its own task's classes); validation stays
    unweighted, so early stopping and the best epoch follow the plain loss.
    Batches that already weigh their rows (0 for a row without a label of a
    task, `make_dataset`) keep those weights, times the class weights.
    """
    if weights is None:
        return dataset

    def weigh(labels, by_class):
        labels = tf.maximum(tf.cast(labels, tf.int32), 0)  # -1: no label, weighed 0 already
        return tf.gather(tf.constant(by_class, tf.float32), labels)

    def add(inputs, labels, labelled=None):
        if isinstance(labels, dict):
            weighed = {name: weigh(labels[name], weights[name]) for name in labels}
            if labelled is not None:
                weighed = {name: weighed[name] * labelled[name] for name in labels}
            return inputs, labels, weighed
        return inputs, labels, weigh(labels, weights)

    return dataset.map(add, num_parallel_calls=tf.data.AUTOTUNE)


def class_weights(records, class_weight, task=None):
    """The weight of each class (by class index) that `class_weight` asks for.

    Args:
        records: `Records`; "balanced" counts the classes of its train split.
        class_weight: `None`, `"balanced"`, or a dict of class name -> weight
            (classes left out weigh 1; the main task's classes only).
        task: the task (label column) weighed; default the main one.

    Returns:
        `None` or a list with one weight per class.

    Example:

    >>> from keras_mmtl.data import from_arrays
    >>> records = from_arrays(["a", "a", "a", "b"], texts=["x"] * 4, splits=["train"] * 4)
    >>> class_weights(records, "balanced")
    [0.6666666666666666, 2.0]
    """
    if class_weight is None:
        return None
    task = records.label_name if task is None else task
    names = records.tasks[task]
    if isinstance(class_weight, str):
        if class_weight != "balanced":
            raise ValueError(f"class_weight must be None, 'balanced' or a dict of class name -> "
                             f"weight. Received: class_weight={class_weight!r}")
        labels = records.subset("train").task_labels(task)
        counts = np.bincount(labels[labels >= 0], minlength=len(names))  # -1: no label
        return [float(counts.sum() / (len(names) * max(count, 1))) for count in counts]
    if task != records.label_name:
        raise ValueError(f"A dict of class weights is for the main task ({records.label_name!r}) "
                         f"only; task {task!r} takes class_weight='balanced' or None.")
    check_known(class_weight, names, lambda unknown: (
        f"class_weight names classes {unknown} that the data does not have; its classes: {names}"))
    return [float(class_weight.get(name, 1.0)) for name in names]


def cache_frozen_features(model, records, cache_dir, *, fine_tune_epochs=5, unfreeze_blocks=3,
                          unfreeze_text_layers=0, augment_images=False, augment_text=False):
    """Computes the frozen features that `train` reads, before training.

    `train` (with `cache_features`) computes them itself at the start of
    phase 1: the outputs of the frozen pretrained backbones on the train and
    val splits, and, where phase 2 fine-tunes the image backbone's top
    blocks, the feature map below those blocks, in one pass over the images
    (`cache_whole_from_bottom`). Computed first, they are read by every model
    of the same frozen layers that shares `cache_dir` (the members of an
    ensemble and their image experts), so that the time each one takes is
    spent training: `run_experiment` does this before it gives the members
    their shares of a time limit. Features already cached are kept; branches
    that are augmented (which changes them every step) are not cached.

    Args:
        model: the classifier, as `build_classifier` leaves it (before `train`).
        records: the `Records`.
        cache_dir: the folder of cached features, `train`'s `cache_dir`
            (default `run_dir/cache`).
        fine_tune_epochs, unfreeze_blocks, unfreeze_text_layers,
        augment_images, augment_text: as the `train` call will have them.

    Example:

    >>> cache_frozen_features(model, records, "runs/products/cache")  # doctest: +SKIP
    >>> history = train(model, records, "runs/products")  # doctest: +SKIP
    """
    augment = make_augmentation(image=augment_images, text=augment_text)
    splits = ("train", "val") if (records.splits == "val").any() else ("train",)
    _cache_from_bottom(model, records, splits, cache_dir, augment, fine_tune_epochs,
                       unfreeze_blocks, unfreeze_text_layers)
    extractors, _, _ = split_model(model, exclude=augment)
    for split in splits:
        compute_features(extractors, records, split, cache_dir)


def _cache_from_bottom(model, records, splits, cache_dir, augment, fine_tune_epochs,
                       unfreeze_blocks, unfreeze_text_layers):
    """Phase 1's and phase 2's image features in one pass, where phase 2 fine-tunes the image."""
    if (_two_phase(model, fine_tune_epochs, unfreeze_text_layers) and
            _frozen(model, BACKBONE_NAME) and "image" not in augment):
        cache_whole_from_bottom(
            model, lambda later: _unfreeze(later, unfreeze_blocks, unfreeze_text_layers),
            records, splits, cache_dir)


def _two_phase(model, fine_tune_epochs, unfreeze_text_layers):
    """Whether `train` fine-tunes in a phase 2: a frozen backbone it unfreezes part of."""
    return fine_tune_epochs > 0 and (_frozen(model, BACKBONE_NAME) or (
        _frozen(model, text.TEXT_BACKBONE) and bool(unfreeze_text_layers)))


def _unfreeze(model, image_blocks, text_layers):
    """Unfreezes what phase 2 fine-tunes; returns a title for it."""
    parts = []
    if image_blocks:
        parts.append(f"image backbone blocks {', '.join(unfreeze_top_blocks(model, image_blocks))}")
    if text_layers and _frozen(model, text.TEXT_BACKBONE):
        layers = text.unfreeze_text_layers(model, text_layers)
        parts.append(f"text encoder layers {', '.join(layers)}")
    return f"fine-tuning {' and '.join(parts)}"


def _fit_setup(model, records, run_dir, *, cache, cache_dir, has_val, batch_size, seed,
               augment, shard=None):
    """What a phase fits: `(fit model, its clone or None, train/val data, cached modalities)`.

    With `cache`, the branches that stay frozen in this phase (and are not
    augmented) are read from cached features and a top model sharing a
    clone's layers is fitted.
    """
    if cache and "image" in augment and BACKBONE_NAME in {
            layer.name for layer in model.layers}:
        logger.info("Image augmentation changes the pixels of every step: the image backbone runs "
                    "whole on each batch (its features are not cached).")
    splits = ("train", "val") if has_val else ("train",)
    extractors, top, clone = split_model(model, exclude=augment) if cache else ({}, None, None)
    if not extractors:
        datasets = [make_dataset(records, split, **describe(model).dataset_arguments(),
                                 batch_size=batch_size, seed=seed,
                                 augment=augment if split == "train" else None)
                    for split in splits]
        return model, None, datasets[0], datasets[1] if has_val else None, ()
    cache_dir = cache_dir or join_path(run_dir, "cache")
    spec = describe(model)
    raw = tuple(m for m in spec.modalities if m not in extractors)
    datasets = [make_dataset(records, split, image_size=spec.image_size, modalities=raw,
                             presence=spec.presence, tasks=spec.outputs,
                             batch_size=batch_size, seed=seed,
                             augment=augment if split == "train" else None,
                             features=compute_features(extractors, records, split, cache_dir,
                                                       shard=shard))
                for split in splits]
    return (top, clone, datasets[0], datasets[1] if has_val else None,
            tuple(m for m in spec.modalities if m in extractors))


def _build_in_scope(model, dataset):
    """Readies a compiled model made in a strategy's scope for `fit` with that strategy.

    Two Keras 3 steps fail under tf.distribute (keras-team/keras#20585,
    #20329): `fit` first builds the model from a batch it averages over
    replicas, which fails for batches of several inputs or of strings; and
    with several workers it averages each step's logged values "along axis
    0", which scalars do not have. So the model is built from the dataset's
    element spec here, and under several workers its steps log each value
    with a leading axis of 1.
    """
    strategy = distribute_strategy(model)
    if strategy is None:  # built in no strategy's scope
        return
    with strategy.scope():
        build_from_spec(model, dataset.element_spec)
    if is_multi_worker(strategy):
        cls = type(model)
        model.train_step = lambda data: _with_axis(cls.train_step(model, data))
        model.test_step = lambda data: _with_axis(cls.test_step(model, data))


def _with_axis(logs):
    return {name: keras.ops.reshape(value, (1,)) for name, value in logs.items()}


def _phase_weights(run_dir, phase):
    return join_path(run_dir, f"phase{phase}.weights.h5")


def _frozen(model, name):
    """Whether the model holds layer `name` and it is frozen."""
    return name in {layer.name for layer in model.layers} and not model.get_layer(name).trainable


def _clear_run(run_dir):
    """Forgets an earlier run in `run_dir`: backups, state and checkpoints."""
    for name in ("backup", "checkpoints", STATE_FILE, _phase_weights("", 1),
                 _phase_weights("", 2)):
        remove(join_path(run_dir, name))


def _callbacks(run_dir, phase, monitor, patience, best, best_value, macro_f1, names):
    return [
        AtomicBackupAndRestore(join_path(run_dir, f"backup/phase{phase}")),
        keras.callbacks.TensorBoard(join_path(run_dir, LOGS)),
        ConfusionMatrixImage(macro_f1, join_path(run_dir, LOGS), names),
        BestWeights(best, monitor, best_value),
        keras.callbacks.EarlyStopping(monitor=monitor, patience=patience),
        StopOnNonFiniteLoss(run_dir),
    ]


def _model_hparams(model):
    """What TensorBoard's HParams dashboard shows of a model besides the training settings."""
    layers = {layer.name: layer for layer in model.layers}
    spec = describe(model)
    described = {"inputs": "+".join(spec.modalities), "classes": len(spec.class_names())}
    if spec.multi_output:
        described["tasks"] = "+".join(spec.tasks)
    if BACKBONE_NAME in layers:
        described["image_backbone"] = backbone_network(model).name
    if "fusion" in layers:
        described["fusion"] = type(layers["fusion"]).__name__
    return described


def _write_embeddings(model, records, log_dir, batch_size):
    """The fused embeddings of `records` (a sample of them) for TensorBoard's Projector."""
    if len(records) > PROJECTOR_POINTS:
        keep = np.zeros(len(records), bool)
        keep[np.random.default_rng(0).choice(len(records), PROJECTOR_POINTS, replace=False)] = True
        records = records.select(keep)
    spec = describe(model)
    data = make_dataset(records, **spec.dataset_arguments(), batch_size=batch_size,
                        shuffle=False).map(lambda x, *_: x)
    embeddings = predict_with_progress(embedding_model(model), data, "Embeddings for the projector",
                                       len(records), batch_size)
    names = np.asarray(records.class_names)[records.labels]
    text = {"text": list(records.texts)} if "text" in spec.modalities else None
    write_projector(log_dir, embeddings, names, metadata=text)


def _best(state, monitor, phase):
    """The best (lowest) `monitor` value recorded in `phase`, or infinity."""
    history = state.get("history", {})
    values = [value for value, done in zip(history.get(monitor, []), history.get("phase", []))
              if done == phase]
    return min(values, default=float("inf"))


def _count(weights):
    return sum(int(keras.ops.size(w)) for w in weights)


class _RecordEpochs(keras.callbacks.Callback):
    """Writes each finished epoch's metrics to `state.json`, so a killed run keeps them.

    Entries are keyed by epoch: an epoch run again after a resume replaces
    what an interrupted run recorded for it.
    """

    def __init__(self, state, path, phase):
        super().__init__()
        self.state, self.path, self.phase = state, path, phase

    def on_epoch_end(self, epoch, logs=None):
        history = self.state.setdefault("history", {})
        keep = sum(1 for done in history.get("epoch", []) if done < epoch)
        for values in history.values():
            del values[keep:]
        for key, value in {**(logs or {}), "epoch": epoch, "phase": self.phase}.items():
            history.setdefault(key, []).append(
                value if key in ("epoch", "phase") else float(value))
        _write_state(self.path, self.state)


def _read_state(path):
    return json.loads(read_bytes(path)) if exists(path) else {}


def _write_state(path, state):
    write_json(path, state)
