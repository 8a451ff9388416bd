"""Data on TensorFlow's filesystems: a manifest and its images on `ram://`, the in-memory
filesystem standing in for `gs://`, `s3://` or `hdfs://`."""

import json
import os
import uuid

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import product_rows, write_manifest

from keras_mmtl.data import (
    DataValidationError,
    from_arrays,
    make_dataset,
    read_manifest,
)
from keras_mmtl.export import WARMUP_FILE, export_saved_model, latest_version, predict
from keras_mmtl.files import (
    file_size,
    file_stamp,
    folder_of,
    is_file,
    join_path,
    read_bytes,
)
from keras_mmtl.models import build_classifier_for
from keras_mmtl.predictions import predict_manifest
from keras_mmtl.training import train


@pytest.fixture
def remote(tmp_path):
    """The products manifest and its images copied to a fresh `ram://` folder; its path."""
    local = write_manifest(str(tmp_path), product_rows(str(tmp_path)))
    folder = f"ram://data-{uuid.uuid4().hex}"
    tf.io.gfile.makedirs(f"{folder}/images")
    for name in os.listdir(tmp_path / "images"):
        tf.io.gfile.copy(str(tmp_path / "images" / name), f"{folder}/images/{name}")
    tf.io.gfile.copy(local, f"{folder}/manifest.csv")
    return f"{folder}/manifest.csv", local


def test_files_on_a_remote_filesystem(remote):
    path, local = remote
    assert is_file(path) and not is_file(folder_of(path)) and not is_file(path + ".missing")
    assert read_bytes(path) == open(local, "rb").read() and file_size(path) == os.path.getsize(local)
    assert file_stamp(path)[0] == file_size(path)
    assert join_path(folder_of(path), "images/000.jpg") == path.replace("manifest.csv",
                                                                         "images/000.jpg")
    with pytest.raises(FileNotFoundError):
        read_bytes(path + ".missing")


def test_a_remote_manifest_reads_and_decodes_like_a_local_one(remote):
    path, local = remote
    records, here = read_manifest(path, split_column="split"), read_manifest(local,
                                                                             split_column="split")
    assert all(image.startswith("ram://") for image in records.images)
    assert records.class_names == here.class_names
    np.testing.assert_array_equal(records.labels, here.labels)
    (batch, _), = make_dataset(records, image_size=(16, 16), batch_size=len(records))
    (same, _), = make_dataset(here, image_size=(16, 16), batch_size=len(here))
    np.testing.assert_array_equal(batch["image"], same["image"])
    # The digest that keys the feature cache and the run fingerprint sees a replaced image.
    before = records.input_digest()
    tf.io.gfile.copy(records.images[1], records.images[0], overwrite=True)
    assert records.input_digest() != before


@pytest.mark.bad_input
def test_a_remote_image_that_is_missing_or_outside_the_root_is_a_bad_row(remote):
    path, _ = remote
    folder = folder_of(path)
    tf.io.gfile.remove(f"{folder}/images/003.jpg")
    with pytest.raises(DataValidationError, match=r"manifest.csv:5: .*image file not found"):
        read_manifest(path, split_column="split")
    records = read_manifest(path, split_column="split", skip_bad_rows=True,
                            allowed_root=f"{folder}/images")
    assert len(records) == 23
    with pytest.raises(DataValidationError, match="leaves the data root"):
        read_manifest(path, split_column="split", allowed_root=f"{folder}/other")


def test_batch_prediction_reads_a_remote_manifest(remote, tmp_path):
    path, local = remote
    records = read_manifest(local, split_column="split")
    model = build_classifier_for(records, image_backbone="small_cnn", image_weights=None,
                                 image_size=(16, 16))
    far = predict_manifest(model, path, str(tmp_path / "far.csv"))
    near = predict_manifest(model, local, str(tmp_path / "near.csv"))
    assert far.rows == near.rows == 24 and far.failed == 0
    assert open(tmp_path / "far.csv").read() == open(tmp_path / "near.csv").read()


def test_exports_to_remote_storage_land_whole_as_numbered_versions(remote, tmp_path,
                                                                   monkeypatch):
    path, local = remote
    records = read_manifest(local, split_column="split")
    model = build_classifier_for(records, image_backbone="small_cnn", image_weights=None,
                                 image_size=(16, 16))
    base = f"{folder_of(path)}/saved_models/products"
    copied, copy = [], tf.io.gfile.copy
    monkeypatch.setattr(tf.io.gfile, "copy", lambda source, target, overwrite=False: (
        copied.append(target), copy(source, target, overwrite)))
    first, second = export_saved_model(model, base), export_saved_model(model, base)
    # saved_model.pb, what makes a folder a SavedModel to a server polling it, comes last.
    assert copied[-1] == f"{second}/saved_model.pb" and len(copied) > 4
    assert (first, second) == (f"{base}/1", f"{base}/2") and latest_version(base) == second
    local_export = export_saved_model(model, str(tmp_path / "products"))
    def files(folder):  # (ram:// lists "assets/.extra" beside "assets.extra/": not a file)
        return sorted(os.path.relpath(os.path.join(parent, name), folder).replace(os.sep, "/")
                      for parent, _, names in tf.io.gfile.walk(folder) for name in names
                      if is_file(join_path(parent, name)))

    assert files(second) == files(local_export) and WARMUP_FILE in files(second)
    image = read_bytes(records.images[0])
    far, near = (predict(where, images=[image], texts=["red cotton"], top_k=3)[0]
                 for where in (base, local_export))
    assert [label for label, _ in far] == [label for label, _ in near]
    np.testing.assert_allclose([p for _, p in far], [p for _, p in near], atol=1e-6)
    with pytest.raises(FileExistsError, match="never overwritten"):
        export_saved_model(model, base, version=2)


def test_a_remote_export_that_fails_midway_leaves_no_version(remote, monkeypatch):
    path, local = remote
    model = build_classifier_for(read_manifest(local, split_column="split"),
                                 image_backbone="small_cnn", image_weights=None,
                                 image_size=(16, 16))
    base = f"{folder_of(path)}/saved_models/products"
    copied, copy = [], tf.io.gfile.copy

    def failing_copy(source, target, overwrite=False):
        if len(copied) == 3:
            raise tf.errors.UnavailableError(None, None, "connection reset")
        copied.append(target)
        copy(source, target, overwrite)

    monkeypatch.setattr(tf.io.gfile, "copy", failing_copy)
    with pytest.raises(tf.errors.UnavailableError):
        export_saved_model(model, base)
    assert len(copied) == 3 and not tf.io.gfile.exists(f"{base}/1")
    monkeypatch.setattr(tf.io.gfile, "copy", copy)
    assert export_saved_model(model, base) == f"{base}/1"


@pytest.mark.parametrize("where", ["local", "remote"])
def test_the_newest_version_is_the_newest_whole_one(where, tmp_path):
    # A process killed while copying version 3 to remote storage leaves it without
    # saved_model.pb (copied last): predicting from the model folder uses version 2.
    base = (str(tmp_path / "products") if where == "local"
            else f"ram://models-{uuid.uuid4().hex}/products")
    for version, files in ((1, ["saved_model.pb"]), (2, ["saved_model.pb"]),
                           (3, ["variables/variables.index", "fingerprint.pb"])):
        for name in files:
            tf.io.gfile.makedirs(folder_of(f"{base}/{version}/{name}"))
            with tf.io.gfile.GFile(f"{base}/{version}/{name}", "wb") as f:
                f.write(b"x")
    assert latest_version(base) == f"{base}/2"
    tf.io.gfile.rmtree(f"{base}/1")
    tf.io.gfile.remove(f"{base}/2/saved_model.pb")
    with pytest.raises(FileNotFoundError, match="holding one"):
        latest_version(base)


class _Stop(Exception):
    """A run interrupted on purpose."""


class _Epochs(keras.callbacks.Callback):
    """Records the epochs begun; with `stop_after`, interrupts the run at that epoch's end."""

    def __init__(self, stop_after=None):
        super().__init__()
        self.begun, self.stop_after = [], stop_after

    def on_epoch_begin(self, epoch, logs=None):
        self.begun.append(epoch)

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.stop_after:
            raise _Stop()


def test_a_run_folder_on_remote_storage_resumes_then_is_reused():
    rng = np.random.default_rng(0)
    records = from_arrays(["a", "b"] * 16, images=rng.integers(0, 255, (32, 16, 16, 3), "uint8"),
                          texts=["red", "blue"] * 16, splits=["train"] * 24 + ["val"] * 8)
    run_dir = f"ram://run-{uuid.uuid4().hex}"

    def run(epochs):
        keras.utils.set_random_seed(0)
        model = build_classifier_for(records, image_backbone="small_cnn", image_weights=None,
                                     image_size=(16, 16), freeze_backbone=True)
        train(model, records, run_dir, epochs=3, fine_tune_epochs=1, batch_size=8, patience=10,
              callbacks=[epochs], verbose=0)
        return model

    with pytest.raises(_Stop):
        run(_Epochs(stop_after=1))
    assert not is_file(join_path(run_dir, "model.keras"))
    resumed = _Epochs()
    model = run(resumed)
    assert resumed.begun == [2, 3]  # epochs 1 and 2 kept; then the fine-tuning epoch
    state = json.loads(read_bytes(join_path(run_dir, "state.json")))
    assert state["phases_done"] == 2 and state["history"]["epoch"] == [0, 1, 2, 3]
    assert tf.io.gfile.listdir(join_path(run_dir, "cache"))  # the feature cache, there too
    reused = _Epochs()
    again = run(reused)
    assert reused.begun == []
    for weight, same in zip(model.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(weight, same)


@pytest.mark.slow
def test_train_writes_its_whole_run_folder_to_remote_storage_and_reuses_it(
        remote, tmp_path, monkeypatch, capsys):
    from keras_mmtl.cli import main

    monkeypatch.chdir(tmp_path)  # where a remote path taken for a local one would land
    run_dir = f"ram://run-{uuid.uuid4().hex}"
    common = ["--image-backbone", "small_cnn", "--image-weights", "none", "--image-size",
              "16x16", "--batch-size", "8", "--epochs", "2", "--fine-tune-epochs", "1",
              "--run-dir", run_dir, "--export-dir", f"{run_dir}-saved"]
    assert main(["train", "--manifest", remote[0], "--split-column", "split", *common]) == 0
    eval_files = tf.io.gfile.listdir(join_path(run_dir, "eval"))
    assert {"report.json", "per_class.csv", "confusion_matrix.png", "modalities.json"} <= set(
        eval_files)
    capsys.readouterr()
    assert main(["train", "--config", join_path(run_dir, "config.yaml")]) == 0
    assert f"The run in {run_dir}/member1 is finished" in capsys.readouterr().out
    assert main(["train", "--manifest", remote[0], "--split-column", "split", *common,
                 "--learning-rate", "0.01"]) == 2
    assert "training.learning_rate 0.001 -> 0.01" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "ram:")
