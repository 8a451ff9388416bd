"""Ensembles as one model: the average of several classifiers' probabilities, or of one
classifier's over each image and its mirror image (test-time augmentation)."""

import keras

from keras_mmtl.modalities import modality_kind
from keras_mmtl.models.builder import clone_classifier, embedding_model
from keras_mmtl.models.heads import ClassifierHead, TemperatureVariable
from keras_mmtl.models.spec import describe, head_name

COMBINES = ("mean", "geometric")


@keras.saving.register_keras_serializable(package="keras_mmtl")
class EnsembleHead(keras.layers.Layer):
    """The heads of several classifiers on their concatenated embeddings; their mean probability.

    The input is the members' embeddings side by side (widths `widths`);
    each member's `ClassifierHead` reads its own part, and the output is the
    mean of their probabilities (`combine="mean"`) or their normalised
    geometric mean (`"geometric"`: the softmax of the mean log-probability,
    where a member sure that a class is wrong vetoes it), divided in logit
    space by `temperature` when `keras_mmtl.calibrate` sets one. It has the
    attributes of a `ClassifierHead` that evaluation and export read
    (`class_names`, `temperature`), so an ensemble is scored, calibrated and
    served as one classifier.

    Args:
        heads: the members' `ClassifierHead`s (same class names).
        widths: the width of each member's embedding, in order.
        temperature: as in `ClassifierHead`.
        combine: `"mean"` or `"geometric"`.
    """

    def __init__(self, heads, widths, temperature=1.0, combine="mean", **kwargs):
        super().__init__(**kwargs)
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}. Received: combine={combine!r}")
        self.combine = combine
        self.heads = [keras.saving.deserialize_keras_object(h) if isinstance(h, dict) else h
                      for h in heads]
        self.widths = [int(w) for w in widths]
        self._temperature = TemperatureVariable(temperature)
        names = {tuple(head.class_names) for head in self.heads}
        if len(names) != 1 or len(self.heads) != len(self.widths):
            raise ValueError("An ensemble's heads must share their class names, with one width "
                             f"each. Received class names {sorted(names)}, widths {self.widths}")
        self.class_names = list(self.heads[0].class_names)

    def build(self, input_shape):
        for head, width in zip(self.heads, self.widths):
            if not head.built:
                head.build((input_shape[0], width))

    def call(self, embeddings, training=None):
        parts = keras.ops.split(embeddings, list(_offsets(self.widths)), axis=-1)
        probabilities = keras.ops.stack(
            [head(part, training=training) for head, part in zip(self.heads, parts)])
        if self.combine == "mean":
            logits = keras.ops.log(keras.ops.maximum(keras.ops.mean(probabilities, axis=0), 1e-12))
        else:
            logits = keras.ops.mean(keras.ops.log(keras.ops.maximum(probabilities, 1e-12)), 0)
        return keras.ops.softmax(logits / self._temperature.variable)

    temperature = ClassifierHead.temperature

    def compute_output_shape(self, input_shape):
        return (input_shape[0], len(self.class_names))

    def get_config(self):
        return {**super().get_config(), "widths": self.widths, "temperature": self.temperature,
                "combine": self.combine,
                "heads": [keras.saving.serialize_keras_object(h) for h in self.heads]}


def _offsets(widths):
    """Where to split the concatenated embeddings: the running sums, last one left out."""
    total = 0
    for width in widths[:-1]:
        total += width
        yield total


def ensemble(models, name="mmtl_ensemble", combine="mean"):
    """One classifier that averages the class probabilities of several trained ones.

    The members (for example runs with other seeds, fusions or backbones,
    or a fused model and a model of one of its inputs alone) must share
    their class names and image size; each keeps its own weights and
    preprocessing, and reads the inputs it takes of the ensemble's, which
    are all of theirs. The ensemble's embedding is the members' embeddings
    side by side. Evaluate, calibrate, save and export it like any
    classifier. Members trained with auxiliary heads take part with their
    main head.

    Args:
        models: two or more trained classifiers of one task each.
        name: the ensemble's name.
        combine: `"mean"` of the probabilities, or their normalised
            `"geometric"` mean (see `EnsembleHead`).

    Returns:
        a `keras.Model` (the members are copied: training one later does
        not change it).

    Example:

    >>> combined = ensemble([first, second, third])  # doctest: +SKIP
    >>> export_saved_model(combined, "saved_models/products-ensemble")  # doctest: +SKIP
    """
    models = list(models)
    if len(models) < 2:
        raise ValueError(f"An ensemble needs two or more models. Received: {len(models)}")
    specs = [describe(m) for m in models]
    several = [m.name for m, spec in zip(models, specs) if len(spec.tasks) > 1]
    if several:
        raise ValueError(f"The members of an ensemble have one task each; {several} have "
                         "several.")
    first = specs[0]
    for other, spec in zip(models[1:], specs[1:]):
        differs = [what for what, mine, theirs in (
            ("classes", first.class_names(), spec.class_names()),
            ("presence inputs", first.presence, spec.presence),
            ("image size", first.image_size, spec.image_size))
            if None not in (mine, theirs) and mine != theirs]
        if differs:
            raise ValueError(f"The members of an ensemble must have the same classes, presence "
                             f"inputs and image size; {other.name} differs from "
                             f"{models[0].name} in {differs}.")
    inputs = {}
    for member in models:
        inputs.update({key: keras.Input(tensor.shape[1:], dtype=tensor.dtype, name=key)
                       for key, tensor in member.input.items() if key not in inputs})
    embeddings, heads = [], []
    for i, member in enumerate(clone_classifier(m) for m in models):
        trunk = embedding_model(member)
        trunk.name = f"member_{i}"
        embeddings.append(trunk({key: inputs[key] for key in member.input}))
        heads.append(member.get_layer(describe(member).head()))
    return _combined(inputs, embeddings, heads, combine, name)


def _combined(inputs, embeddings, heads, combine, name):
    """The classifier whose `EnsembleHead` reads each head's embedding."""
    joined = keras.layers.Concatenate(name="member_embeddings")(embeddings)
    outputs = EnsembleHead(heads, [e.shape[-1] for e in embeddings], combine=combine,
                           name=head_name())(joined)
    return keras.Model(inputs, outputs, name=name)


@keras.saving.register_keras_serializable(package="keras_mmtl")
class MirrorImages(keras.layers.Layer):
    """Flips a batch of images `(batch, height, width, channels)` left to right.

    Example:

    >>> import numpy as np
    >>> MirrorImages()(np.arange(4.0).reshape(1, 1, 4, 1))[0, 0, :, 0].numpy().tolist()
    [3.0, 2.0, 1.0, 0.0]
    """

    def call(self, images):
        return keras.ops.flip(images, axis=-2)

    def compute_output_shape(self, input_shape):
        return input_shape


def mirror_averaged(model, combine="mean"):
    """`model` averaged over each image and its mirror image: test-time augmentation.

    A photo of a shoe or a shirt is as much that class mirrored; a trained
    classifier's two answers differ a little, and their mean is often right
    more often than either. Not always: where the photos are all shot one
    way (the fashion benchmark's catalogue), a fine-tuned model learns that
    way, and mirroring cost its image-only models about a point of
    macro-F1 (`benchmarks/mirror.py`); measure it on your validation data.
    The classifier runs once on the inputs as given and
    once with every image input flipped left to right (texts and numbers
    unchanged); its head's two probabilities are averaged by an
    `EnsembleHead`, so the result is scored, calibrated, saved and served
    like any classifier, and a served request runs the model twice. Leave it
    out where left and right mean something (text in images, laterality in
    medical scans).

    Args:
        model: a trained classifier of one task, with an image input.
        combine: `"mean"` or `"geometric"`, as in `ensemble`.

    Returns:
        a `keras.Model` with the inputs and name of `model` (which it
        copies: training `model` later does not change it).

    Example:

    >>> served = mirror_averaged(model)  # doctest: +SKIP
    """
    spec = describe(model)
    if len(spec.tasks) > 1:
        raise ValueError(f"mirror_averaged takes a classifier of one task; {model.name} has "
                         f"several: {list(spec.tasks)}.")
    images = [name for name in spec.modalities if modality_kind(name) == "image"]
    if not images:
        raise ValueError(f"{model.name} takes no image: there is nothing to mirror. Its inputs: "
                         f"{list(spec.modalities)}")
    member = clone_classifier(model)
    inputs = {key: keras.Input(tensor.shape[1:], dtype=tensor.dtype, name=key)
              for key, tensor in member.input.items()}
    mirrored = {key: MirrorImages(name=f"mirror_{key}")(tensor) if key in images else tensor
                for key, tensor in inputs.items()}
    trunk = embedding_model(member)
    trunk.name = "member_0"
    head = member.get_layer(spec.head())
    twin = type(head).from_config(head.get_config())
    twin.build((None, trunk.output_shape[-1]))
    twin.set_weights(head.get_weights())
    return _combined(inputs, [trunk(inputs), trunk(mirrored)], [head, twin], combine, model.name)
