"""The demo: image-only, text-only and fused models on the bundled demo data."""

import os

from keras_mmtl.data import make_demo_dataset, read_manifest
from keras_mmtl.evaluation import evaluate
from keras_mmtl.export import export_saved_model
from keras_mmtl.models import WeightsUnavailableError, build_classifier_for, build_image_backbone
from keras_mmtl.progress import logger
from keras_mmtl.training import train

PRETRAINED = "mobilenet_v2_0.35"
MODELS = {"image only": ("image",), "text only": ("text",), "image + text": ("image", "text")}


def demo_backbone(image_weights="imagenet"):
    """The demo's image backbone: pretrained MobileNetV2-0.35, or a small CNN offline.

    Returns:
        `(backbone name, weights, image size)`.
    """
    if image_weights is not None:
        try:
            build_image_backbone(PRETRAINED, image_weights, (96, 96))
            return PRETRAINED, image_weights, (96, 96)
        except WeightsUnavailableError:
            logger.warning(f"Pretrained {PRETRAINED} weights cannot be downloaded (offline?): the demo "
                           "trains a small CNN from scratch instead (or pass a local weights file).")
    return "small_cnn", None, (32, 32)


def run_demo(run_dir="runs/demo", export_dir="saved_models/demo", *, num_samples=1200,
             epochs=10, fine_tune_epochs=2, image_weights="imagenet", seed=0, verbose=2):
    """Trains image-only, text-only and fused models on the demo data and compares them.

    The demo data (see `keras_mmtl.data.make_demo_dataset`) is generated in
    `run_dir/data` if absent. Each model is trained with
    `keras_mmtl.training.train` and evaluated on the test split; the fused
    model is exported to the next version folder of `export_dir`.

    Args:
        run_dir: folder for the data, each model's run and evaluation.
        export_dir: TF Serving model folder for the fused model.
        num_samples: demo dataset size.
        epochs, fine_tune_epochs: training budget of each model.
        image_weights: `"imagenet"`, a local MobileNetV2-0.35 weights file, or
            `None` to use the small CNN from scratch.
        seed: seed of data generation and training.
        verbose: Keras progress output.

    Returns:
        dict: `reports` (model name -> `EvaluationReport`), `export_path`.

    Example:

    >>> results = run_demo(epochs=3)  # doctest: +SKIP
    """
    data_dir = os.path.join(run_dir, "data")
    manifest = os.path.join(data_dir, "manifest.csv")
    if not os.path.exists(manifest):
        make_demo_dataset(data_dir, num_samples=num_samples, seed=seed)
    records = read_manifest(manifest, text_column="title", split_column="split")
    backbone, weights, size = demo_backbone(image_weights)
    reports, models = {}, {}
    for title, modalities in MODELS.items():
        logger.info(f"\n=== {title} ===")
        model = build_classifier_for(records, modalities=modalities, image_backbone=backbone,
                                     image_weights=weights, image_size=size)
        model_dir = os.path.join(run_dir, "_".join(modalities))
        train(model, records, model_dir, epochs=epochs, fine_tune_epochs=fine_tune_epochs,
              seed=seed, verbose=verbose)
        reports[title] = evaluate(model, records, "test", out_dir=os.path.join(model_dir, "eval"))
        models[title] = model
    logger.info(f"\nTest split of the demo data ({len(records.subset('test'))} samples):")
    logger.info(f"{'model':<14}{'accuracy':>10}{'macro-F1':>10}")
    for title, report in reports.items():
        logger.info(f"{title:<14}{report.accuracy:>10.3f}{report.macro_f1:>10.3f}")
    best_single = max(reports["image only"].accuracy, reports["text only"].accuracy)
    gain = 100 * (reports["image + text"].accuracy - best_single)
    logger.info(f"Fusion beats the best single modality by {gain:.1f} points of accuracy.")
    export_path = export_saved_model(models["image + text"], export_dir)
    logger.info(f"Exported the fused model to {export_path}")
    return {"reports": reports, "export_path": export_path}
