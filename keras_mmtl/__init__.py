"""keras_mmtl: multimodal (image + text) transfer learning for Keras 3 / TensorFlow.

Example:

>>> import keras_mmtl as mm
>>> records = mm.read_manifest("products.csv", text_column="title")  # doctest: +SKIP
>>> model = mm.build_classifier_for(records)  # doctest: +SKIP
>>> mm.train(model, records, "runs/products")  # doctest: +SKIP
>>> # or all of it (read, build, train, evaluate, export) from one config file:
>>> mm.run_experiment("runs/products/config.yaml")  # doctest: +SKIP
>>> print(mm.evaluate(model, records, out_dir="runs/products/eval").summary())  # doctest: +SKIP
>>> mm.export_saved_model(model, "saved_models/products")  # doctest: +SKIP
"""

from keras_mmtl.startup import quiet_native_startup

with quiet_native_startup():  # TensorFlow's C++ start-up lines stay off the command line
    import tensorflow

    tensorflow.config.list_physical_devices()  # the driver probe's lines come now, held too

from keras_mmtl.calibration import calibrate, set_temperature
from keras_mmtl.config import RunConfig
from keras_mmtl.data import (
    DataValidationError,
    DataWarning,
    ReadOptions,
    Records,
    from_arrays,
    from_directory,
    from_tfds,
    make_dataset,
    make_demo_dataset,
    prepare,
    prepared_dataset,
    prepared_records,
    read_manifest,
)
from keras_mmtl.demo import run_demo
from keras_mmtl.evaluation import (
    EvaluationReport,
    ModalityReport,
    classification_report,
    evaluate,
    modality_report,
)
from keras_mmtl.experiment import run_experiment
from keras_mmtl.explain import Explanation, explain
from keras_mmtl.export import export_saved_model, predict, serving_function
from keras_mmtl.grpc_client import grpc_predict
from keras_mmtl.models import (
    BACKBONES,
    ClassifierSpec,
    WeightsUnavailableError,
    build_classifier,
    build_classifier_for,
    describe,
    ensemble,
    mirror_averaged,
)
from keras_mmtl.plots import plot_confusion_matrix, plot_history, plot_reliability
from keras_mmtl.predictions import PredictionSummary, predict_manifest
from keras_mmtl.progress import set_verbosity
from keras_mmtl.rest import ServingError, predict_url, rest_predict
from keras_mmtl.training import (
    distribution_strategy,
    prune,
    refit,
    setup_precision,
    train,
    transfer,
    tune,
    with_new_head,
)

__version__ = "0.1.0"
