import dataclasses
import json
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_mmtl.data import from_arrays, make_dataset
from keras_mmtl.evaluation import evaluate
from keras_mmtl.models import (
    backbone_network,
    build_classifier,
    build_classifier_for,
    describe,
    learn_vocabulary,
)
from keras_mmtl.models.heads import GradientReversal
from keras_mmtl.training import (
    ClassificationLoss,
    class_weights,
    joint_records,
    train,
    transfer,
    with_new_head,
)

COLOURS = {"red": (200, 60, 60), "green": (60, 170, 60), "blue": (60, 60, 200)}
MATERIALS = ("cotton", "wool", "leather")
SMALL = dict(image_backbone="small_cnn", image_weights=None, image_size=(16, 16))
TRAINING = dict(epochs=10, fine_tune_epochs=2, batch_size=8, verbose=0)


def _domain(num_train, num_test, seed, brightness=1.0, words=("new", "classic"), prefix="",
            num_val=0):
    """Colour (photo) x material (text) products; the target domain is darker, other words."""
    rng = np.random.default_rng(seed)
    n = num_train + num_val + num_test
    colours = np.arange(n) % 3
    materials = (np.arange(n) // 3) % 3
    pixels = np.array([COLOURS[c] for c in COLOURS])[colours][:, None, None, :] * brightness
    images = np.clip(pixels + rng.normal(0, 40, (n, 16, 16, 3)), 0, 255).astype("uint8")
    texts = [f"{rng.choice(words)} {MATERIALS[m]} item" for m in materials]
    labels = [f"{prefix}{list(COLOURS)[c]} {MATERIALS[m]}" for c, m in zip(colours, materials)]
    splits = ["train"] * num_train + ["val"] * num_val + ["test"] * num_test
    return from_arrays(labels, images=images, texts=texts, splits=splits)


@pytest.fixture(scope="module")
def domains():
    source = _domain(270, 0, seed=0)
    target = _domain(18, 180, seed=1, brightness=0.7, words=("urban", "soft"), prefix="t:")
    vocabulary = learn_vocabulary(list(source.texts) + list(target.subset("train").texts))
    return source, target, vocabulary


def _accuracy(model, records):
    return evaluate(model, records, "test").accuracy


def _logged(run_dir, tag, folder="train"):
    """A value of each epoch, from the run's TensorBoard logs (`folder` train or validation)."""
    folder = os.path.join(run_dir, "logs", folder)
    return [float(tf.make_ndarray(value.tensor)) for name in sorted(os.listdir(folder))
            for event in tf.compat.v1.train.summary_iterator(os.path.join(folder, name))
            for value in event.summary.value if value.tag == tag]


def _domain_losses(run_dir):
    """The domain classifier's training loss of each epoch."""
    return _logged(run_dir, "epoch_domain_loss")


# The domains differ in brightness and in words ("new"/"classic" vs "urban"/"soft"): a
# domain classifier on plain features tells them apart within two epochs (loss near 0).
# Behind gradient reversal the features keep it near chance (ln 2 = 0.69) all along.
CHANCE = math.log(2)


@pytest.mark.slow
def test_source_to_target_transfer_beats_training_on_the_target_alone(tmp_path, domains):
    source, target, vocabulary = domains
    alone = build_classifier(target.class_names, text_vocabulary=vocabulary, **SMALL)
    train(alone, target, str(tmp_path / "alone"), **TRAINING, projector=False)
    model = build_classifier(source.class_names, text_vocabulary=vocabulary, **SMALL)
    adapted = transfer(model, source, target, str(tmp_path / "transfer"), **TRAINING)
    assert describe(adapted).class_names() == target.class_names
    assert not backbone_network(adapted).get_layer("block1_conv").trainable
    baseline, transferred = _accuracy(alone, target), _accuracy(adapted, target)
    assert transferred > 0.8 and transferred > baseline + 0.2, (transferred, baseline)
    reloaded = keras.models.load_model(tmp_path / "transfer" / "target" / "model.keras")
    assert describe(reloaded).class_names() == target.class_names


@pytest.mark.slow
@pytest.mark.parametrize("domain_adversarial", [False, True])
def test_joint_training_adapts_to_the_target(tmp_path, domains, domain_adversarial):
    source, target, vocabulary = domains
    model = build_classifier(source.class_names, text_vocabulary=vocabulary, **SMALL)
    adapted = transfer(model, source, target, str(tmp_path), joint=True, alpha=0.5,
                       domain_adversarial=domain_adversarial, unlabeled=target.subset("test"),
                       epochs=6, batch_size=9, verbose=0)
    assert describe(adapted).class_names() == target.class_names
    assert _accuracy(adapted, target) > 0.8
    # Training accuracy of each head counts the rows labelled for it (half of each batch).
    assert _logged(tmp_path, "epoch_target_accuracy")[-1] > 0.9
    losses = _domain_losses(tmp_path)
    if domain_adversarial:
        assert len(losses) == 6 and min(losses) > 0.6 * CHANCE, losses
    else:
        assert not losses
    reloaded = keras.models.load_model(tmp_path / "model.keras")
    assert describe(reloaded).class_names() == target.class_names


@pytest.mark.slow
def test_joint_training_keeps_the_epoch_best_on_the_target_val_split(tmp_path, domains):
    source, _, vocabulary = domains
    target = _domain(18, 0, seed=1, brightness=0.7, words=("urban", "soft"), prefix="t:",
                     num_val=36)
    # A third of the val labels wrong: the surer the model gets, the higher its val loss
    # climbs after a while, so the best epoch is not the last.
    labels = target.labels.copy()
    wrong = np.flatnonzero(target.splits == "val")[::3]
    labels[wrong] = (labels[wrong] + 1) % len(target.class_names)
    target = dataclasses.replace(target, labels=labels)
    model = build_classifier(source.class_names, text_vocabulary=vocabulary, **SMALL)
    adapted = transfer(model, source, target, str(tmp_path), joint=True, alpha=0.5, epochs=8,
                       learning_rate=3e-3, patience=2, batch_size=9, verbose=0)
    val_losses = _logged(str(tmp_path), "epoch_loss", "validation")
    # Stopped early, after a best epoch that was not the last.
    assert len(val_losses) < 8 and int(np.argmin(val_losses)) < len(val_losses) - 1, val_losses
    # The validation loss is the target classifier's on the target's val rows (weighed by
    # 1 - alpha), and the model returned is the epoch where it was lowest.
    val = target.subset("val")
    (inputs, labels), = make_dataset(val, image_size=SMALL["image_size"], batch_size=len(val))
    loss = ClassificationLoss()(labels, adapted(inputs))  # the loss train minimises
    assert 0.5 * float(loss) == pytest.approx(min(val_losses), rel=1e-3)


@pytest.mark.slow
def test_joint_training_runs_both_phases_of_train_on_cached_features_and_resumes(tmp_path,
                                                                                 domains):
    source, target, vocabulary = domains
    model = build_classifier(source.class_names, text_vocabulary=vocabulary,
                             freeze_backbone=True, **SMALL)
    settings = dict(joint=True, domain_adversarial=True, unlabeled=target.subset("test"),
                    epochs=3, fine_tune_epochs=1, unfreeze_blocks=1, batch_size=9, verbose=0)
    adapted = transfer(model, source, target, str(tmp_path), **settings)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["phases_done"] == 2 and state["history"]["phase"][-1] == 2
    # Phase 1: image features and token ids; phase 2: the maps below the fine-tuned block.
    assert len(os.listdir(tmp_path / "cache")) == 3
    assert _accuracy(adapted, target) > 0.8
    # A second call finds the run finished: it trains nothing and gives the same model.
    epochs = len(_logged(tmp_path, "epoch_loss"))
    again = transfer(model, source, target, str(tmp_path), **settings)
    assert len(_logged(tmp_path, "epoch_loss")) == epochs
    for first, second in zip(adapted.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(first, second)


def test_joint_records_label_each_row_for_its_own_domain_and_balance_them(domains):
    source, target, _ = domains
    unlabeled = target.subset("test")
    joint = joint_records(source, target, unlabeled, domain=True)
    assert list(joint.tasks) == ["target", "source", "domain"]
    train = joint.subset("train")
    domain = train.task_labels("domain")
    # As many target (repeated) and unlabeled (drawn) rows as source rows.
    assert np.bincount(domain).tolist() == [270, 2 * 270]
    assert (train.task_labels("source")[domain == 1] == -1).all()
    assert (train.task_labels("source")[domain == 0] >= 0).all()
    assert (train.labels >= 0).sum() == 270 and sorted(set(train.labels) - {-1}) == list(
        range(len(target.class_names)))
    assert (joint.subset("test").task_labels("domain") == -1).all()
    # Balanced class weights count each task's labelled rows only.
    assert class_weights(joint, "balanced", "source") == class_weights(source, "balanced")
    # Batches weigh each output's unlabelled rows 0; labelled ones 1.
    outputs = {task: task for task in joint.tasks}
    _, labels, weights = next(iter(make_dataset(joint, "train", image_size=(16, 16),
                                                tasks=outputs, batch_size=64)))
    for task in outputs:
        np.testing.assert_array_equal(weights[task], labels[task].numpy() >= 0)


def test_joint_records_refuse_a_target_with_other_inputs(domains):
    source, target, _ = domains
    with pytest.raises(ValueError, match=r"target rows have inputs \('text',\).*same inputs"):
        joint_records(source, dataclasses.replace(target, images=None))


@pytest.mark.slow
def test_unsupervised_adaptation_keeps_the_source_classes(tmp_path, domains):
    source, target, vocabulary = domains
    shifted = _domain(90, 90, seed=2, brightness=0.7, words=("urban", "soft"))
    model = build_classifier(source.class_names, text_vocabulary=vocabulary, **SMALL)
    adapted = transfer(model, source, None, str(tmp_path), joint=True, domain_adversarial=True,
                       unlabeled=shifted.subset("train"), epochs=4, batch_size=16, verbose=0)
    assert describe(adapted).class_names() == source.class_names
    assert _accuracy(adapted, shifted) > 0.5  # its labels were never seen
    losses = _domain_losses(tmp_path)
    assert len(losses) == 4 and min(losses) > 0.6 * CHANCE, losses


@pytest.mark.parametrize("weight", [0.3, 1.0])
def test_gradient_reversal_passes_features_and_reverses_their_gradient(weight):
    layer = GradientReversal(weight)
    x = tf.constant(np.random.default_rng(0).normal(size=(3, 4)), "float32")
    upstream = tf.constant(np.random.default_rng(1).normal(size=(3, 4)), "float32")

    @tf.function  # as in training: traced, not eager
    def forward_and_back(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
        return y, tape.gradient(y, x, output_gradients=upstream)

    y, gradient = forward_and_back(x)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_allclose(gradient, -weight * upstream.numpy(), rtol=1e-6)


def test_new_head_freezes_what_is_asked(product_records):
    model = build_classifier_for(product_records, **SMALL)
    adapted = with_new_head(model, ["x", "y", "z"], freeze=("image_backbone", "fusion"))
    assert adapted.output_shape == (None, 3)
    assert not adapted.get_layer("image_backbone").trainable
    assert not adapted.get_layer("fusion").trainable
    assert adapted.get_layer("text_embedding").trainable
    assert model.get_layer("fusion").trainable  # the source model is untouched
    with pytest.raises(ValueError, match="no such layer"):
        with_new_head(model, ["x"], freeze=("encoder",))


@pytest.mark.parametrize("kwargs, message", [
    (dict(domain_adversarial=True), "joint=True"),
    (dict(joint=True, alpha=1.5), "alpha"),
])
@pytest.mark.bad_input
def test_bad_transfer_settings_are_refused(tmp_path, product_records, kwargs, message):
    model = build_classifier_for(product_records, **SMALL)
    with pytest.raises(ValueError, match=message):
        transfer(model, product_records, product_records, str(tmp_path), **kwargs)
