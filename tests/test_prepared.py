import os

import numpy as np
import pytest
import tensorflow as tf

from keras_mmtl.data import from_arrays, make_dataset
from keras_mmtl.data.prepared import PREPARED_FILE, prepare, prepared_dataset


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
    dataset = prepared_dataset(str(tmp_path), "train", batch_size=8, shuffle_buffer=16)
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
