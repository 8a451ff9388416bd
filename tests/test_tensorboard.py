"""TensorBoard extras: macro-F1, the confusion-matrix image, hparams and projector files."""

import collections
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorboard.plugins import projector
from tensorboard.plugins.hparams import metadata as hp_metadata

from keras_mmtl.training.callbacks import (
    ConfusionMatrixImage,
    confusion_matrix_image,
    write_hparams,
    write_projector,
)
from keras_mmtl.training.metrics import MacroF1

NUM_CLASSES = 3


def summaries(log_dir):
    """What the event files under `log_dir` hold: {subdir: {tag: [(step, Summary.Value)]}}.

    The subdir is relative to `log_dir` ("." for its own files); scalars,
    images and hparams all come as TF2 tensor summaries.
    """
    found = collections.defaultdict(lambda: collections.defaultdict(list))
    for folder, _, files in os.walk(log_dir):
        for name in sorted(files):
            if "tfevents" not in name:
                continue
            for event in tf.compat.v1.train.summary_iterator(os.path.join(folder, name)):
                for value in event.summary.value:
                    found[os.path.relpath(folder, log_dir)][value.tag].append(
                        (event.step, value))
    return found


def numpy_macro_f1(labels, predicted, weights, num_classes):
    """scikit-learn's f1_score(average="macro", labels=<present>), written out."""
    confusion = np.zeros((num_classes, num_classes))
    np.add.at(confusion, (labels, predicted), weights)
    tp, true, pred = np.diag(confusion), confusion.sum(axis=1), confusion.sum(axis=0)
    precision = np.divide(tp, pred, out=np.zeros(num_classes), where=pred > 0)
    recall = np.divide(tp, true, out=np.zeros(num_classes), where=true > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros(num_classes),
                   where=denominator > 0)
    present = (true > 0) | (pred > 0)
    return confusion, f1[present].mean()


def tiny_data(n, seed):
    """Features whose first NUM_CLASSES columns tell the class: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    return x, x[:, :NUM_CLASSES].argmax(axis=1).astype("int32")


def tiny_model(metric):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(NUM_CLASSES,
                                                                    activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy", metric])
    return model


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("weighted", [False, True])
def test_macro_f1_matches_numpy(seed, weighted):
    rng = np.random.default_rng(seed)
    num_classes, n = 6, 64
    labels = rng.integers(0, 4, n)  # classes 4 and 5 never true
    probabilities = rng.dirichlet(np.ones(num_classes), n)
    probabilities[:, 5] = 0  # class 5 never predicted either: left out of the average
    weights = rng.uniform(0.5, 2.0, n) if weighted else np.ones(n)
    metric = MacroF1(num_classes)
    for part in (slice(0, 40), slice(40, n)):  # accumulates over batches
        metric.update_state(labels[part], probabilities[part],
                            sample_weight=weights[part] if weighted else None)
    confusion, expected = numpy_macro_f1(labels, probabilities.argmax(axis=1), weights,
                                         num_classes)
    np.testing.assert_allclose(metric.confusion_matrix, confusion, rtol=1e-5)
    np.testing.assert_allclose(float(metric.result()), expected, rtol=1e-5)


def test_macro_f1_reset_config_and_float16():
    metric = MacroF1(NUM_CLASSES, name="f1")
    metric.update_state(np.array([[0], [2]]), np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]],
                                                      dtype="float16"))
    assert float(metric.result()) == pytest.approx(1.0)
    metric.reset_state()
    assert not metric.confusion_matrix.any() and float(metric.result()) == 0.0

    clone = keras.metrics.deserialize(keras.metrics.serialize(metric))
    assert isinstance(clone, MacroF1)
    assert (clone.num_classes, clone.name) == (NUM_CLASSES, "f1")
    with pytest.raises(ValueError, match=r"shape \(batch, 3\)"):
        metric.update_state([0], [[0.5, 0.5]])


@pytest.mark.parametrize("validation", [True, False])
def test_confusion_at_epoch_end_is_the_validation_one(validation):
    x, y = tiny_data(40, seed=0)
    x_val, y_val = tiny_data(12, seed=1)
    metric = MacroF1(NUM_CLASSES)
    model = tiny_model(metric)
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: seen.append((metric.confusion_matrix, dict(logs))))
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[record],
              validation_data=(x_val, y_val) if validation else None)
    confusion, logs = seen[-1]
    if validation:
        # The last epoch's weights are the final ones: its validation pass is predict's.
        expected, f1 = numpy_macro_f1(y_val, model.predict(x_val, verbose=0).argmax(axis=1),
                                      np.ones(len(y_val)), NUM_CLASSES)
        np.testing.assert_array_equal(confusion, expected)
        assert logs["val_macro_f1"] == pytest.approx(f1, rel=1e-5)
    else:
        assert confusion.sum() == len(y)


def test_tensorboard_logs(tmp_path):
    log_dir = str(tmp_path / "logs")
    x, y = tiny_data(40, seed=0)
    names = ["red", "green", "blue"]
    model = tiny_model(MacroF1(NUM_CLASSES))
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, validation_data=tiny_data(12, seed=1),
              callbacks=[keras.callbacks.TensorBoard(log_dir),
                         ConfusionMatrixImage(None, log_dir, names)])  # finds the metric
    write_hparams(log_dir, {"learning_rate": 0.05, "fusion": "concat", "dims": [4], "x": None})
    texts = [f"sample {i}\twith a tab\nand a newline" for i in range(len(x))]
    write_projector(log_dir, x, [names[label] for label in y], metadata={"text": texts})

    found = summaries(log_dir)
    for subdir in ("train", "validation"):
        assert {"epoch_loss", "epoch_accuracy", "epoch_macro_f1"} <= set(found[subdir])
    assert "epoch_learning_rate" in found["train"]
    assert "confusion_matrix" not in found["train"]
    images = found["validation"]["confusion_matrix"]
    assert [step for step, _ in images] == [0, 1]
    for _, value in images:
        width, height, png = tf.make_ndarray(value.tensor)  # the image plugin's layout
        assert tf.io.decode_png(png).shape == (int(height), int(width), 3)
    assert "_hparams_/session_start_info" in found["."]
    assert "_hparams_/experiment" in found["."]

    config = text_format.Parse(
        open(os.path.join(log_dir, "projector_config.pbtxt"), encoding="utf-8").read(),
        projector.ProjectorConfig())
    (embedding,) = config.embeddings
    assert embedding.tensor_name == "embedding/.ATTRIBUTES/VARIABLE_VALUE"
    with open(os.path.join(log_dir, embedding.metadata_path), encoding="utf-8") as f:
        rows = f.read().splitlines()
    assert rows[0] == "label\ttext" and len(rows) == len(x) + 1
    assert rows[1] == f"{names[y[0]]}\tsample 0 with a tab and a newline"
    # As the Projector reads it: the latest checkpoint in the folder.
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(log_dir))
    np.testing.assert_array_equal(reader.get_tensor(embedding.tensor_name), x)


def test_projector_single_column_and_max_points(tmp_path):
    embeddings = np.arange(20, dtype="float32").reshape(10, 2)
    path = write_projector(str(tmp_path), embeddings, list(range(10)), max_points=4)
    with open(tmp_path / "metadata.tsv", encoding="utf-8") as f:
        labels = [int(row) for row in f.read().splitlines()]  # no header
    kept = tf.train.load_checkpoint(path).get_tensor("embedding/.ATTRIBUTES/VARIABLE_VALUE")
    assert len(labels) == 4
    np.testing.assert_array_equal(kept, embeddings[labels])  # rows match their labels
    with pytest.raises(ValueError, match="one per row"):
        write_projector(str(tmp_path), embeddings, ["a"])


def test_hparams_values(tmp_path):
    hparams = {"rate": np.float32(0.5), "fusion": "gated", "blocks": (2, 3), "cache": True,
               "seed": None, "epochs": 3}
    expected = {"rate": 0.5, "fusion": "gated", "blocks": "(2, 3)", "cache": True,
                "seed": "none", "epochs": 3}
    assert write_hparams(str(tmp_path), hparams) == expected
    found = summaries(str(tmp_path))["."]
    (_, start), = found["_hparams_/session_start_info"]
    info = hp_metadata.parse_session_start_info_plugin_data(start.metadata.plugin_data.content)
    assert {name: getattr(value, value.WhichOneof("kind")) for name, value in
            info.hparams.items()} == expected
    (_, declared), = found["_hparams_/experiment"]
    experiment = hp_metadata.parse_experiment_plugin_data(declared.metadata.plugin_data.content)
    assert {(m.name.group, m.name.tag) for m in experiment.metric_infos} == {
        ("validation", "epoch_accuracy"), ("validation", "epoch_loss"),
        ("validation", "epoch_macro_f1")}


@pytest.mark.parametrize("num_classes", [2, 60])
def test_confusion_image_scales(num_classes):
    confusion = np.eye(num_classes) * 5 + 1
    image = confusion_matrix_image(confusion, [f"class {i}" for i in range(num_classes)])
    assert image.dtype == np.uint8 and image.shape[2] == 3
    assert min(image.shape[:2]) >= (1000 if num_classes == 60 else 300)
