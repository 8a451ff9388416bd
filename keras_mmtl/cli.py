"""The keras-mmtl command: a thin shell over the Python API."""

import argparse
import os
import sys

DESCRIPTION = """\
Train, evaluate, export and query image + text classifiers.

Start with `keras-mmtl demo` (a few minutes on a CPU). To train on your own
data, write a manifest (CSV or JSON Lines) with one row per sample: an image
path (relative to the manifest's folder), a text, a label and optionally a
split (train/val/test), then run for example:

  keras-mmtl train --manifest data/products.csv --image-column image \\
      --text-column title --label-column category --split-column split

Each command has its own --help.
"""


def _weights(value):
    return None if value.lower() == "none" else value


def _size(value):
    try:
        height, width = (int(x) for x in value.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 128x96, got {value!r}")
    return height, width


def _column(value):
    return None if value.lower() == "none" else value


def _blocks(value):
    return value if value == "all" else int(value)


def _manifest_arguments(parser):
    group = parser.add_argument_group("data")
    group.add_argument("--manifest", required=True, help="CSV or JSON Lines file, one row per sample")
    group.add_argument("--image-column", type=_column, default="image",
                       help="column of image paths, relative to the manifest (default: image; "
                            "'none' for text-only data)")
    group.add_argument("--text-column", type=_column, default="text",
                       help="column of texts (default: text; 'none' for image-only data)")
    group.add_argument("--label-column", default="label", help="column of labels (default: label)")
    group.add_argument("--split-column", type=_column, default=None,
                       help="column of train/val/test; without it a stratified 80/10/10 split "
                            "is drawn with --seed")
    group.add_argument("--min-class-count", type=int, default=1,
                       help="drop classes with fewer training rows (default: 1)")
    group.add_argument("--skip-bad-rows", action="store_true",
                       help="leave out rows with a missing image, empty text, ... and report "
                            "them, instead of stopping")
    group.add_argument("--seed", type=int, default=0, help="seed of splits and training")


def _read(args, class_names=None, manifest=None):
    from keras_mmtl.data import read_manifest

    return read_manifest(
        manifest or args.manifest, args.image_column, args.text_column, args.label_column,
        args.split_column, class_names=class_names,
        min_class_count=args.min_class_count if class_names is None else 0,
        skip_bad_rows=args.skip_bad_rows, seed=args.seed)


def _load(path):
    import keras

    return keras.models.load_model(path)  # keras_mmtl's layers are registered on import


def cmd_demo(args):
    from keras_mmtl.demo import run_demo

    run_demo(args.run_dir, args.export_dir, num_samples=args.samples, epochs=args.epochs,
             fine_tune_epochs=args.fine_tune_epochs, image_weights=args.image_weights,
             seed=args.seed)


def cmd_train(args):
    from keras_mmtl.evaluation import evaluate
    from keras_mmtl.export import export_saved_model
    from keras_mmtl.models import build_classifier_for
    from keras_mmtl.training import setup_precision, train, transfer

    setup_precision(args.precision)
    records = _read(args)
    name = args.name or os.path.splitext(os.path.basename(args.manifest))[0]
    run_dir = args.run_dir or os.path.join("runs", name)
    print(f"{len(records)} rows, {len(records.class_names)} classes, inputs "
          f"{list(records.modalities)}; run folder {run_dir}")
    source = _read(args, manifest=args.source_manifest) if args.source_manifest else None
    build = dict(image_backbone=args.image_backbone, image_weights=args.image_weights,
                 image_size=args.image_size, text_encoder=args.text_encoder,
                 sequence_length=args.sequence_length, fusion=args.fusion, dropout=args.dropout)
    fit = dict(epochs=args.epochs, learning_rate=args.learning_rate, batch_size=args.batch_size,
               seed=args.seed, verbose=1 if sys.stdout.isatty() else 2)  # bars on a terminal
    if not args.joint:
        fit.update(fine_tune_epochs=args.fine_tune_epochs,
                   fine_tune_learning_rate=args.fine_tune_learning_rate,
                   unfreeze_blocks=args.unfreeze_blocks,
                   unfreeze_text_layers=args.unfreeze_text_layers, warmup=args.warmup,
                   layer_decay=args.layer_decay, class_weight=args.class_weight)
    if source is None:
        model = build_classifier_for(records, **build)
        train(model, records, run_dir, **fit)
    else:
        model = transfer(
            build_classifier_for(source, text_vocabulary=_shared_vocabulary(args, source, records),
                                 **build),
            source, records, run_dir, joint=args.joint, alpha=args.alpha,
            domain_adversarial=args.domain_adversarial, freeze=args.freeze, **fit)
    _report(evaluate(model, records, "test", out_dir=os.path.join(run_dir, "eval")),
            os.path.join(run_dir, "eval"))
    sequential = source is not None and not args.joint
    print(f"Model saved to {os.path.join(run_dir, 'target' if sequential else '', 'model.keras')}")
    if not args.no_export:
        path = export_saved_model(model, args.export_dir or os.path.join("saved_models", name))
        print(f"Exported to {path}")


def _shared_vocabulary(args, source, target):
    """The text vocabulary learned from the source and target training texts, if one is needed."""
    from keras_mmtl.models.text import needs_vocabulary, vocabulary_learner

    if not needs_vocabulary(args.text_encoder) or "text" not in source.modalities:
        return None
    texts = [*source.subset("train").texts, *target.subset("train").texts]
    return vocabulary_learner(args.text_encoder)(texts)


def cmd_evaluate(args):
    from keras_mmtl.evaluation import evaluate
    from keras_mmtl.models import class_names

    model = _load(args.model)
    records = _read(args, class_names=class_names(model))
    out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(args.model)), "eval")
    _report(evaluate(model, records, args.split, out_dir=out_dir), out_dir)


def cmd_export(args):
    from keras_mmtl.export import export_saved_model

    print(f"Exported to {export_saved_model(_load(args.model), args.export_dir)}")


def cmd_predict(args):
    from keras_mmtl.export import predict

    model = args.model if not args.model.endswith(".keras") else _load(args.model)
    images = [args.image] if args.image else None
    texts = [args.text] if args.text is not None else None
    for label, score in predict(model, images, texts, top_k=args.top_k)[0]:
        print(f"{score:8.4f}  {label}")


def _report(report, out_dir):
    print(report.table())
    print(report.summary())
    print(f"Report, confusion matrix and ROC/PR curves written to {out_dir}")


def build_parser():
    """The argument parser of `keras-mmtl`."""
    parser = argparse.ArgumentParser(
        prog="keras-mmtl", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="train image-only, text-only and fused models on bundled demo data",
        description="Generates the demo data (photos + titles whose label needs both), trains "
                    "an image-only, a text-only and a fused model, prints their test metrics "
                    "and exports the fused one.")
    demo.add_argument("--run-dir", default="runs/demo", help="where data and runs go")
    demo.add_argument("--export-dir", default="saved_models/demo", help="TF Serving model folder")
    demo.add_argument("--samples", type=int, default=1200, help="demo dataset size")
    demo.add_argument("--epochs", type=int, default=10, help="max epochs per model")
    demo.add_argument("--fine-tune-epochs", type=int, default=2,
                      help="max fine-tuning epochs when a pretrained backbone is used")
    demo.add_argument("--image-weights", type=_weights, default="imagenet",
                      help="'imagenet', a local MobileNetV2-0.35 weights file, or 'none'")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    train = commands.add_parser(
        "train", help="train on a manifest, evaluate on its test split, export",
        description="Reads and checks a manifest, trains a classifier in two phases (frozen "
                    "backbone, then fine-tuning), evaluates it on the test split and exports "
                    "it as a SavedModel.")
    _manifest_arguments(train)
    model = train.add_argument_group("model")
    model.add_argument("--image-backbone", default="mobilenet_v2",
                       help="a keras.applications backbone (default: mobilenet_v2); see "
                            "keras_mmtl.BACKBONES")
    model.add_argument("--image-weights", type=_weights, default="imagenet",
                       help="'imagenet' (downloaded once), a local weights file, or 'none'")
    model.add_argument("--image-size", type=_size, default=None,
                       help="HEIGHTxWIDTH of model images (default: the backbone's own)")
    model.add_argument("--text-encoder", default="scratch",
                       help="'scratch' (word embeddings learned from your texts), 'tfidf' (a "
                            "TF-IDF bag of words), or a keras-hub preset name or local "
                            "directory of a pretrained BERT-family encoder (frozen; needs "
                            "keras-mmtl[hub])")
    model.add_argument("--sequence-length", type=int, default=128, help="tokens kept per text")
    model.add_argument("--fusion", default="concat", help="fusion of image and text (concat)")
    model.add_argument("--dropout", type=float, default=0.2)
    fit = train.add_argument_group("training")
    fit.add_argument("--epochs", type=int, default=30,
                     help="max epochs, frozen backbone (early stopping ends most sooner)")
    fit.add_argument("--fine-tune-epochs", type=int, default=5, help="max epochs, fine-tuning")
    fit.add_argument("--learning-rate", type=float, default=1e-3)
    fit.add_argument("--fine-tune-learning-rate", type=float, default=1e-4)
    fit.add_argument("--unfreeze-blocks", type=_blocks, default=3,
                     help="top backbone blocks trained in fine-tuning, or 'all'")
    fit.add_argument("--unfreeze-text-layers", type=_blocks, default=0,
                     help="top layers of a pretrained text encoder trained in fine-tuning, or "
                          "'all' (default: 0, frozen)")
    fit.add_argument("--warmup", type=float, default=0.1,
                     help="fraction of fine-tuning steps that ramp the learning rate up")
    fit.add_argument("--layer-decay", type=float, default=0.8,
                     help="learning-rate factor per block down each backbone in fine-tuning")
    fit.add_argument("--batch-size", type=int, default=32)
    fit.add_argument("--precision", default="auto",
                     help="'auto' (mixed_float16 on a GPU with tensor cores, else float32), or a "
                          "Keras policy such as float32 or mixed_float16")
    fit.add_argument("--class-weight", choices=["balanced"], default=None,
                     help="'balanced': rare classes weigh as much as frequent ones (better "
                          "macro-F1 on imbalanced data)")
    domain = train.add_argument_group(
        "domain transfer", "Train on --source-manifest first (same columns), then adapt to "
                           "--manifest: in turn with a new head, or jointly.")
    domain.add_argument("--source-manifest", help="manifest of the source dataset")
    domain.add_argument("--joint", action="store_true",
                        help="train source and target together: alpha * source loss + "
                             "(1 - alpha) * target loss")
    domain.add_argument("--alpha", type=float, default=0.5, help="source loss weight (--joint)")
    domain.add_argument("--domain-adversarial", action="store_true",
                        help="add a domain classifier behind gradient reversal (with --joint)")
    domain.add_argument("--freeze", nargs="*", default=["image_backbone"], metavar="LAYER",
                        help="layers frozen for the target training (default: image_backbone; "
                             "e.g. fusion text_embedding)")
    out = train.add_argument_group("outputs")
    out.add_argument("--name", help="run name (default: the manifest's file name)")
    out.add_argument("--run-dir", help="run folder (default: runs/NAME)")
    out.add_argument("--export-dir", help="TF Serving model folder (default: saved_models/NAME)")
    out.add_argument("--no-export", action="store_true", help="do not export a SavedModel")
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser(
        "evaluate", help="evaluate a trained model on a manifest",
        description="Scores a trained model (model.keras) on one split of a manifest and "
                    "writes the report, confusion matrix and ROC/PR curves.")
    evaluate.add_argument("--model", required=True, help="a model.keras file from train")
    _manifest_arguments(evaluate)
    evaluate.add_argument("--split", default="test", help="train, val or test (default: test)")
    evaluate.add_argument("--out-dir", help="where to write (default: eval/ beside the model)")
    evaluate.set_defaults(func=cmd_evaluate)

    export = commands.add_parser(
        "export", help="export a model.keras as a versioned SavedModel",
        description="Writes the next version folder (1, 2, ...) of a TF Serving model folder.")
    export.add_argument("--model", required=True, help="a model.keras file from train")
    export.add_argument("--export-dir", required=True, help="e.g. saved_models/products")
    export.set_defaults(func=cmd_export)

    predict = commands.add_parser(
        "predict", help="top classes for one image and text",
        description="Prints the most probable classes for one sample, from an exported model "
                    "folder (newest version) or a model.keras file.")
    predict.add_argument("--model", required=True,
                         help="saved_models/NAME, a version folder, or a model.keras file")
    predict.add_argument("--image", help="an image file (JPEG/PNG)")
    predict.add_argument("--text", help="the text")
    predict.add_argument("--top-k", type=int, default=5)
    predict.set_defaults(func=cmd_predict)
    return parser


def main(argv=None):
    """Entry point of the `keras-mmtl` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "joint", False) or getattr(args, "domain_adversarial", False):
        if not args.source_manifest:
            parser.error("--joint and --domain-adversarial need --source-manifest")
    from keras_mmtl.data import DataValidationError
    from keras_mmtl.models import WeightsUnavailableError

    try:
        args.func(args)
    except (DataValidationError, WeightsUnavailableError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
