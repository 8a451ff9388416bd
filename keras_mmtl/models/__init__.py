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
    build_classifier,
    build_classifier_for,
    clone_classifier,
    embedding_model,
    learn_text_vocabulary,
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
from keras_mmtl.models.spec import ClassifierSpec, auxiliary_output, describe, head_name
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
