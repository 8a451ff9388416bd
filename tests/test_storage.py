"""Data on TensorFlow's filesystems: a manifest and its images on `ram://`, the in-memory
filesystem standing in for `gs://`, `s3://` or `hdfs://`."""

import os
import uuid

import numpy as np
import pytest
import tensorflow as tf

from conftest import product_rows, write_manifest
from keras_mmtl.data import DataValidationError, make_dataset, read_manifest
from keras_mmtl.export import WARMUP_FILE, export_saved_model, latest_version, predict
from keras_mmtl.files import file_size, file_stamp, folder_of, is_file, join_path, read_bytes
from keras_mmtl.models import build_classifier_for
from keras_mmtl.predictions import predict_manifest


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
