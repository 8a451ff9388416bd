import json
import os
import time

import keras
import numpy as np
import pytest

from conftest import MOBILENET_WEIGHTS, random_mobilenet_weights
from keras_mmtl.data import from_arrays
from keras_mmtl.data.pipeline import make_dataset
from keras_mmtl.models import backbone_network, build_classifier_for, describe
from keras_mmtl.training.losses import ClassificationLoss
from keras_mmtl.training import class_weights, setup_precision, train, trainer
from keras_mmtl.training.run_state import StaleRunError, check_run_folder, fingerprint
from keras_mmtl.presets import parse_duration

# A frozen random small CNN stands in for a pretrained backbone: two phases,
# healthy gradients, fast.
SMALL = dict(image_backbone="small_cnn", image_weights=None, image_size=(16, 16),
             freeze_backbone=True)


def _weights(model, layer):
    return [w.copy() for w in backbone_network(model).get_layer(layer).get_weights()]


def _changed(before, after):
    return any(not np.allclose(a, b) for a, b in zip(before, after))


def test_two_phases_train_head_then_top_blocks(tmp_path, product_records):
    # Without a val split the best checkpoint follows training loss, which
    # phase 2 lowers: the final weights are phase 2's.
    records = product_records.select(product_records.splits != "val")
    model = build_classifier_for(records, **SMALL)
    top, bottom = _weights(model, "block4_conv"), _weights(model, "block1_conv")
    head = [w.copy() for w in model.get_layer("head").get_weights()]
    rates = _LearningRateFactors()
    history = train(model, records, str(tmp_path), epochs=2, fine_tune_epochs=2,
                    unfreeze_blocks=2, fine_tune_learning_rate=1e-3, batch_size=8, verbose=0,
                    projector=False, callbacks=[rates])
    assert history["phase"] == [1, 1, 2, 2]
    assert _changed(head, model.get_layer("head").get_weights())
    assert _changed(top, _weights(model, "block4_conv"))
    assert not _changed(bottom, _weights(model, "block1_conv"))
    for name in ("model.keras", "state.json", "phase1.weights.h5", "phase2.weights.h5",
                 "checkpoints/phase2.weights.h5"):
        assert os.path.exists(tmp_path / name)
    assert any(files for _, _, files in os.walk(tmp_path / "logs"))
    # Phase 1 cached the image features and token ids; phase 2 reused the tokens and
    # cached the feature maps below the fine-tuned blocks.
    assert len(os.listdir(tmp_path / "cache")) == 3
    # Layer-wise decay reached the fine-tuned blocks through the top on cached features.
    assert rates.factors == [[], [0.8, 1.0]]


class _LearningRateFactors(keras.callbacks.Callback):
    """Records the distinct learning-rate factors of each phase's optimizer."""

    def __init__(self):
        super().__init__()
        self.factors = []

    def on_train_begin(self, logs=None):
        multipliers = getattr(self.model.optimizer, "learning_rate_multipliers", {})
        self.factors.append(sorted(set(multipliers.values())))


@pytest.mark.slow
def test_fine_tuning_a_pretrained_backbone_keeps_batchnorm_statistics(tmp_path, product_records):
    # The ImageNet weights file of ../shared where it is, else a random file like it.
    weights = (MOBILENET_WEIGHTS if os.path.exists(MOBILENET_WEIGHTS)
               else random_mobilenet_weights(str(tmp_path)))
    records = product_records.select(product_records.splits != "val")
    model = build_classifier_for(records, image_backbone="mobilenet_v2_0.35",
                                 image_weights=weights, image_size=(32, 32))
    assert not model.get_layer("image_backbone").trainable  # a weights file: frozen at first
    top, batchnorm = _weights(model, "Conv_1"), _weights(model, "Conv_1_bn")
    assert np.any(batchnorm[2])  # the file's moving means, not a fresh network's zeros
    train(model, records, str(tmp_path / "run"), epochs=1, fine_tune_epochs=2, unfreeze_blocks=1,
          fine_tune_learning_rate=1e-3, batch_size=8, verbose=0, projector=False)
    assert _changed(top, _weights(model, "Conv_1"))
    assert not _changed(batchnorm, _weights(model, "Conv_1_bn"))


def test_phase_one_alone_leaves_the_backbone_untouched(tmp_path, product_records):
    model = build_classifier_for(product_records, **SMALL)
    before = _weights(model, "block4_conv")
    history = train(model, product_records, str(tmp_path), epochs=2, fine_tune_epochs=0,
                    batch_size=8, verbose=0, projector=False)
    assert history["phase"] == [1, 1]
    assert not _changed(before, _weights(model, "block4_conv"))


def test_random_backbone_trains_in_one_phase(tmp_path, product_records):
    model = build_classifier_for(product_records, **{**SMALL, "freeze_backbone": None})
    history = train(model, product_records, str(tmp_path), epochs=2, batch_size=8, verbose=0,
                    projector=False)
    assert history["phase"] == [1, 1]
    assert not (tmp_path / "logs" / "projector_config.pbtxt").exists()


@pytest.mark.slow
def test_crash_in_phase_two_keeps_phase_one(tmp_path, product_records, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    model = build_classifier_for(product_records, **SMALL)
    monkeypatch.setattr("keras_mmtl.training.trainer.fine_tuning_optimizer", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(model, product_records, str(tmp_path), epochs=2, fine_tune_epochs=1,
              batch_size=8, verbose=0, projector=False)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["phases_done"] == 1 and state["history"]["phase"] == [1, 1]
    monkeypatch.undo()
    fresh = build_classifier_for(product_records, **SMALL)
    history = train(fresh, product_records, str(tmp_path), epochs=2, fine_tune_epochs=1,
                    batch_size=8, verbose=0, projector=False)
    assert history["phase"] == [1, 1, 2]
    again = train(fresh, product_records, str(tmp_path), epochs=2, fine_tune_epochs=1,
                  batch_size=8, verbose=0, projector=False)
    assert again == history


@pytest.mark.parametrize("class_weight, expected", [
    (None, None),
    ("balanced", [0.75, 1.5]),
    ({"b": 3.0}, [1.0, 3.0]),
])
def test_class_weights(class_weight, expected):
    records = from_arrays(["a", "a", "a", "a", "b", "b", "a"], texts=["x"] * 7,
                          splits=["train"] * 6 + ["test"])
    assert class_weights(records, class_weight) == expected


def test_class_weights_weigh_training_only(tmp_path):
    # Validation stays unweighted (as Keras' fit(class_weight=)): early stopping and the
    # best epoch follow the plain loss.
    rows = 40
    labels = ["a"] * 30 + ["b"] * 10
    records = from_arrays(labels, texts=[f"{label} word{i % 4}" for i, label in enumerate(labels)],
                          splits=(["train"] * 3 + ["val"]) * (rows // 4))
    model = build_classifier_for(records, text_encoder="scratch")
    history = train(model, records, str(tmp_path), epochs=1, fine_tune_epochs=0, batch_size=8,
                    class_weight={"b": 5.0}, verbose=0, projector=False)
    model.compile(loss=ClassificationLoss())
    val = make_dataset(records, "val", **describe(model).dataset_arguments(), batch_size=8)
    assert history["val_loss"][-1] == pytest.approx(model.evaluate(val, verbose=0), rel=1e-4)


def test_each_task_is_balanced_by_its_own_classes():
    records = from_arrays({"type": ["a", "a", "a", "b"], "size": ["s", "m", "l", "l"]},
                          texts=["x"] * 4, splits=["train"] * 4)
    assert class_weights(records, "balanced", "type") == [2 / 3, 2.0]
    assert class_weights(records, "balanced", "size") == [2 / 3, 4 / 3, 4 / 3]  # l, m, s
    with pytest.raises(ValueError, match="main task"):
        class_weights(records, {"s": 2.0}, "size")


@pytest.mark.parametrize("options", [{"auxiliary_heads": True}, {}])
def test_class_weights_train_models_with_several_outputs(tmp_path, options):
    # Two tasks of different class counts (and auxiliary heads): each output's
    # loss weighs its own task's classes.
    rows = 24
    records = from_arrays(
        {"type": ["a", "b", "a", "a"] * (rows // 4), "size": ["s", "m", "l", "l", "l", "s"] * 4},
        texts=[f"word{i % 3}" for i in range(rows)], tabular=np.eye(rows, 2, dtype="float32"),
        splits=["train"] * 16 + ["val"] * 8)
    model = build_classifier_for(records, text_encoder="scratch", **options)
    history = train(model, records, str(tmp_path), epochs=1, fine_tune_epochs=0, batch_size=8,
                    class_weight="balanced", verbose=0, projector=False)
    assert np.isfinite(history["loss"]).all()


@pytest.mark.bad_input
@pytest.mark.parametrize("class_weight, message", [("rare", "'balanced'"), ({"c": 2}, "'c'")])
def test_bad_class_weights_are_refused(class_weight, message, product_records):
    with pytest.raises(ValueError, match=message):
        class_weights(product_records, class_weight)


def test_balanced_class_weights_train(tmp_path, product_records):
    model = build_classifier_for(product_records, **SMALL)
    history = train(model, product_records, str(tmp_path), epochs=1, fine_tune_epochs=1,
                    batch_size=8, class_weight="balanced", verbose=0, projector=False)
    assert history["phase"] == [1, 2]


def test_mixed_precision_trains_with_a_float32_head(tmp_path, product_records):
    assert setup_precision("auto") == "float32"  # no GPU here
    try:
        setup_precision("mixed_float16")
        model = build_classifier_for(product_records, **SMALL)
        assert model.get_layer("fusion").compute_dtype == "float16"
        history = train(model, product_records, str(tmp_path), epochs=2, fine_tune_epochs=1,
                        batch_size=8, verbose=0, projector=False)
    finally:
        setup_precision("float32")
    assert np.isfinite(history["loss"]).all() and history["phase"] == [1, 1, 2]
    assert model.output.dtype == "float32"


def test_tensorboard_shows_metrics_learning_rate_confusion_hparams_and_embeddings(
        tmp_path, product_records):
    from test_tensorboard import summaries

    model = build_classifier_for(product_records, **SMALL)
    train(model, product_records, str(tmp_path), epochs=2, fine_tune_epochs=1, batch_size=8,
          verbose=0)
    logs = summaries(str(tmp_path / "logs"))
    for tag in ("epoch_loss", "epoch_accuracy", "epoch_macro_f1", "epoch_learning_rate"):
        assert len(logs["train"][tag]) == 3, tag
    assert [step for step, _ in logs["validation"]["confusion_matrix"]] == [0, 1, 2]
    assert "_hparams_/session_start_info" in logs["."]
    for name in ("projector_config.pbtxt", "metadata.tsv"):
        assert (tmp_path / "logs" / name).exists()
    rows = (tmp_path / "logs" / "metadata.tsv").read_text().splitlines()
    assert rows[0] == "label\ttext" and len(rows) == 1 + (product_records.splits == "val").sum()


@pytest.mark.parametrize("options, cached", [
    (dict(label_smoothing=0.1), 4),
    (dict(focal_gamma=2.0), 4),
    (dict(weight_decay=5.0), 4),  # strong, to show in 3 epochs
    (dict(augment_images=True, augment_text=True), 0),
    (dict(augment_images=True), 2),
])
def test_regularisation_options_train(tmp_path, product_records, options, cached, capsys):
    def fit(run_dir, **settings):
        keras.utils.set_random_seed(3)  # the same initial weights
        model = build_classifier_for(product_records, **SMALL)
        return train(model, product_records, str(run_dir), epochs=3, fine_tune_epochs=0,
                     learning_rate=1e-2, patience=3, batch_size=8, verbose=0, seed=3,
                     **settings, projector=False)["loss"]

    losses = fit(tmp_path, **options)
    assert len(losses) == 3 and all(np.isfinite(losses))
    if not any(name.startswith("augment_") for name in options):
        # The loss's and the optimizer's options change the loss reached. (Augmenting images
        # of uniform colours barely does: their branch left uncached shows them used.)
        plain = fit(tmp_path / "plain")
        assert abs(losses[-1] - plain[-1]) > 0.03, (losses, plain)
    # Augmented branches go through the graph each step: only the others are cached
    # (one file per branch and split).
    cache = tmp_path / "cache"
    assert (len(os.listdir(cache)) if cache.exists() else 0) == cached, capsys.readouterr().out


@pytest.mark.parametrize("ema_momentum", [None, 0.9])
def test_the_weights_kept_are_the_ones_validated(tmp_path, product_records, ema_momentum):
    # With a moving average of the weights, validation scores the average and the
    # best epoch's average is kept: the final model's val loss is the best one logged.
    model = build_classifier_for(product_records, **SMALL)
    history = train(model, product_records, str(tmp_path), epochs=3, fine_tune_epochs=2,
                    learning_rate=1e-2, fine_tune_learning_rate=1e-2, batch_size=8,
                    verbose=0, projector=False, ema_momentum=ema_momentum)
    val = product_records.subset("val")
    data = make_dataset(val, **describe(model).dataset_arguments(), batch_size=8,
                        shuffle=False).map(lambda inputs, *_: inputs)
    probabilities = model.predict(data, verbose=0)
    loss = -np.mean(np.log(probabilities[np.arange(len(val)), val.labels]))
    assert history["phase"] == [1, 1, 1, 2, 2]
    np.testing.assert_allclose(loss, min(history["val_loss"]), rtol=1e-4)


@pytest.mark.parametrize("ema_momentum", [1.5, -0.1])
def test_an_invalid_moving_average_is_refused_before_the_run_folder(tmp_path, product_records,
                                                                     ema_momentum):
    model = build_classifier_for(product_records, **SMALL)
    with pytest.raises(ValueError, match="ema_momentum must be in"):
        train(model, product_records, str(tmp_path / "run"), epochs=1, verbose=0,
              ema_momentum=ema_momentum)
    assert not (tmp_path / "run").exists()


class _SlowEpochs(keras.callbacks.Callback):
    """Makes each training batch take a while, as a big dataset would."""

    def on_train_batch_end(self, batch, logs=None):
        time.sleep(0.05)


@pytest.mark.parametrize("limit, said", [("3s", "3s"), (3.2, "3 s")])
def test_time_limit_stops_training_and_keeps_the_best_epoch(tmp_path, product_records, capsys,
                                                             limit, said):
    model = build_classifier_for(product_records, **SMALL)
    started = time.monotonic()
    history = train(model, product_records, str(tmp_path), epochs=100, fine_tune_epochs=0,
                    patience=100, batch_size=4, time_limit=limit, verbose=0, projector=False,
                    callbacks=[_SlowEpochs()])
    assert 1 <= len(history["epoch"]) < 20  # an epoch takes 0.2-0.4 s here
    assert time.monotonic() - started < 30
    assert f"stopped by the time limit ({said}) after" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "model.keras")


def test_phase_one_has_half_the_time_left_once_its_features_are_computed(
        tmp_path, product_records, monkeypatch):
    deadlines, compute = [], trainer._cache_from_bottom

    class RecordedLimit(trainer.TimeLimit):
        def __init__(self, deadline):
            super().__init__(deadline)
            deadlines.append(deadline)

    def slow_features(*args, **kwargs):  # as a big dataset's would be
        compute(*args, **kwargs)
        time.sleep(2)

    monkeypatch.setattr(trainer, "TimeLimit", RecordedLimit)
    monkeypatch.setattr(trainer, "_cache_from_bottom", slow_features)
    model = build_classifier_for(product_records, **SMALL)
    started = time.monotonic()
    train(model, product_records, str(tmp_path), epochs=1, fine_tune_epochs=1, batch_size=8,
          time_limit=60, verbose=0, projector=False)
    assert len(deadlines) == 2
    # Half of the 58 s or less left after the features, not half of the 60 s from the start.
    assert deadlines[0] >= started + 2 + (60 - 2) / 2
    assert deadlines[1] == pytest.approx(started + 60, abs=1)


@pytest.mark.parametrize("text, seconds", [("15m", 900), ("1h30m", 5400), ("90s", 90),
                                           ("2.5m", 150), (45, 45)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.bad_input
@pytest.mark.parametrize("text", ["", "fast", "-5", 0, "15 minutes"])
def test_parse_duration_rejects_what_is_no_duration(text):
    with pytest.raises(ValueError, match="time limit"):
        parse_duration(text)


def test_a_run_folder_is_reused_only_for_its_fingerprint_and_overwrite_keeps_the_cache(tmp_path):
    run = tmp_path / "run"
    for folder in ("cache", "member1", "logs"):
        (run / folder).mkdir(parents=True)
    (run / "cache" / "train-0123.npz").write_bytes(b"features")
    (run / "state.json").write_text("{}")
    (run / "notes.txt").write_text("the user's own")
    found = fingerprint({"training": {"epochs": 2}, "output": {"run_dir": str(run)}}, {})
    with pytest.raises(StaleRunError, match="no readable fingerprint.json"):  # from before them
        check_run_folder(str(run), found)
    check_run_folder(str(run), found, overwrite=True)
    assert sorted(os.listdir(run)) == ["cache", "fingerprint.json", "notes.txt"]
    (run / "state.json").write_text("{}")
    check_run_folder(str(run), found)  # the same settings: resumed
    assert (run / "state.json").exists()
    other = fingerprint({"training": {"epochs": 3}, "output": {"run_dir": "elsewhere"}}, {})
    with pytest.raises(StaleRunError, match=r"What changed: training.epochs 2 -> 3\. To train"):
        check_run_folder(str(run), other)


def _text_run(labels=("a", "b") * 8, word="shirt", shift=0):
    """A text-only model and its records, the same each call for the same arguments."""
    texts = [f"{word} {i % 3}" for i in range(len(labels))]
    records = from_arrays(list(labels), texts=texts[shift:] + texts[:shift],
                          splits=["train", "train", "train", "val"] * (len(labels) // 4))
    keras.utils.set_random_seed(0)
    return build_classifier_for(records, image_backbone=None), records


@pytest.mark.bad_input
def test_train_refuses_a_run_folder_of_other_data_or_settings(tmp_path):
    run = str(tmp_path / "run")
    train(*_text_run(), run, epochs=1, verbose=0)
    train(*_text_run(), run, epochs=1, verbose=0)  # the same: the finished run is reused
    for changed, settings, said in (
            (_text_run(word="dress"), {}, "model.architecture"),  # another vocabulary
            (_text_run(shift=1), {}, "the data of records"),  # the same words, in other rows
            (_text_run(labels=("a", "b") * 7 + ("b", "a")), {}, "the data of records"),
            (_text_run(), {"learning_rate": 0.01}, "training.learning_rate 0.001 -> 0.01")):
        with pytest.raises(StaleRunError, match=f"neither resume nor be reused.*{said}"):
            train(*changed, run, epochs=1, verbose=0, **settings)
    model, records = _text_run(word="dress")
    train(model, records, run, epochs=1, resume=False, verbose=0)  # cleared, trained again
    train(*_text_run(word="dress"), run, epochs=1, verbose=0)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    del state["fingerprint"]  # a run from before fingerprints: taken as it is
    (tmp_path / "run" / "state.json").write_text(json.dumps(state))
    train(*_text_run(), run, epochs=1, verbose=0)
