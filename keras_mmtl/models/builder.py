"""build_classifier(): input branches -> fusion -> head, with the Functional API."""

import keras
import numpy as np

from keras_mmtl.data.images import median_aspect_ratio
from keras_mmtl.keras_internals import all_layers
from keras_mmtl.modalities import KINDS, input_names, is_input_name, modality_kind, ordered
from keras_mmtl.models.backbones import build_image_backbone, default_image_size
from keras_mmtl.models.fusion import get_fusion
from keras_mmtl.models.heads import ClassifierHead
from keras_mmtl.models.missing import MissingModality, ModalityDropout, presence_input
from keras_mmtl.models.spec import auxiliary_output, describe, head_name
from keras_mmtl.models.text import build_text_encoder, needs_vocabulary, vocabulary_learner
from keras_mmtl.presets import with_preset


def build_classifier(
    class_names,
    *,
    image_backbone="mobilenet_v2",
    image_weights="imagenet",
    image_size=None,
    freeze_backbone=None,
    text_encoder="scratch",
    text_vocabulary=None,
    sequence_length=128,
    text_tokenizer="core",
    tabular_statistics=None,
    fusion="concat",
    fusion_units=256,
    missing_modalities=False,
    modality_dropout=0.0,
    auxiliary_heads=False,
    modalities=None,
    dropout=0.2,
    name="mmtl_classifier",
):
    """Builds an image + text classifier; either branch can be left out.

    The model takes a dict `{"image": float32 (batch, h, w, 3) in [0, 255],
    "text": string (batch,)}` and returns class probabilities (float32). The
    backbone's preprocessing, the tokenizer and its vocabulary, and the class
    names are all inside the model.

    With `missing_modalities=True`, the model also takes `"image_present"`
    and `"text_present"` (float32 (batch,), 1 or 0): a sample may lack its
    image or its text, whose features are then replaced by a learned
    embedding (`MissingModality`), and fusions that can (gated, attention,
    late) leave it out. `make_dataset` and the exported signature fill these
    inputs from empty paths, bytes and texts.

    With several tasks (`class_names` a dict, one entry per label column),
    the fused features feed one softmax head per task and the model returns
    a dict of task -> probabilities; the tasks share everything below their
    heads.

    Args:
        class_names: label of each class, in output order; or, for a
            multi-task model, a dict of task name -> such a list.
        image_backbone: a name from `keras_mmtl.models.BACKBONES`, or `None`
            for a text-only model.
        image_weights: `"imagenet"`, a local weights file, or `None`.
        image_size: `(height, width)` of input images; the backbone's own
            size by default.
        freeze_backbone: start with the image backbone frozen (phase 1 of
            transfer learning; `keras_mmtl.training.train` unfreezes its top
            in phase 2). By default frozen when weights are pretrained, and
            trained from the start when `image_weights=None`.
        text_encoder: `"scratch"` (word embeddings learned from the training
            texts), `"tfidf"` (a TF-IDF bag of words and a dense layer), a
            keras-hub preset name or local directory of a pretrained BERT-family
            encoder (frozen, mean-pooled; needs `keras-mmtl[hub]`), or `None`
            for an image-only model.
        text_vocabulary: what the text encoder learned from the training
            texts: tokens for `"scratch"` (`learn_vocabulary`), token -> IDF
            weight for `"tfidf"` (`learn_tfidf`); `build_classifier_for` learns it.
        sequence_length: tokens kept per text.
        text_tokenizer: the `"scratch"` encoder's tokenizer: `"core"` (core
            TensorFlow ops only, so the export runs on stock TF Serving) or
            `"unicode_script"` (tensorflow-text's; see
            `keras_mmtl.models.tokenize`). `text_vocabulary` must be learned
            with the same (`learn_vocabulary(texts, tokenizer=...)`).
        tabular_statistics: `(mean, variance)` of numeric features per
            column, for a third input `"tabular"` (float32 (batch, k)),
            standardised in the model and passed through a small MLP;
            `build_classifier_for` computes them from the train split.
            `None` for no such input.
        fusion: a name from `keras_mmtl.models.FUSIONS`.
        fusion_units: per-modality projection size inside the fusion.
        missing_modalities: accept samples without their image or text
            (needs both branches); implied by `modality_dropout`.
        modality_dropout: in training, the probability of hiding each
            modality of a sample (`ModalityDropout`; a sample keeps at least
            one), so the model stays accurate when one is absent. 0.3 is a
            reasonable start.
        auxiliary_heads: also give each modality its own softmax head per
            task, on that modality's features alone: outputs named
            `"<task>_aux_<modality>"` (`auxiliary_output`), which training
            weighs by `auxiliary_weight` so every branch learns to classify
            by itself (deep supervision). Evaluation and export use the main
            heads only. Needs two or more modalities; a model with one task
            calls it `"label"`.
        modalities: the model's input names, for several images or texts
            per sample, e.g. `("image", "image_2", "text", "text_2")` (see
            `keras_mmtl.modalities`); inputs of one kind share their
            backbone or text encoder and each feeds the fusion. By default
            `"image"`, `"text"` and `"tabular"` for the branches given.
        dropout: dropout rate before the softmax.
        name: the model's name.

    Returns:
        an uncompiled `keras.Model`.

    Example:

    >>> model = build_classifier(["cat", "dog"], image_backbone="mobilenet_v2_0.35",
    ...                          image_weights=None, image_size=(64, 64),
    ...                          text_vocabulary=["a", "cat", "dog"])
    >>> model.output_shape
    (None, 2)
    """
    if image_backbone is None and text_encoder is None and tabular_statistics is None:
        raise ValueError("A classifier needs an image backbone, a text encoder or tabular "
                         "features.")
    names = _input_names(modalities, image=image_backbone is not None,
                         text=text_encoder is not None, tabular=tabular_statistics is not None)
    images = [name for name in names if modality_kind(name) == "image"]
    texts = [name for name in names if modality_kind(name) == "text"]
    inputs, features = {}, []
    if images:
        pretrained = image_weights is not None
        backbone = build_image_backbone(image_backbone, image_weights, image_size)
        backbone.trainable = not (pretrained if freeze_backbone is None else freeze_backbone)
        # A pretrained backbone keeps BatchNorm in inference mode even once
        # unfrozen (its ImageNet statistics); a random one must learn them.
        training = False if pretrained else None
        for name in images:  # several images share the backbone
            inputs[name] = keras.Input(backbone.input_shape[1:], name=name)
            features.append(backbone(inputs[name], training=training))
    if texts:
        inputs.update({name: keras.Input((), dtype="string", name=name) for name in texts})
        features += build_text_encoder(text_encoder, [inputs[name] for name in texts],
                                       text_vocabulary, sequence_length=sequence_length,
                                       **_tokenizer_option(text_encoder, text_tokenizer))
    if tabular_statistics is not None:
        mean, variance = (np.asarray(v, np.float32) for v in tabular_statistics)
        inputs["tabular"] = keras.Input((len(mean),), name="tabular")
        features.append(tabular_branch(inputs["tabular"], mean, variance))
    modalities = list(inputs)
    missing_modalities = missing_modalities or modality_dropout > 0
    if missing_modalities and len(features) < 2:
        raise ValueError("missing_modalities and modality_dropout need two or more inputs; "
                         f"this model has {modalities}.")
    if auxiliary_heads and len(features) < 2:
        raise ValueError(f"auxiliary_heads needs two or more inputs; this model has {modalities}.")
    if len(features) > 1 and missing_modalities:
        presence = [keras.Input((), name=presence_input(m)) for m in modalities]
        inputs.update(zip(map(presence_input, modalities), presence))
        if modality_dropout:
            presence = ModalityDropout(modality_dropout, name="modality_dropout")(presence)
        features = [MissingModality(name=f"{m}_missing")([f, p])
                    for m, f, p in zip(modalities, features, presence)]
        fused = get_fusion(fusion, units=fusion_units, name="fusion")(features, presence=presence)
    elif len(features) > 1:
        fused = get_fusion(fusion, units=fusion_units, name="fusion")(features)
    else:
        fused = features[0]
    if not isinstance(class_names, dict) and not auxiliary_heads:
        outputs = ClassifierHead(class_names, dropout=dropout, name=head_name())(fused)
        return keras.Model(inputs, outputs, name=name)
    tasks = class_names if isinstance(class_names, dict) else {"label": class_names}
    _check_task_names(tasks)
    outputs = {task: ClassifierHead(names, dropout=dropout, name=head_name(task))(fused)
               for task, names in tasks.items()}
    for task, names in tasks.items() if auxiliary_heads else ():
        for modality, feature in zip(modalities, features):
            key = auxiliary_output(task, modality)
            outputs[key] = ClassifierHead(names, dropout=dropout, name=head_name(key))(feature)
    return keras.Model(inputs, outputs, name=name)


def _tokenizer_option(text_encoder, text_tokenizer):
    """The tokenizer argument of a text encoder: only `"scratch"` has a choice."""
    if text_encoder == "scratch":
        return {"tokenizer": text_tokenizer}
    if text_tokenizer != "core":
        raise ValueError(f"text_tokenizer is an option of the 'scratch' text encoder; "
                         f"{text_encoder!r} has its own. Received: text_tokenizer={text_tokenizer!r}")
    return {}


def _input_names(modalities, **branches):
    """The model's input names: `modalities`, checked against the branches given."""
    default = [kind for kind in KINDS if branches[kind]]
    if modalities is None:
        return default
    names = list(modalities)
    unknown = [name for name in names if not is_input_name(name)]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"modalities must name distinct inputs such as image, image_2, text, "
                         f"text_2, tabular. Received: {names}")
    kinds = {modality_kind(name) for name in names}
    if kinds != set(default):
        raise ValueError(f"modalities {names} need the branches {sorted(kinds)}; the arguments "
                         f"give {default} (image_backbone, text_encoder, tabular_statistics).")
    for kind in kinds - {"tabular"}:
        count = sum(modality_kind(name) == kind for name in names)
        if sorted(n for n in names if modality_kind(n) == kind) != sorted(input_names(kind, count)):
            raise ValueError(f"The {kind} inputs must be numbered from 1 without gaps: "
                             f"{input_names(kind, count)}. Received: {names}")
    return list(ordered(names))


def _check_task_names(tasks):
    if not tasks:
        raise ValueError("class_names is an empty dict; give each task's class names.")
    for task in tasks:
        if not isinstance(task, str) or not task or "/" in task:
            raise ValueError(f"Task names must be non-empty strings without '/' (they name "
                             f"outputs and layers). Received: {task!r}")


def tabular_branch(inputs, mean, variance, units=256):
    """Numeric features -> standardised (statistics in the model) -> a two-layer MLP.

    Example:

    >>> x = keras.Input((3,))
    >>> keras.Model(x, tabular_branch(x, [0.0] * 3, [1.0] * 3)).output_shape
    (None, 256)
    """
    # In float32 under any policy: float16 would hold neither the statistics nor the values
    # beyond 65504 (inf, then a NaN loss), and bfloat16 would round away small differences
    # between large values. The next layer casts the standardised values to its own dtype.
    x = keras.layers.Normalization(mean=mean, variance=variance, dtype="float32",
                                   name="tabular_normalization")(inputs)
    x = keras.layers.Dense(units, activation="relu", name="tabular_hidden")(x)
    return keras.layers.Dense(units, activation="relu", name="tabular_features")(x)


@with_preset("model")
def build_classifier_for(records, *, modalities=None, max_tokens=20000, **kwargs):
    """Builds the classifier that fits a dataset: its classes, inputs and vocabulary.

    Args:
        records: `keras_mmtl.data.Records`; the vocabulary is learned from
            the texts of its train split.
        modalities: inputs to use, e.g. `("text",)`; default all the records hold.
        max_tokens: vocabulary size cap.
        preset: a quality preset (`keras_mmtl.presets`) whose model settings
            (such as the text encoder) fill the arguments not passed.
        **kwargs: passed to `build_classifier`. Without `image_size`, images
            are fed at the backbone's own size reshaped to the median aspect
            ratio of the training images (`default_image_size`): 224x168 for
            MobileNetV2 and 4:3 portrait photos.

    Returns:
        an uncompiled `keras.Model`.

    Example:

    >>> model = build_classifier_for(records, image_weights=None)  # doctest: +SKIP
    """
    modalities = tuple(records.modalities if modalities is None else modalities)
    unknown = [name for name in modalities if not is_input_name(name)]
    if unknown:
        raise ValueError(f"Unknown modalities {unknown}. Expected some of {KINDS} (or "
                         "image_2, text_2, ... for more columns).")
    missing = set(modalities) - set(records.modalities)
    if missing:
        raise ValueError(f"The data has no {sorted(missing)} column; it has {records.modalities}.")
    for kind, branch in (("image", "image_backbone"), ("text", "text_encoder")):
        if branch in kwargs and kwargs[branch] is None:  # a branch left out on purpose
            modalities = tuple(m for m in modalities if modality_kind(m) != kind)
    kinds = {modality_kind(name) for name in modalities}
    if "image" not in kinds:
        kwargs["image_backbone"] = None
    elif kwargs.get("image_size") is None:
        kwargs["image_size"] = default_image_size(
            kwargs.get("image_backbone", "mobilenet_v2"),
            median_aspect_ratio(records.subset("train").images, records.image_kind))
    if "tabular" in kinds and kwargs.get("tabular_statistics") is None:
        values = records.subset("train").tabular
        kwargs["tabular_statistics"] = (values.mean(axis=0), values.var(axis=0))
    if "text" not in kinds:
        kwargs["text_encoder"] = None
    elif kwargs.get("text_vocabulary") is None:
        kwargs["text_vocabulary"] = learn_text_vocabulary(
            records, kwargs.get("text_encoder", "scratch"), kwargs.get("text_tokenizer", "core"),
            max_tokens=max_tokens, modalities=modalities)
    several = len(records.tasks) > 1 or kwargs.get("auxiliary_heads")
    return build_classifier(records.tasks if several else records.class_names,
                            modalities=modalities, **kwargs)


def learn_text_vocabulary(records, text_encoder="scratch", text_tokenizer="core", *,
                          max_tokens=20000, modalities=None):
    """What a text encoder learns from the train split's texts, every text column together.

    Args:
        records: `Records`, or a list of them (source and target of a domain
            transfer share one vocabulary).
        text_encoder, text_tokenizer: as in `build_classifier`.
        max_tokens: vocabulary size cap.
        modalities: the text inputs to learn from (default all the records have).

    Returns:
        the `text_vocabulary` for `build_classifier`, or `None` for an
        encoder that learns none (a pretrained one).
    """
    if not needs_vocabulary(text_encoder):
        return None
    texts = []
    for rows in records if isinstance(records, (list, tuple)) else [records]:
        train = rows.subset("train")
        texts += [text for name in (modalities or rows.modalities) if modality_kind(name) == "text"
                  for text in train.inputs(name)]
    return vocabulary_learner(text_encoder)(texts, max_tokens=max_tokens,
                                            **_tokenizer_option(text_encoder, text_tokenizer))


def clone_classifier(model):
    """A copy of a classifier with the same weights and trainable flags, sharing no layers."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    # Layers of a subclassed backbone (keras-hub) are rebuilt by its constructor, not
    # from their configs: copy every layer's trainable flag, parents before children.
    for source, copy in zip(all_layers(model), all_layers(clone)):
        copy.trainable = source.trainable
    return clone


def embedding_model(model):
    """A model from a classifier's inputs to its fused embedding (the head's input).

    The embedding is what the classifier's softmax reads: useful for
    retrieval, clustering, monitoring drift and TensorBoard's Projector.

    Example:

    >>> model = build_classifier(["cat", "dog"], image_backbone=None,
    ...                          text_vocabulary=["a", "cat", "dog"])
    >>> embedding_model(model).output_shape
    (None, 256)
    """
    head = model.get_layer(describe(model).head())
    return keras.Model(model.input, head.input, name=f"{model.name}_embedding")
