"""Data: manifests, TFDS, arrays and folders -> validated records -> tf.data."""

from keras_mmtl.data.augmentation import ImageAugmentation, TextAugmentation, make_augmentation
from keras_mmtl.data.demo import make_demo_dataset
from keras_mmtl.data.images import decode_image
from keras_mmtl.data.manifest import (
    BadRow,
    DataReport,
    DataValidationError,
    DataWarning,
    ReadOptions,
    Records,
    from_arrays,
    from_directory,
    from_tfds,
    read_manifest,
    stratified_split,
)
from keras_mmtl.data.pipeline import make_dataset
from keras_mmtl.data.prepared import prepare, prepared_dataset, prepared_records
