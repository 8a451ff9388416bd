"""Image backbone registry: constructor, preprocessing, input size, unfreeze blocks."""

import dataclasses
import os
import re

import keras

from keras_mmtl.keras_internals import history, inbound_nodes

BACKBONE_NAME = "image_backbone"


class WeightsUnavailableError(RuntimeError):
    """Raised when pretrained weights can be neither found locally nor downloaded."""


@dataclasses.dataclass(frozen=True)
class ImageBackbone:
    """One registered `keras.applications` backbone.

    Attributes:
        constructor: a `keras.applications`-style function taking
            `include_top`, `weights`, `input_shape` and `pooling`.
        kwargs: extra constructor arguments (e.g. `alpha`).
        scale_to_unit_range: the network expects pixels in [-1, 1] (the
            model then holds a `Rescaling` layer); otherwise it takes
            [0, 255] and preprocesses inside itself.
        image_size: the `(height, width)` its ImageNet weights were trained at.
        block_pattern: regex whose group 1 names the block of a layer; layers
            that do not match belong to the block before them. Used to
            unfreeze the top blocks for fine-tuning.
    """

    constructor: object
    kwargs: dict
    scale_to_unit_range: bool
    image_size: tuple
    block_pattern: str


def small_cnn(include_top=False, weights=None, input_shape=(64, 64, 3), pooling="avg"):
    """A small convolutional network for training from scratch (no pretrained weights).

    Four blocks of a 3x3 convolution and a max-pool (32 to 256 filters),
    then global average pooling: what a tutorial builds when it has no
    pretrained backbone, and the image branch of choice offline. It has no
    BatchNormalization, so it behaves the same in training and inference
    from the first epoch.
    """
    if include_top or pooling != "avg":
        raise ValueError("small_cnn is built headless with average pooling only.")
    if weights is not None:
        raise ValueError(
            f"small_cnn has no pretrained weights; pass image_weights=None. Received: {weights!r}")
    inputs = keras.Input(input_shape)
    x = inputs
    for block, filters in enumerate((32, 64, 128, 256), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu",
                                name=f"block{block}_conv")(x)
        x = keras.layers.MaxPooling2D(name=f"block{block}_pool")(x)
    outputs = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, outputs, name="small_cnn")


_MOBILENET_V2 = r"^(Conv1|expanded_conv|block_\d+|Conv_1)(?:_|$)"
_MOBILENET_V3 = r"^(conv_1|expanded_conv(?:_\d+)?|conv)(?:_|$)"
_EFFICIENTNET = r"^(stem|block\d+[a-z]|top)(?:_|$)"
_RESNET_V2 = r"^(conv1|conv\d_block\d+|post)(?:_|$)"
_CONVNEXT = r"^convnext_[a-z]+_(stem|downsampling_block_\d+|stage_\d+_block_\d+)"
_SMALL_CNN = r"^(block\d+)_"
apps = keras.applications

BACKBONES = {
    "mobilenet_v2": ImageBackbone(apps.MobileNetV2, {}, True, (224, 224), _MOBILENET_V2),
    "mobilenet_v2_0.35": ImageBackbone(
        apps.MobileNetV2, {"alpha": 0.35}, True, (224, 224), _MOBILENET_V2),
    "mobilenet_v3_small": ImageBackbone(apps.MobileNetV3Small, {}, False, (224, 224), _MOBILENET_V3),
    "mobilenet_v3_large": ImageBackbone(apps.MobileNetV3Large, {}, False, (224, 224), _MOBILENET_V3),
    "efficientnet_b0": ImageBackbone(apps.EfficientNetB0, {}, False, (224, 224), _EFFICIENTNET),
    "efficientnet_b1": ImageBackbone(apps.EfficientNetB1, {}, False, (240, 240), _EFFICIENTNET),
    "efficientnet_b2": ImageBackbone(apps.EfficientNetB2, {}, False, (260, 260), _EFFICIENTNET),
    "efficientnet_b3": ImageBackbone(apps.EfficientNetB3, {}, False, (300, 300), _EFFICIENTNET),
    "efficientnet_v2_b0": ImageBackbone(apps.EfficientNetV2B0, {}, False, (224, 224), _EFFICIENTNET),
    "resnet50_v2": ImageBackbone(apps.ResNet50V2, {}, True, (224, 224), _RESNET_V2),
    "convnext_tiny": ImageBackbone(apps.ConvNeXtTiny, {}, False, (224, 224), _CONVNEXT),
    "small_cnn": ImageBackbone(small_cnn, {}, True, (64, 64), _SMALL_CNN),
}


def get_backbone(name):
    """The registry entry of an image backbone, by name."""
    if name not in BACKBONES:
        raise ValueError(
            f"Unknown image backbone {name!r}. Expected one of {sorted(BACKBONES)}. "
            f"Received: image_backbone={name!r}"
        )
    return BACKBONES[name]


def default_image_size(name, aspect_ratio=None):
    """A backbone's own input size, reshaped to the images' aspect ratio.

    The longer side keeps the size the backbone's ImageNet weights were
    trained at (objects then appear at the scale its features know, even
    when the photos are smaller and are scaled up); the shorter side follows
    `aspect_ratio`, rounded to a multiple of 8, so photos are not stretched.

    Args:
        name: a key of `BACKBONES`.
        aspect_ratio: height / width of the images (`median_aspect_ratio`),
            or `None` for the backbone's own size.

    Returns:
        `(height, width)`.

    Example:

    >>> default_image_size("mobilenet_v2", 80 / 60), default_image_size("mobilenet_v2")
    ((224, 168), (224, 224))
    """
    height, width = get_backbone(name).image_size
    if not aspect_ratio:
        return height, width
    side = max(height, width)
    short = max(32, int(round(side / max(aspect_ratio, 1 / aspect_ratio) / 8)) * 8)
    return (side, short) if aspect_ratio >= 1 else (short, side)


def build_image_backbone(name, weights="imagenet", image_size=None):
    """Builds a headless, average-pooled backbone with its own preprocessing.

    The returned model takes float32 RGB images in [0, 255] and returns one
    feature vector per image.

    Args:
        name: a key of `BACKBONES`, e.g. `"mobilenet_v2"`.
        weights: `"imagenet"` (downloaded once into `$KERAS_HOME/models`, by
            default `~/.keras/models`), the path of a local weights file
            (`.h5` / `.weights.h5` for the headless network), or `None` for
            random initialisation.
        image_size: `(height, width)`; the backbone's own size by default.

    Returns:
        a `keras.Model` named `"image_backbone"`.

    Raises:
        WeightsUnavailableError: ImageNet weights are not cached and cannot be
            downloaded (offline); the message says how to provide them.

    Example:

    >>> backbone = build_image_backbone("mobilenet_v2_0.35", weights=None,
    ...                                 image_size=(64, 64))
    >>> backbone.output_shape
    (None, 1280)
    """
    spec = get_backbone(name)
    image_size = tuple(image_size or spec.image_size)
    if isinstance(weights, os.PathLike):
        weights = os.fspath(weights)
    if weights not in (None, "imagenet") and not os.path.isfile(weights):
        raise FileNotFoundError(
            f"Weights file not found: {weights}. Pass weights='imagenet', None, or the "
            "path of an existing weights file."
        )
    try:
        network = spec.constructor(
            include_top=False, weights=weights, input_shape=(*image_size, 3),
            pooling="avg", **spec.kwargs,
        )
    except Exception as error:  # keras raises a bare Exception when a download fails
        if weights == "imagenet" and "URL fetch failure" in str(error):
            raise WeightsUnavailableError(_offline_message(name, error)) from error
        raise
    network.name = name  # the registry name travels with saved models
    inputs = keras.Input((*image_size, 3), name="image_pixels")
    x = inputs
    if spec.scale_to_unit_range:
        x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="to_unit_range")(x)
    outputs = network(x)
    return keras.Model(inputs, outputs, name=BACKBONE_NAME)


def _offline_message(name, error):
    url = re.search(r"https?://\S+?\.h5", str(error))
    file_name = url.group(0).rsplit("/", 1)[-1] if url else "<weights file>"
    cache = os.path.join(
        os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras")),
        "models")
    return (
        f"Cannot download the ImageNet weights of {name!r} (no network?). Either: "
        f"(1) on a machine with internet, download {url.group(0) if url else 'them'} and put "
        f"it at {os.path.join(cache, file_name)} (or set KERAS_HOME to a folder whose models/ "
        "holds it); (2) pass the path of a local weights file (image_weights=..., CLI: "
        "--image-weights PATH); or (3) pass image_weights=None to start from random weights."
    )


def backbone_network(model):
    """The `keras.applications` network inside a classifier or backbone model."""
    backbone = model.get_layer(BACKBONE_NAME) if model.name != BACKBONE_NAME else model
    return backbone.layers[-1]


def backbone_blocks(network):
    """Groups the layers of a `keras.applications` network into blocks, input to output.

    Args:
        network: a network built by `build_image_backbone` (named after its
            registry entry).

    Returns:
        list of `(block name, [layers with weights])`.
    """
    pattern = re.compile(get_backbone(network.name).block_pattern)
    blocks = []
    for layer in network.layers:
        if not layer.weights:
            continue
        match = pattern.match(layer.name)
        if match and (not blocks or blocks[-1][0] != match.group(1)):
            blocks.append((match.group(1), []))
        if blocks:
            blocks[-1][1].append(layer)
    return blocks


def unfreeze_top_blocks(model, num_blocks):
    """Makes the top `num_blocks` blocks of the image backbone trainable.

    Everything below them stays frozen, and every BatchNormalization layer
    stays frozen (so it keeps running in inference mode with its ImageNet
    statistics), as fine-tuning is done.

    Args:
        model: a classifier (or backbone) holding the `"image_backbone"`.
        num_blocks: number of top blocks to unfreeze; `"all"`, or more than
            the backbone has, unfreezes them all.

    Returns:
        names of the unfrozen blocks.
    """
    network = backbone_network(model)
    backbone = model.get_layer(BACKBONE_NAME) if model.name != BACKBONE_NAME else model
    backbone.trainable = True
    blocks = backbone_blocks(network)
    count = len(blocks) if num_blocks == "all" else min(int(num_blocks), len(blocks))
    top = blocks[len(blocks) - count:] if count > 0 else []
    unfrozen = {id(layer) for _, layers in top for layer in layers}
    for layer in network.layers:
        layer.trainable = id(layer) in unfrozen and not isinstance(
            layer, keras.layers.BatchNormalization)
    return [block for block, _ in top]


def split_frozen_bottom(backbone):
    """Splits a partly fine-tuned image backbone where its frozen bottom ends.

    While the top blocks of a backbone are fine-tuned (`unfreeze_top_blocks`)
    and the blocks below stay frozen, the frozen bottom maps each image to
    the same feature map in every epoch: it can be computed once, and only
    the top trained on it. The cut is the one tensor every trainable layer
    above depends on (a block boundary).

    Args:
        backbone: the `"image_backbone"` model (`build_image_backbone`).

    Returns:
        `(bottom, top)` models that share the backbone's layers, with
        `top(bottom(images)) == backbone(images)`: `bottom` takes the
        backbone's input, `top` the feature map at the cut. `None` when
        nothing is frozen below a trainable layer (a wholly frozen or wholly
        trainable backbone) or no single tensor separates the two parts.

    Example:

    >>> backbone = build_image_backbone("mobilenet_v2_0.35", weights=None,
    ...                                 image_size=(64, 64))
    >>> _ = unfreeze_top_blocks(backbone, 3)
    >>> bottom, top = split_frozen_bottom(backbone)
    >>> bottom.output_shape, top.output_shape
    ((None, 2, 2, 56), (None, 1280))
    """
    network = backbone_network(backbone)
    if not backbone.trainable:
        return None
    trained = [block for _, block in backbone_blocks(network)
               if any(layer.trainable_weights for layer in block)]
    if not trained:
        return None
    # Operations, not layers: a residual `x + y` is an operation of the graph, not a layer.
    operations = network.operations
    first = next(i for i, op in enumerate(operations) if op is trained[0][0])
    below = {id(op) for op in operations[:first]}
    cut = {id(tensor): tensor for op in operations[first:] for node in inbound_nodes(op)
           for tensor in node.input_tensors if id(history(tensor).operation) in below}
    if len(cut) != 1:
        return None
    (tensor,) = cut.values()
    if tensor is network.input:  # the trainable part starts at the input: nothing to cache
        return None
    # backbone.layers: the input, the preprocessing (if any), then the network.
    bottom = keras.Model(network.input, tensor, name=f"{network.name}_frozen_bottom")
    bottom = keras.Model(backbone.input, bottom(backbone.layers[-2].output),
                         name=f"{BACKBONE_NAME}_frozen_bottom")
    return bottom, keras.Model(tensor, network.output, name=f"{network.name}_trainable_top")
