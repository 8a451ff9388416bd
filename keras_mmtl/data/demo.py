"""The bundled demo dataset: product photos and titles where the label needs both."""

import csv
import os

import numpy as np
import tensorflow as tf

from keras_mmtl.data.manifest import stratified_split

COLOURS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200)}
MATERIALS = ("cotton", "leather", "wool")
ITEMS = ("bag", "cap", "scarf", "jacket", "belt", "glove")
BRANDS = ("Nordic", "Urban", "Alpine", "Coastal", "Metro", "Heritage")
STYLES = ("classic", "slim", "vintage", "everyday", "premium", "soft")
SHAPES = ("circle", "square", "triangle")


def make_demo_dataset(directory, num_samples=1200, image_size=64, seed=0):
    """Writes the demo dataset (JPEG files + `manifest.csv`) and returns the manifest path.

    Each sample is a product photo (a coloured object of random shape on a
    noisy background) and a title such as "Alpine slim wool scarf". The
    label is `"<colour> <material>"` (9 classes): the colour is only in the
    photo, the material only in the title, so an image-only or text-only
    model is right about one time in three and a fused model nearly always.
    The data is generated deterministically from `seed` (about 2 MB).

    Args:
        directory: folder to write into (created if needed).
        num_samples: number of products.
        image_size: side of the square images, in pixels.
        seed: the same seed writes the same files.

    Returns:
        path of the manifest, with columns `image`, `title`, `label`, `split`.

    Example:

    >>> import tempfile
    >>> from keras_mmtl.data import read_manifest
    >>> manifest = make_demo_dataset(tempfile.mkdtemp(), num_samples=90)
    >>> len(read_manifest(manifest, text_column="title", split_column="split").class_names)
    9
    """
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(directory, "images")
    os.makedirs(image_dir, exist_ok=True)
    colours = rng.integers(len(COLOURS), size=num_samples)
    materials = rng.integers(len(MATERIALS), size=num_samples)
    labels = colours * len(MATERIALS) + materials
    splits = stratified_split(labels, val_fraction=0.15, test_fraction=0.15, seed=seed)
    colour_names = list(COLOURS)
    rows = []
    for i in range(num_samples):
        image = _draw_product(rng, COLOURS[colour_names[colours[i]]], image_size)
        path = os.path.join("images", f"{i:05d}.jpg")
        tf.io.write_file(os.path.join(directory, path), tf.io.encode_jpeg(image, quality=90))
        title = " ".join([
            str(rng.choice(BRANDS)), str(rng.choice(STYLES)),
            MATERIALS[materials[i]], str(rng.choice(ITEMS)),
        ])
        label = f"{colour_names[colours[i]]} {MATERIALS[materials[i]]}"
        rows.append({"image": path, "title": title, "label": label, "split": splits[i]})
    manifest = os.path.join(directory, "manifest.csv")
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "title", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def _draw_product(rng, colour, size):
    """A coloured shape of random kind, size and place on a noisy light background."""
    background = rng.integers(170, 240, size=3)
    image = background + rng.normal(0, 12, size=(size, size, 3))
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = rng.uniform(0.3, 0.7, size=2) * size
    radius = rng.uniform(0.15, 0.3) * size
    shape = SHAPES[rng.integers(len(SHAPES))]
    if shape == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    elif shape == "square":
        mask = (abs(yy - cy) <= radius) & (abs(xx - cx) <= radius)
    else:
        mask = (yy >= cy - radius) & (yy <= cy + radius) & (
            abs(xx - cx) <= (yy - cy + radius) / 2)
    tint = np.asarray(colour) + rng.normal(0, 20, size=3)
    image[mask] = tint + rng.normal(0, 8, size=(mask.sum(), 3))
    return np.clip(image, 0, 255).astype(np.uint8)
