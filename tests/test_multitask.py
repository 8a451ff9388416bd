"""Several label columns: one head and loss weight per task, auxiliary heads, evaluation, export."""

import dataclasses
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import product_rows, write_manifest
from keras_mmtl.data import DataValidationError, from_arrays, make_dataset, read_manifest
from keras_mmtl.evaluation import evaluate, modality_report
from keras_mmtl.export import export_saved_model, predict
from keras_mmtl.models import auxiliary_output, build_classifier, build_classifier_for, describe
from keras_mmtl.training import train

SMALL = dict(image_backbone="small_cnn", image_weights=None, image_size=(16, 16))
TASKS = ["colour", "material"]


def task_rows(folder, n=48):
    """Products whose colour only the photo tells and whose material only the title tells."""
    rows = product_rows(folder, n)
    for row in rows:
        row["colour"], row["material"] = row["label"].split()
    return rows


@pytest.fixture
def tasks_manifest(tmp_path):
    return write_manifest(str(tmp_path), task_rows(str(tmp_path)))


@pytest.fixture
def task_records(tasks_manifest):
    return read_manifest(tasks_manifest, label_column=TASKS, split_column="split")


def test_several_label_columns_are_read_as_tasks(task_records):
    assert task_records.label_name == "colour"
    assert task_records.tasks == {"colour": ["blue", "red"], "material": ["cotton", "wool"]}
    np.testing.assert_array_equal(task_records.task_labels("colour"), task_records.labels)
    colours = np.array(task_records.tasks["colour"])[task_records.labels]
    materials = np.array(task_records.tasks["material"])[task_records.task_labels("material")]
    words = [text.split()[2] for text in task_records.texts]
    assert list(materials) == words and len(set(colours)) == 2
    test = task_records.subset("test")
    assert len(test.task_labels("material")) == len(test) == 8


@pytest.mark.bad_input
def test_a_bad_label_in_any_task_names_its_column(tmp_path):
    rows = task_rows(str(tmp_path), 12)
    rows[3]["material"] = ""
    path = write_manifest(str(tmp_path), rows)
    with pytest.raises(DataValidationError, match=r"manifest.csv:5: field 'material': empty label"):
        read_manifest(path, label_column=TASKS, split_column="split")
    with pytest.raises(DataValidationError, match=r"missing column\(s\) \['size'\]"):
        read_manifest(path, label_column=["colour", "size"])
    with pytest.raises(DataValidationError, match=r"field 'material': unknown label 'cotton'"):
        read_manifest(path, label_column=TASKS, split_column="split", skip_bad_rows=False,
                      class_names={"material": ["wool"]})


def test_from_arrays_takes_a_dict_of_tasks():
    records = from_arrays({"kind": [0, 1, 1], "size": ["s", "l", "s"]}, texts=["a", "b", "c"],
                          class_names={"kind": ["cat", "dog"]}, splits=["train"] * 3)
    assert records.tasks == {"kind": ["cat", "dog"], "size": ["l", "s"]}
    assert records.task_labels("size").tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="Expected 3 labels of task 'size'"):
        from_arrays({"kind": ["a"] * 3, "size": ["s"]}, texts=["a", "b", "c"])


@pytest.mark.parametrize("auxiliary", [False, True])
def test_a_multi_task_model_has_one_output_per_task(task_records, auxiliary, tmp_path):
    model = build_classifier_for(task_records, auxiliary_heads=auxiliary, **SMALL)
    aux = [auxiliary_output(t, m) for t in TASKS for m in ("image", "text")] if auxiliary else []
    assert list(model.output) == TASKS + aux
    spec = describe(model)
    assert spec.tasks == task_records.tasks
    assert spec.outputs == {**{t: t for t in TASKS}, **{a: a.split("_")[0] for a in aux}}
    assert spec.class_names() == ["blue", "red"]
    assert spec.class_names("material") == ["cotton", "wool"]
    features, labels = next(iter(make_dataset(task_records, "train", **spec.dataset_arguments())))
    assert sorted(labels) == sorted(model.output)
    for name in aux:  # an auxiliary head learns its task's labels
        np.testing.assert_array_equal(labels[name], labels[name.split("_")[0]])
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    outputs, again = model.predict(features, verbose=0), loaded.predict(features, verbose=0)
    for name in model.output:
        np.testing.assert_allclose(outputs[name], again[name], atol=1e-6)


def test_one_task_with_auxiliary_heads_and_errors():
    model = build_classifier(["a", "b"], image_backbone="small_cnn", image_weights=None,
                             image_size=(16, 16), text_vocabulary=["x"], auxiliary_heads=True)
    assert list(model.output) == ["label", "label_aux_image", "label_aux_text"]
    with pytest.raises(ValueError, match="auxiliary_heads needs two or more inputs"):
        build_classifier(["a", "b"], image_backbone=None, text_vocabulary=["x"],
                         auxiliary_heads=True)
    with pytest.raises(ValueError, match="without '/'"):
        build_classifier({"a/b": ["x", "y"]}, image_backbone=None, text_vocabulary=["x"])


def test_training_learns_every_task_and_weighs_their_losses(task_records, tmp_path):
    model = build_classifier_for(task_records, auxiliary_heads=True, **SMALL)
    with pytest.raises(ValueError, match="task_weights names tasks \\['size'\\]"):
        train(model, task_records, str(tmp_path / "bad"), task_weights={"size": 1.0},
              projector=False)
    untouched = model.get_layer("head_material_aux_image").get_weights()
    history = train(model, task_records, str(tmp_path / "run"), epochs=25, patience=25,
                    learning_rate=3e-3, task_weights={"colour": 2.0}, verbose=0, projector=False)
    for key in ("colour_accuracy", "val_material_accuracy", "material_aux_text_loss"):
        assert len(history[key]) == 25, key
    assert "colour_macro_f1" in history
    # The loss minimised is the weighted sum: auxiliary heads weigh 0.3 times their task.
    weights = {"colour": 2.0, "material": 1.0}
    weighted = sum(weights[name.split("_")[0]] * (1.0 if name in TASKS else 0.3)
                   * history[f"{name}_loss"][-1] for name in model.output)
    assert history["loss"][-1] == pytest.approx(weighted, rel=1e-4)
    reports = evaluate(model, task_records, "test", out_dir=str(tmp_path / "eval"))
    assert set(reports) == set(TASKS)
    assert reports["colour"].accuracy == 1.0 and reports["material"].accuracy == 1.0
    with open(tmp_path / "eval" / "material" / "report.json") as f:
        assert json.load(f)["accuracy"] == 1.0
    # Auxiliary heads learn their task from one modality: material from the text alone.
    trained = model.get_layer("head_material_aux_image").get_weights()
    assert not np.allclose(untouched[0], trained[0])
    report = modality_report(model, task_records, "test", task="material")
    assert report.rows["without image"]["accuracy"] == 1.0
    assert report.rows["without text"]["accuracy"] < 0.8
    # evaluate's reports by task give the scored task's "all inputs" row.
    reports["material"] = dataclasses.replace(reports["material"], accuracy=0.5)
    again = modality_report(model, task_records, "test", task="material", scored=reports)
    assert again.rows["all inputs"]["accuracy"] == 0.5
    assert again.rows["without text"] == report.rows["without text"]


def test_a_zero_task_weight_leaves_that_head_untrained(task_records, tmp_path):
    model = build_classifier_for(task_records, **SMALL)
    before = model.get_layer("head_material").get_weights()
    train(model, task_records, str(tmp_path / "run"), epochs=2, task_weights={"material": 0.0},
          verbose=0, projector=False)
    for old, new in zip(before, model.get_layer("head_material").get_weights()):
        np.testing.assert_array_equal(old, new)


@pytest.mark.slow
def test_the_export_serves_every_task_in_a_fresh_process(task_records, tmp_path):
    model = build_classifier_for(task_records, auxiliary_heads=True, **SMALL)
    test = task_records.subset("test")
    path = export_saved_model(model, str(tmp_path / "saved"))
    images, texts = list(test.images[:4]), list(test.texts[:4])
    expected = predict(model, images=images, texts=texts, top_k=2)
    assert set(expected) == set(TASKS) and len(expected["material"]) == 4
    script = (
        "import json, sys, tensorflow as tf, tensorflow_text\n"
        f"run = tf.saved_model.load({path!r}).signatures['serving_default']\n"
        "images = [open(p, 'rb').read() for p in json.loads(sys.argv[1])]\n"
        "out = run(image=tf.constant(images), text=tf.constant(json.loads(sys.argv[2])))\n"
        "print(json.dumps({k: v.numpy().tolist() for k, v in out.items() if 'prob' in k}))\n")
    served = subprocess.run([sys.executable, "-c", script, json.dumps(images), json.dumps(texts)],
                            capture_output=True, text=True, check=True).stdout.splitlines()[-1]
    served = json.loads(served)
    assert sorted(served) == ["colour_probabilities", "material_probabilities"]
    keras_outputs = model.predict(next(iter(make_dataset(
        test, **describe(model).dataset_arguments(), batch_size=4)))[0], verbose=0)
    for task in TASKS:
        np.testing.assert_allclose(served[f"{task}_probabilities"], keras_outputs[task],
                                   atol=1e-4)
    answered = predict(path, images=images, texts=texts, top_k=2)
    for task in TASKS:
        for got, want in zip(answered[task], expected[task]):
            assert [label for label, _ in got] == [label for label, _ in want]
            np.testing.assert_allclose([p for _, p in got], [p for _, p in want], atol=1e-4)


@pytest.mark.slow
def test_the_cli_trains_evaluates_and_predicts_every_task(tasks_manifest, tmp_path, capsys):
    from keras_mmtl.cli import main
    from keras_mmtl.config import RunConfig

    run_dir, export_dir = tmp_path / "run", tmp_path / "saved"
    data = ["--manifest", tasks_manifest, "--label-column", *TASKS, "--split-column", "split"]
    assert main(["train", *data, "--image-backbone", "small_cnn", "--image-weights", "none",
                 "--image-size", "16x16", "--epochs", "3", "--auxiliary-heads",
                 "--task-weights", "material=0.5", "--fusion", "shared",
                 "--run-dir", str(run_dir), "--export-dir", str(export_dir)]) == 0
    config = RunConfig.from_file(str(run_dir / "config.yaml"))
    assert config.data.label_column == TASKS and config.training.task_weights == {
        "material": 0.5}
    out = capsys.readouterr().out
    assert "== task colour" in out and "== task material" in out
    for task in TASKS:  # calibrated on val by default: the error before and after
        report = json.loads((run_dir / "eval" / task / "report.json").read_text())
        assert report["temperature"] != 1.0 and 0 <= report["ece_uncalibrated"] <= 1
    assert main(["evaluate", "--model", str(run_dir / "model.keras"), *data,
                 "--split", "val"]) == 0
    assert "== task material" in capsys.readouterr().out
    image = os.path.join(os.path.dirname(tasks_manifest), "images", "000.jpg")
    assert main(["predict", "--model", str(export_dir), "--image", image,
                 "--text", "a nice wool thing", "--top-k", "1"]) == 0
    assert sorted(capsys.readouterr().out.splitlines()[::2]) == ["colour:", "material:"]


@pytest.mark.bad_input
def test_domain_transfer_refuses_a_multi_task_model(task_records):
    from keras_mmtl.training import with_new_head

    model = build_classifier_for(task_records, **SMALL)
    with pytest.raises(ValueError, match="Domain transfer adapts a classifier with one output"):
        with_new_head(model, ["a", "b"])


def test_tuning_scores_a_multi_task_model_by_its_main_task(task_records, tmp_path):
    from keras_mmtl.training import tune

    result = tune(task_records, str(tmp_path), max_trials=1, search_space={"dropout": [0.1]},
                  build_kwargs=SMALL, epochs=2, fine_tune_epochs=0, verbose=0)
    with open(os.path.join(result.best_run_dir, "state.json")) as f:
        history = json.load(f)["history"]
    assert result.best_score == max(history["val_colour_accuracy"])
