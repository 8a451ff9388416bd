"""Two-phase transfer learning: train the head on a frozen backbone, then fine-tune its top."""

import json
import os
import shutil

import keras

from keras_mmtl.data.pipeline import make_dataset
from keras_mmtl.models.backbones import BACKBONE_NAME, unfreeze_top_blocks
from keras_mmtl.models.builder import image_size, model_modalities

STATE_FILE = "state.json"
PHASE1_WEIGHTS = "phase1.weights.h5"
BEST_WEIGHTS = os.path.join("checkpoints", "best.weights.h5")
MODEL_FILE = "model.keras"


def compile_classifier(model, learning_rate):
    """Compiles a classifier with Adam, sparse cross-entropy and accuracy."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )


def train(
    model,
    records,
    run_dir,
    *,
    epochs=10,
    fine_tune_epochs=5,
    learning_rate=1e-3,
    fine_tune_learning_rate=1e-4,
    unfreeze_blocks=3,
    batch_size=32,
    patience=3,
    resume=True,
    seed=0,
    verbose="auto",
):
    """Trains a classifier the way transfer learning is done, in two phases.

    Phase 1 trains everything but the image backbone, which stays frozen
    (as `build_classifier` leaves a pretrained one). Phase 2 unfreezes the backbone's top `unfreeze_blocks` blocks (BatchNorm
    stays frozen, in inference mode) and goes on at `fine_tune_learning_rate`.
    Each phase stops early when validation loss stops improving; at the end
    the model holds the weights of the best validation epoch of either phase.

    Everything lands in `run_dir`: TensorBoard logs (`logs/`), the best
    checkpoint (`checkpoints/best.weights.h5`), the final model
    (`model.keras`) and `state.json`. A run that was interrupted resumes from
    its last finished epoch when called again with the same `run_dir`.

    Args:
        model: a classifier from `keras_mmtl.models.build_classifier`.
        records: `keras_mmtl.data.Records` with train (and val) splits.
        run_dir: folder of this run.
        epochs: maximum epochs of phase 1.
        fine_tune_epochs: maximum epochs of phase 2 (0 skips it; models
            without a frozen image backbone have no phase 2).
        learning_rate: Adam learning rate of phase 1.
        fine_tune_learning_rate: Adam learning rate of phase 2, lower so the
            pretrained features are adjusted, not overwritten.
        unfreeze_blocks: top backbone blocks to train in phase 2, or `"all"`.
        batch_size: samples per batch.
        patience: epochs without validation improvement before a phase stops.
        resume: continue an interrupted run found in `run_dir`.
        seed: seed of shuffling and weight initialisation.
        verbose: Keras progress output (`"auto"`, 0, 1, 2).

    Returns:
        dict of per-epoch metric lists over both phases (`loss`, `accuracy`,
        `val_loss`, `val_accuracy`, `phase`).

    Example:

    >>> history = train(model, records, "runs/products", epochs=5)  # doctest: +SKIP
    """
    keras.utils.set_random_seed(seed)
    os.makedirs(run_dir, exist_ok=True)
    state_path = os.path.join(run_dir, STATE_FILE)
    if not resume:
        _clear_run(run_dir)
    state = _read_state(state_path)
    datasets = _datasets(model, records, batch_size, seed)
    monitor = "val_loss" if datasets[1] is not None else "loss"
    backbone = _image_backbone(model)
    # Two phases when the model starts with a frozen backbone; a backbone
    # that trains from the start (random weights) needs only one.
    two_phase = backbone is not None and not backbone.trainable and fine_tune_epochs > 0
    phases = [("frozen backbone" if backbone is not None and not backbone.trainable
               else "all layers", epochs, learning_rate)]
    if two_phase:
        phases.append((None, fine_tune_epochs, fine_tune_learning_rate))
    if state.get("phases_done", 0) >= len(phases):
        print(f"The run in {run_dir} is finished; loading its best weights "
              "(resume=False trains again).")
    for number, (title, phase_epochs, rate) in enumerate(phases, start=1):
        if number == 2:
            unfrozen = unfreeze_top_blocks(model, unfreeze_blocks)
            title = f"fine-tuning backbone blocks {', '.join(unfrozen)}"
        if state.get("phases_done", 0) >= number:
            continue
        if number == 2 and os.path.exists(os.path.join(run_dir, PHASE1_WEIGHTS)):
            model.load_weights(os.path.join(run_dir, PHASE1_WEIGHTS))
        compile_classifier(model, rate)
        start = len(state.get("history", {}).get("loss", []))
        print(f"Phase {number}/{len(phases)}: {title}; {phase_epochs} epochs at most, "
              f"learning rate {rate:g}, {_count(model.trainable_weights):,} trainable "
              f"parameters.")
        history = model.fit(
            datasets[0],
            validation_data=datasets[1],
            initial_epoch=start,
            epochs=start + phase_epochs,
            callbacks=_callbacks(run_dir, number, monitor, patience, state.get("best")),
            shuffle=False,  # the dataset shuffles itself
            verbose=verbose,
        )
        _append_history(state, history.history, number)
        state["best"] = min(state["history"][monitor])
        if number == 1 and two_phase:
            _save_atomic(model.save_weights, os.path.join(run_dir, PHASE1_WEIGHTS))
        state["phases_done"] = number
        _write_state(state_path, state)
    best = os.path.join(run_dir, BEST_WEIGHTS)
    if os.path.exists(best):
        model.load_weights(best)
    _save_atomic(model.save, os.path.join(run_dir, MODEL_FILE))
    return state.get("history", {})


def _image_backbone(model):
    names = [layer.name for layer in model.layers]
    return model.get_layer(BACKBONE_NAME) if BACKBONE_NAME in names else None


def _clear_run(run_dir):
    """Forgets an earlier run in `run_dir`: backups, state and checkpoints."""
    for name in ("backup", "checkpoints"):
        shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
    for name in (STATE_FILE, PHASE1_WEIGHTS):
        if os.path.exists(os.path.join(run_dir, name)):
            os.remove(os.path.join(run_dir, name))


def _datasets(model, records, batch_size, seed):
    kwargs = dict(image_size=image_size(model), modalities=model_modalities(model),
                  batch_size=batch_size, seed=seed)
    train_ds = make_dataset(records, "train", **kwargs)
    has_val = (records.splits == "val").any()
    return train_ds, make_dataset(records, "val", **kwargs) if has_val else None


def _callbacks(run_dir, phase, monitor, patience, best):
    checkpoint = keras.callbacks.ModelCheckpoint(
        os.path.join(run_dir, BEST_WEIGHTS), monitor=monitor, save_best_only=True,
        save_weights_only=True, initial_value_threshold=best)
    return [
        keras.callbacks.BackupAndRestore(os.path.join(run_dir, "backup", f"phase{phase}")),
        keras.callbacks.TensorBoard(os.path.join(run_dir, "logs")),
        checkpoint,
        keras.callbacks.EarlyStopping(monitor=monitor, patience=patience),
        keras.callbacks.TerminateOnNaN(),
    ]


def _count(weights):
    return sum(int(keras.ops.size(w)) for w in weights)


def _append_history(state, history, phase):
    merged = state.setdefault("history", {})
    epochs = len(next(iter(history.values()), []))
    for key, values in history.items():
        merged.setdefault(key, []).extend(float(v) for v in values)
    merged.setdefault("phase", []).extend([phase] * epochs)


def _read_state(path):
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_state(path, state):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2)
    _save_atomic(write, path)


def _save_atomic(save, path):
    """Calls `save(tmp_path)`, then renames into place: never a half-written file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    base, name = os.path.split(path)
    tmp = os.path.join(base, f".tmp-{name}")
    save(tmp)
    os.replace(tmp, path)
