"""Training: two-phase transfer learning with checkpoints, TensorBoard and resume; domain
transfer; distribution; hyperparameter search."""

from keras_mmtl.training.cache import compute_features, split_model
from keras_mmtl.training.distribute import distribution_strategy
from keras_mmtl.training.losses import ClassificationLoss
from keras_mmtl.training.metrics import LabelledAccuracy, MacroF1
from keras_mmtl.training.optimizers import (
    LayerwiseAdam,
    decoupled_weight_decay,
    fine_tuning_optimizer,
    layerwise_multipliers,
)
from keras_mmtl.training.precision import setup_precision
from keras_mmtl.training.pruning import MagnitudePruning, compressed_size, prune, sparsity
from keras_mmtl.training.trainer import (
    cache_frozen_features,
    class_weights,
    compile_classifier,
    refit,
    train,
)
from keras_mmtl.training.transfer import joint_records, train_joint, transfer, with_new_head
from keras_mmtl.training.tuning import TuningResult, default_search_space, tune
