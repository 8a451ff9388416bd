"""The keras-mmtl command: a thin shell over the Python API."""

import argparse
import io
import os
import sys
import warnings
import zipfile

from keras_mmtl.progress import error_gist

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


class CommandError(Exception):
    """A command cannot go on (a model that does not load, an input it cannot use)."""


def _load(path):
    """The Keras model in a `.keras` file (any filesystem), or a `CommandError` saying why not."""
    import keras

    from keras_mmtl.files import exists, is_file, join_path, read_bytes

    if exists(path) and not is_file(path):  # a folder
        inside = join_path(path, "model.keras")
        hint = (f"; did you mean {inside}?" if is_file(inside) else
                "; an exported SavedModel folder serves `keras-mmtl predict`, not this command")
        raise CommandError(f"{path} is a folder, not a model file{hint}")
    if not is_file(path):
        raise CommandError(f"model file not found: {path}; give the model.keras a run wrote "
                           "(runs/NAME/model.keras)")
    if path.endswith(".keras") and not zipfile.is_zipfile(io.BytesIO(read_bytes(path))):
        raise CommandError(f"cannot load {path}: not a complete .keras file (a zip archive); "
                           "it may be truncated: copy it again, or train again")
    try:
        return keras.models.load_model(path)  # keras_mmtl's layers are registered on import
    except (ValueError, TypeError, KeyError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise CommandError(f"cannot load {path}: {error_gist(error)}") from None


def cmd_demo(args):
    from keras_mmtl.demo import run_demo

    run_demo(args.run_dir, args.export_dir, num_samples=args.samples, epochs=args.epochs,
             fine_tune_epochs=args.fine_tune_epochs, image_weights=args.image_weights,
             seed=args.seed)


def cmd_train(args):
    from keras_mmtl.config import CONFIG_FILE, RunConfig, from_arguments
    from keras_mmtl.experiment import run_experiment

    config = from_arguments(args, RunConfig.from_file(args.config) if args.config else None)
    result = run_experiment(config, overwrite=args.overwrite)
    if result.report is None:
        print("Training done; the chief worker evaluates and exports.")
        return
    _report(result.report, os.path.join(result.run_dir, "eval"))
    if result.modalities is not None:
        print(result.modalities.table())
    sequential = config.transfer.source_manifest and not config.transfer.joint
    print(f"Model saved to {os.path.join(result.run_dir, 'target' if sequential else '', 'model.keras')}")
    print(f"Config written to {os.path.join(result.run_dir, CONFIG_FILE)}: train again with "
          f"keras-mmtl train --config {os.path.join(result.run_dir, CONFIG_FILE)}")
    if result.export_path:
        print(f"Exported to {result.export_path}")


def cmd_tune(args):
    from keras_mmtl.config import RunConfig, from_arguments
    from keras_mmtl.experiment import tune_experiment

    config = from_arguments(args, RunConfig.from_file(args.config) if args.config else None)
    if not config.output.run_dir:
        config = config.replace(output={"run_dir": os.path.join("runs", f"{config.name}-tuning")})
    result, best = tune_experiment(
        config, tuner=args.tuner, max_trials=args.max_trials, objective=args.objective,
        search=args.search, overwrite=args.overwrite)
    print(result.table())
    print(f"Best {result.objective}: {result.best_score:.4f} with {result.best_hyperparameters}")
    print(f"Best config written to {best}: train the final model with "
          f"keras-mmtl train --config {best}")


def cmd_evaluate(args):
    from keras_mmtl.config import RunConfig, from_arguments
    from keras_mmtl.evaluation import evaluate, modality_report
    from keras_mmtl.files import folder_of, join_path
    from keras_mmtl.models import describe

    model = _load(args.model)
    spec = describe(model)
    config = from_arguments(args, RunConfig.from_file(args.config) if args.config else None)
    records = config.data.read(class_names=spec.label_classes)
    out_dir = args.out_dir or join_path(folder_of(args.model), "eval")
    _report(evaluate(model, records, args.split, out_dir=out_dir), out_dir)
    if len(spec.modalities) > 1:
        print(modality_report(model, records, args.split, out_dir=out_dir).table())


def cmd_prepare(args):
    from keras_mmtl.config import from_arguments
    from keras_mmtl.data.prepared import prepare

    records = from_arguments(args).data.read()
    info = prepare(records, args.output, args.image_size, shards=args.shards)
    rows = ", ".join(f"{split} {part['rows']:,}" for split, part in info["splits"].items())
    print(f"Prepared {rows} rows in {args.output}: read them with "
          f"keras_mmtl.prepared_dataset({args.output!r}, split)")


def cmd_export(args):
    from keras_mmtl.export import export_saved_model

    path = export_saved_model(_load(args.model), args.export_dir,
                              max_megapixels=args.max_megapixels)
    print(f"Exported to {path}")


def cmd_predict(args):
    from keras_mmtl.config import DataConfig
    from keras_mmtl.export import predict
    from keras_mmtl.predictions import predict_manifest

    one = args.image is not None or args.text is not None
    if one and (args.manifest or args.output):
        raise CommandError("score one sample (--image, --text) or a manifest (--manifest, "
                           "--output), not both")
    if not one and not (args.manifest and args.output):
        raise CommandError("give --image and/or --text to score one sample, or --manifest and "
                           "--output (a .csv or .jsonl file) to score a manifest")
    model = args.model if not args.model.endswith(".keras") else _load(args.model)
    if args.manifest:
        columns = DataConfig(image_column=args.image_column, text_column=args.text_column,
                             tabular_columns=args.tabular_columns)
        try:
            print(predict_manifest(
                model, args.manifest, args.output, top_k=args.top_k, batch_size=args.batch_size,
                image_column=columns.image_column, text_column=columns.text_column,
                tabular_columns=columns.tabular_columns))
        except (ValueError, OSError) as error:  # a missing column, an unsupported output...
            raise CommandError(f"cannot predict: {error_gist(error)}") from None
        return
    images = [args.image] if args.image else None
    texts = [args.text] if args.text is not None else None
    import tensorflow as tf

    try:
        answers = predict(model, images, texts, top_k=args.top_k)
    except tf.errors.OpError as error:  # an image that does not decode
        given = f" (--image {args.image})" if args.image else ""
        raise CommandError(f"cannot predict: {error_gist(error)}{given}") from None
    except (ValueError, OSError) as error:  # a missing input, a folder without a SavedModel
        raise CommandError(f"cannot predict: {error_gist(error)}") from None
    for task, answer in (answers.items() if isinstance(answers, dict) else [(None, answers)]):
        if task is not None:
            print(f"{task}:")
        for label, score in answer[0]:
            print(f"{score:8.4f}  {label}")


def cmd_explain(args):
    import tensorflow as tf

    from keras_mmtl.explain import explain

    model = _load(args.model)
    try:
        explanation = explain(model, image=args.image, text=args.text, task=args.task,
                              target=args.target, baseline=args.baseline, steps=args.steps)
    except tf.errors.OpError as error:  # an image that does not decode
        raise CommandError(f"cannot explain: {error_gist(error)}") from None
    except (ValueError, OSError) as error:  # a missing input, an unknown class
        raise CommandError(f"cannot explain: {error_gist(error)}") from None
    print(explanation.summary())
    for what, path in explanation.save(args.out_dir).items():
        print(f"{what}: {path}")


def _report(report, out_dir):
    """Prints a test report (or one per task of a multi-task model)."""
    for task, one in (report.items() if isinstance(report, dict) else [(None, report)]):
        if task is not None:
            print(f"== task {task}")
        print(one.table())
        print(one.summary())
    print(f"Report, confusion matrix and ROC/PR curves written to {out_dir}")


def build_parser():
    """The argument parser of `keras-mmtl`."""
    from keras_mmtl import __version__
    from keras_mmtl.config import SECTIONS, DataConfig, add_arguments, parse_image_size
    from keras_mmtl.data.images import MAX_MEGAPIXELS

    parser = argparse.ArgumentParser(
        prog="keras-mmtl", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"keras-mmtl {__version__}")
    verbosity = argparse.ArgumentParser(add_help=False)
    quiet_or_verbose = verbosity.add_mutually_exclusive_group()
    quiet_or_verbose.add_argument("-q", "--quiet", dest="verbosity", action="store_const",
                                  const="warning", default="info",
                                  help="print only warnings, errors and the results")
    quiet_or_verbose.add_argument("-v", "--verbose", dest="verbosity", action="store_const",
                                  const="debug", help="print details too, and TensorFlow's C++ "
                                  "start-up lines")
    commands = _Commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"),
                         parents=[verbosity])

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
                    "it as a SavedModel. The complete settings are written to "
                    "RUN_DIR/config.yaml; --config FILE reads such a file (YAML or JSON), and "
                    "flags given as well override it. Run again with the same settings and "
                    "data, an interrupted run resumes and a finished one is reused; with "
                    "others, it stops before any work unless --overwrite.")
    train.add_argument("--config", help="a run config file (YAML or JSON), e.g. the "
                                        "config.yaml of an earlier run")
    train.add_argument("--overwrite", action="store_true",
                       help="clear the run folder's training state (a run of other settings "
                            "or data) and train again; its feature cache is kept")
    for section in SECTIONS.values():
        add_arguments(train, section, defaults=False)
    train.set_defaults(func=cmd_train)

    search = commands.add_parser(
        "tune", help="search hyperparameters with KerasTuner; write the best config",
        description="Runs whole two-phase trainings (trials) with hyperparameters chosen by "
                    "KerasTuner, scores each on the val split and writes RUN_DIR/"
                    "best_config.yaml for `keras-mmtl train --config`. Settings not searched "
                    "come from --config and the flags, as for train. Run it again to continue "
                    "an interrupted search.")
    search.add_argument("--config", help="a run config file (YAML or JSON)")
    search.add_argument("--tuner", default="random", choices=["random", "bayesian", "hyperband"],
                        help="search algorithm (default: random)")
    search.add_argument("--max-trials", type=int, default=None,
                        help="trials at most (default: 10; hyperband: its whole schedule)")
    search.add_argument("--objective", default="val_accuracy", choices=["val_accuracy", "val_loss"])
    search.add_argument("--search", nargs="+", metavar="NAME",
                        default=["learning_rate", "fusion", "unfreeze_blocks", "dropout"],
                        help="settings to search (default: learning_rate fusion unfreeze_blocks "
                             "dropout)")
    search.add_argument("--overwrite", action="store_true", help="start the search again")
    for section in SECTIONS.values():
        add_arguments(search, section, defaults=False)
    search.set_defaults(func=cmd_tune)

    evaluate = commands.add_parser(
        "evaluate", help="evaluate a trained model on a manifest",
        description="Scores a trained model (model.keras) on one split of a manifest and "
                    "writes the report, confusion matrix and ROC/PR curves.")
    evaluate.add_argument("--model", required=True, help="a model.keras file from train")
    evaluate.add_argument("--config", help="the config.yaml of the run that trained it: reads "
                                           "the data as that run did (flags given as well "
                                           "override it)")
    add_arguments(evaluate, DataConfig, defaults=False)
    evaluate.add_argument("--split", default="test", help="train, val or test (default: test)")
    evaluate.add_argument("--out-dir", help="where to write (default: eval/ beside the model)")
    evaluate.set_defaults(func=cmd_evaluate)

    prepare = commands.add_parser(
        "prepare", help="write a manifest's checked rows as TFRecord shards of resized images",
        description="Reads and checks a manifest, decodes and resizes every image once (in "
                    "parallel) and writes each split as --shards TFRecord files of uint8 "
                    "images, texts and labels, with prepared.json describing them. Reading "
                    "them back (keras_mmtl.prepared_dataset) decodes no JPEG and holds only "
                    "a shuffle buffer in memory. --output may be on gs:// or any TensorFlow "
                    "filesystem.")
    add_arguments(prepare, DataConfig)
    prepare.add_argument("--output", required=True, help="the folder to write")
    prepare.add_argument("--image-size", type=parse_image_size, default=[128, 96],
                         help="HEIGHTxWIDTH of the model that will read them (default: 128x96)")
    prepare.add_argument("--shards", type=int, default=8, help="files per split (default: 8)")
    prepare.set_defaults(func=cmd_prepare)

    export = commands.add_parser(
        "export", help="export a model.keras as a versioned SavedModel",
        description="Writes the next version folder (1, 2, ...) of a TF Serving model folder.")
    export.add_argument("--model", required=True, help="a model.keras file from train")
    export.add_argument("--export-dir", required=True, help="e.g. saved_models/products")
    export.add_argument("--max-megapixels", type=float, default=MAX_MEGAPIXELS,
                        help="requests with a larger image fail, refused from its header "
                             f"before it is decoded (default: {MAX_MEGAPIXELS})")
    export.set_defaults(func=cmd_export)

    predict = commands.add_parser(
        "predict", help="top classes for one image and text, or for every row of a manifest",
        description="Prints the most probable classes for one sample (--image, --text), or "
                    "scores every row of a manifest (--manifest, --output: CSV or JSON Lines, "
                    "the manifest's columns plus label, top classes and an error for rows that "
                    "fail), from an exported model folder (newest version) or a model.keras file.")
    predict.add_argument("--model", required=True,
                         help="saved_models/NAME, a version folder, or a model.keras file")
    predict.add_argument("--image", help="an image file (JPEG/PNG)")
    predict.add_argument("--text", help="the text")
    predict.add_argument("--manifest", help="a CSV or JSON Lines file to score, one row per "
                                            "sample (labels not needed)")
    predict.add_argument("--output", help="with --manifest: the .csv or .jsonl file to write")
    add_arguments(predict, DataConfig, only=("image_column", "text_column", "tabular_columns"))
    predict.add_argument("--batch-size", type=int, default=32,
                         help="with --manifest: rows scored together (default: 32)")
    predict.add_argument("--top-k", type=int, default=5)
    predict.set_defaults(func=cmd_predict)

    explain = commands.add_parser(
        "explain", help="which pixels and words drove a prediction",
        description="Explains a trained model's probability of a class for one sample: "
                    "integrated gradients over the image (a heatmap PNG), the drop when each "
                    "word is left out (an HTML page with the words shaded), and each "
                    "modality's share. Prints a summary and writes the files to --out-dir.")
    explain.add_argument("--model", required=True, help="a model.keras file from train")
    explain.add_argument("--image", help="an image file (JPEG/PNG)")
    explain.add_argument("--text", help="the text")
    explain.add_argument("--out-dir", required=True, help="where to write the HTML and PNGs")
    explain.add_argument("--target", help="the class to explain (default: the predicted one)")
    explain.add_argument("--task", help="the task of a multi-task model (default: the first)")
    explain.add_argument("--baseline", default="blur", choices=["blur", "black"],
                         help="the image integrated gradients start from (default: blur)")
    explain.add_argument("--steps", type=int, default=32,
                         help="integration steps (default: 32; more: a closer sum)")
    explain.set_defaults(func=cmd_explain)
    return parser


class _Commands:
    """Subparsers that all take the same parent flags (`--quiet`, `--verbose`)."""

    def __init__(self, subparsers, parents):
        self.subparsers, self.parents = subparsers, parents

    def add_parser(self, name, **kwargs):
        return self.subparsers.add_parser(name, parents=self.parents, **kwargs)


def main(argv=None):
    """Entry point of the `keras-mmtl` command."""
    from keras_mmtl.progress import logger, set_verbosity

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "evaluate" and not (getattr(args, "manifest", None) or args.config):
        parser.error("evaluate needs --manifest, or --config (the config.yaml of a run)")
    from keras_mmtl.config import ConfigError
    from keras_mmtl.data import DataValidationError
    from keras_mmtl.models import WeightsUnavailableError
    from keras_mmtl.op_audit import OpAuditError
    from keras_mmtl.training.callbacks import NonFiniteLossError
    from keras_mmtl.training.run_state import StaleRunError

    level, formatwarning = logger.level, warnings.formatwarning
    set_verbosity(args.verbosity)
    warnings.formatwarning = _format_warning
    try:
        args.func(args)
    except (DataValidationError, WeightsUnavailableError, FileNotFoundError, FileExistsError,
            ConfigError, StaleRunError, OpAuditError, NonFiniteLossError,
            CommandError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ImportError as error:  # an optional extra not installed: its message says what to pip
        if "pip install" not in str(error):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command to resume", file=sys.stderr)
        return 130
    finally:
        logger.setLevel(level)
        warnings.formatwarning = formatwarning
    return 0


def _format_warning(message, category, filename, lineno, line=None,
                    _default=warnings.formatwarning):
    """Warnings about the data as `warning: ...`, without a Python source line; others as usual."""
    from keras_mmtl.data import DataWarning

    if issubclass(category, DataWarning):
        return f"warning: {message}\n"
    return _default(message, category, filename, lineno, line)


if __name__ == "__main__":
    sys.exit(main())
