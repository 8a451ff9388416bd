import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import product_rows, write_manifest
from keras_mmtl.data import from_arrays, make_dataset, read_manifest
from keras_mmtl.data.prepared import PREPARED_FILE, prepare, prepared_dataset, prepared_records


def _rows(dataset):
    """`(images, texts, labels)` of every batch of a dataset, concatenated."""
    batches = list(dataset)
    return (np.concatenate([x["image"].numpy() for x, _ in batches]),
            np.concatenate([x["text"].numpy() for x, _ in batches]),
            np.concatenate([y.numpy() for _, y in batches]))


@pytest.mark.parametrize("shards", [1, 3])
def test_prepared_shards_give_the_batches_make_dataset_gives(product_records, tmp_path, shards):
    folder = str(tmp_path / "prepared")
    info = prepare(product_records, folder, (20, 12), shards=shards)
    assert sorted(os.listdir(folder)) == sorted(
        [PREPARED_FILE] + [name for split in info["splits"].values() for name in split["files"]])
    train = info["splits"]["train"]
    counts = [sum(1 for _ in tf.data.TFRecordDataset(os.path.join(folder, name)))
              for name in train["files"]]
    assert sum(counts) == train["rows"] == 16 and max(counts) - min(counts) <= 1  # dealt evenly
    for split in ("train", "val", "test"):
        expected = _rows(make_dataset(product_records, split, image_size=(20, 12), batch_size=4,
                                      shuffle=False))
        found = _rows(prepared_dataset(folder, split, batch_size=4, shuffle=False))
        assert found[0].dtype == np.uint8 and found[0].shape[1:] == (20, 12, 3)
        for expected_values, found_values in zip(expected, found):
            np.testing.assert_array_equal(found_values, expected_values)


def test_shuffled_prepared_rows_are_the_split_in_a_new_order_each_epoch(tmp_path):
    texts = [f"row {i}" for i in range(40)]
    records = from_arrays(["a", "b"] * 20, texts=texts, images=np.zeros((40, 4, 4, 3), "uint8"),
                          splits=["train"] * 40)
    prepare(records, str(tmp_path), (4, 4), shards=4)
    dataset = prepared_dataset(str(tmp_path), "train", batch_size=8)
    epochs = [_rows(dataset)[1].tolist() for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(t.encode() for t in texts)
    assert epochs[0] != epochs[1] and epochs[0] != [t.encode() for t in texts]
    first_file = [int(text.split()[1]) for text in epochs[0] if int(text.split()[1]) % 4 == 0]
    assert first_file != sorted(first_file)  # rows mixed across files, not only the files


@pytest.mark.bad_input
def test_an_interrupted_prepare_is_not_read(product_records, tmp_path):
    folder = tmp_path / "prepared"
    prepare(product_records, str(folder), (8, 8), shards=2)
    os.remove(folder / PREPARED_FILE)
    with pytest.raises(FileNotFoundError, match="prepared.json is missing.*prepare"):
        prepared_dataset(str(folder), "train")


def test_the_prepare_command_writes_what_prepared_dataset_reads(products, tmp_path, capsys):
    from keras_mmtl.cli import main

    folder = str(tmp_path / "prepared")
    assert main(["prepare", "--manifest", products, "--split-column", "split", "--output",
                 folder, "--image-size", "10x6", "--shards", "2"]) == 0
    assert "Prepared train 16, val 4, test 4 rows" in capsys.readouterr().out
    images, texts, _ = _rows(prepared_dataset(folder, "val", batch_size=8))
    assert images.shape == (4, 10, 6, 3) and len(texts) == 4


def test_rows_without_their_image_are_prepared_as_rows_without_it(tmp_path):
    from keras_mmtl.cli import main

    rows = product_rows(str(tmp_path))
    for row in rows[1::3]:
        row["image"] = ""
    manifest, folder = write_manifest(str(tmp_path), rows), str(tmp_path / "prepared")
    assert main(["prepare", "--manifest", manifest, "--split-column", "split", "--allow-missing",
                 "--output", folder, "--image-size", "10x6", "--shards", "2"]) == 0
    records = read_manifest(manifest, split_column="split", allow_missing=True)
    prepared = prepared_records(folder)
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(prepared.subset(split).present("image"),
                                      records.subset(split).present("image"))
        expected, found = (list(make_dataset(data, split, image_size=(10, 6), batch_size=8,
                                             shuffle=False, presence=("image",)))
                           for data in (records, prepared))
        for (x, y), (x_found, y_found) in zip(expected, found, strict=True):
            for name in ("image", "image_present", "text"):
                np.testing.assert_array_equal(x_found[name].numpy(), x[name].numpy())
            np.testing.assert_array_equal(y_found.numpy(), y.numpy())
    with pytest.raises(ValueError, match="rows have no image.*missing_modalities=True"):
        make_dataset(prepared, "train", image_size=(10, 6))


def test_data_prepared_before_rows_could_lack_an_image_reads_as_every_row_having_it(
        product_records, tmp_path):
    folder = tmp_path / "prepared"
    info = prepare(product_records, str(folder), (8, 8), shards=1)
    for name in info["splits"]["val"]["files"]:  # as older prepare wrote: no "present/image"
        examples = [tf.train.Example.FromString(data.numpy())
                    for data in tf.data.TFRecordDataset(str(folder / name))]
        with tf.io.TFRecordWriter(str(folder / name)) as writer:
            for example in examples:
                del example.features.feature["present/image"]
                writer.write(example.SerializeToString())
    val = prepared_records(str(folder)).subset("val")
    assert val.present("image").all()
    found = _rows(make_dataset(val, image_size=(8, 8), batch_size=4, shuffle=False))
    expected = _rows(make_dataset(product_records, "val", image_size=(8, 8), batch_size=4,
                                  shuffle=False))
    np.testing.assert_array_equal(found[0], expected[0])


@pytest.mark.slow
def test_train_reads_a_prepared_folder_as_a_manifest(products, tmp_path, capsys, recwarn):
    import json

    from keras_mmtl.cli import main

    folder, run_dir = str(tmp_path / "prepared"), tmp_path / "run"
    assert main(["prepare", "--manifest", products, "--split-column", "split", "--output",
                 folder, "--image-size", "16x16", "--shards", "2"]) == 0
    assert main(["train", "--manifest", folder, "--image-backbone", "small_cnn",
                 "--image-weights", "none", "--batch-size", "8", "--epochs", "2",
                 "--fine-tune-epochs", "1", "--no-projector", "--no-modality-experts",
                 "--run-dir", str(run_dir),
                 "--export-dir", str(tmp_path / "saved")]) == 0
    assert "Modality report, without image: 4 rows" in capsys.readouterr().out
    assert not [w for w in recwarn if "ran out of data" in str(w.message)]  # batches counted
    assert "image_size:\n  - 16\n  - 16" in (run_dir / "config.yaml").read_text()
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["num_samples"] == 4 and os.listdir(tmp_path / "saved") == ["1"]


@pytest.mark.parametrize("shard", [None, (1, 3)])
def test_cached_features_of_prepared_rows_are_those_of_the_manifests(product_records, tmp_path,
                                                                    shard):
    from keras_mmtl.models import build_classifier_for
    from keras_mmtl.training.cache import compute_features, split_model

    folder = str(tmp_path / "prepared")
    prepare(product_records, folder, (16, 16), shards=2)
    model = build_classifier_for(product_records, image_backbone="small_cnn",
                                 image_weights=None, image_size=(16, 16), freeze_backbone=True)
    extractors = {"image": split_model(model)[0]["image"]}
    records = {"manifest": product_records, "prepared": prepared_records(folder)}
    if shard:  # a worker's rows: every third from the second
        records = {name: rows.subset("train").select(np.arange(16) % 3 == 1)
                   for name, rows in records.items()}
    features = {name: compute_features(extractors, rows, "train")["image_features"]
                for name, rows in records.items()}
    assert len(features["prepared"]) == (5 if shard else 16)
    np.testing.assert_allclose(features["prepared"], features["manifest"], atol=1e-6)


@pytest.mark.parametrize("source, shard", [("manifest", False), ("prepared", False),
                                           ("prepared", True)])
def test_n_gram_counts_given_as_features_come_with_their_rows(product_records, tmp_path, source,
                                                              shard):
    # Augmented images are read raw beside the n-gram counts computed before training (sparse).
    from keras_mmtl.models import build_classifier_for
    from keras_mmtl.training.cache import compute_features, split_model

    folder = str(tmp_path / "prepared")
    prepare(product_records, folder, (16, 16), shards=2)
    model = build_classifier_for(product_records, image_backbone="small_cnn", image_weights=None,
                                 image_size=(16, 16), text_encoder="ngrams")
    extractor = split_model(model, exclude=("image",))[0]["text"]
    rows = (product_records if source == "manifest" else prepared_records(folder)).subset("train")
    if shard:  # a worker's rows: every third from the second
        rows = rows.select(np.arange(16) % 3 == 1)
    features = compute_features({"text": extractor}, rows, "train")
    seen = 0
    for inputs, _ in make_dataset(rows, image_size=(16, 16), batch_size=4, shuffle=True, seed=1,
                                  features=features):
        for name, counts in extractor({"text": inputs["text"]}).items():  # the row's own text's
            np.testing.assert_array_equal(tf.sparse.to_dense(inputs[name]).numpy(),
                                          tf.sparse.to_dense(counts).numpy())
        seen += len(inputs["text"])
    assert seen == len(rows) == (5 if shard else 16)


def test_a_model_of_another_image_size_is_told_to_prepare_again(product_records, tmp_path):
    folder = str(tmp_path / "prepared")
    prepare(product_records, folder, (16, 16), shards=2)
    with pytest.raises(ValueError, match="prepared at 16x16; the model takes 32x32.*"
                                         "--image-size 32x32"):
        make_dataset(prepared_records(folder), "train", image_size=(32, 32))


def test_prepared_rows_made_to_lack_their_image_come_black_and_absent(product_records, tmp_path):
    folder = str(tmp_path / "prepared")
    prepare(product_records, folder, (8, 8), shards=2)
    val = prepared_records(folder).subset("val")
    lacking = val.without("image", np.array([True, False, True, False]))
    batch, _ = next(iter(make_dataset(lacking, image_size=(8, 8), batch_size=4, shuffle=False,
                                      presence=("image",))))
    whole, _ = next(iter(make_dataset(val, image_size=(8, 8), batch_size=4, shuffle=False)))
    assert batch["image_present"].numpy().tolist() == [0, 1, 0, 1]
    assert not batch["image"].numpy()[[0, 2]].any()
    np.testing.assert_array_equal(batch["image"].numpy()[[1, 3]], whole["image"].numpy()[[1, 3]])
    assert whole["image"].numpy()[[0, 2]].any()


@pytest.mark.bad_input
def test_prepared_data_refuses_a_models_other_classes(product_records, tmp_path):
    folder = str(tmp_path / "prepared")
    prepare(product_records, folder, (8, 8), shards=1)
    with pytest.raises(ValueError, match="model's classes differ.*Prepare the data again"):
        prepared_records(folder, class_names=["blue cotton", "red wool"])


def test_the_input_digest_of_prepared_rows_sees_a_replaced_shard(product_records, tmp_path):
    folder = tmp_path / "prepared"
    info = prepare(product_records, str(folder), (8, 8), shards=2)
    before = prepared_records(str(folder)).input_digest()
    assert prepared_records(str(folder)).input_digest() == before
    os.utime(folder / info["splits"]["val"]["files"][0], ns=(1, 1))
    assert prepared_records(str(folder)).input_digest() != before
