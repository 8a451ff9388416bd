"""Training: two-phase transfer learning with checkpoints, TensorBoard and resume."""

from keras_mmtl.training.trainer import compile_classifier, train
