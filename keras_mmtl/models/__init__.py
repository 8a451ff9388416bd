"""Models: image backbones, text encoders, fusion and heads, composed by builders."""

from keras_mmtl.models.backbones import (
    BACKBONES,
    WeightsUnavailableError,
    backbone_blocks,
    backbone_network,
    build_image_backbone,
    unfreeze_top_blocks,
)
from keras_mmtl.models.builder import (
    auxiliary_output,
    build_classifier,
    build_classifier_for,
    class_names,
    clone_classifier,
    dataset_arguments,
    embedding_model,
    image_size,
    learn_text_vocabulary,
    model_modalities,
    model_tasks,
    output_tasks,
    presence_modalities,
)
from keras_mmtl.models.ensemble import EnsembleHead, MirrorImages, ensemble, mirror_averaged
from keras_mmtl.models.fusion import (
    FUSIONS,
    AttentionFusion,
    ConcatFusion,
    GatedFusion,
    HierarchicalFusion,
    LateFusion,
    SharedSpaceFusion,
)
from keras_mmtl.models.heads import ClassifierHead, GradientReversal
from keras_mmtl.models.missing import MissingModality, ModalityDropout
from keras_mmtl.models.text import (
    TEXT_ENCODERS,
    MaskedMeanPooling,
    NgramProjection,
    TextTokenizer,
    WordPieceTokenizer,
    learn_ngrams,
    learn_tfidf,
    learn_vocabulary,
    tokenize,
    unfreeze_text_layers,
)
