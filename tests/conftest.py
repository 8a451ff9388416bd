"""Shared fixtures: tiny generated images and manifests with a known answer."""

import csv
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")
FASHION_MANIFEST = os.path.join(SHARED, "data", "fashion", "manifest.csv")
MOBILENET_WEIGHTS = os.path.join(SHARED, "weights", "mobilenet_v2_0.35_imagenet_notop.weights.h5")
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, whichever tests ran before it.

    Without it a test's initial weights depend on the order pytest-xdist deals the
    tests, and a tiny model that learns its task from 9 starts in 10 fails now and then.
    """
    keras.utils.set_random_seed(0)


def random_mobilenet_weights(folder):
    """A MobileNetV2 0.35 weights file like the ImageNet one, random, with BatchNorm statistics.

    Its moving means and variances are not the fresh 0 and 1, so a test can tell them
    from a newly built network's and see any update.
    """
    from keras_mmtl.models import backbone_network, build_image_backbone

    network = backbone_network(build_image_backbone("mobilenet_v2_0.35", None, (32, 32)))
    rng = np.random.default_rng(0)
    for layer in network.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 0.5, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape))
    path = os.path.join(folder, "mobilenet_v2_0.35_random_notop.weights.h5")
    network.save_weights(path)
    return path


def write_image(path, colour, size=16, fmt="jpeg"):
    """Writes a solid-colour image file with a little noise."""
    rng = np.random.default_rng(abs(hash(path)) % 2**32)
    pixels = np.clip(np.asarray(colour) + rng.normal(0, 5, (size, size, 3)), 0, 255)
    pixels = tf.constant(pixels.astype(np.uint8))
    data = tf.io.encode_jpeg(pixels) if fmt == "jpeg" else tf.io.encode_png(pixels)
    tf.io.write_file(path, data)


def claimed_size_jpeg(height, width):
    """An image bomb of a few hundred bytes: a JPEG whose header claims `height` x `width`.

    The decoder fills in the rows its data lacks, so decoding it costs the full size
    (12000 x 12000: 432 MB of uint8); only a check of the header refuses it cheaply.
    """
    data = bytearray(tf.io.encode_jpeg(tf.zeros((8, 8, 3), tf.uint8)).numpy())
    frame = data.index(b"\xff\xc0")  # start of frame: length, precision, height, width
    data[frame + 5:frame + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def write_manifest(folder, rows, name="manifest.csv"):
    """Writes rows (dicts) as a CSV manifest and returns its path."""
    path = os.path.join(folder, name)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def product_rows(folder, n=24):
    """Rows whose label is colour (image) + word (text): needs both modalities."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    rows = []
    for i in range(n):
        colour = list(COLOURS)[i % 2]
        word = ("cotton", "wool")[(i // 2) % 2]
        image = f"images/{i:03d}.jpg"
        write_image(os.path.join(folder, image), COLOURS[colour])
        split = ("train", "train", "train", "train", "val", "test")[(i // 4) % 6]
        rows.append({"image": image, "text": f"a nice {word} thing", "label": f"{colour} {word}",
                     "split": split})
    return rows


@pytest.fixture
def products(tmp_path):
    """A small valid manifest: 24 products, 4 classes, fixed splits."""
    return write_manifest(str(tmp_path), product_rows(str(tmp_path)))


@pytest.fixture
def product_records(products):
    from keras_mmtl.data import read_manifest

    return read_manifest(products, split_column="split")
