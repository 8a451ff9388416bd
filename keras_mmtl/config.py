"""A run described by one file: data, model, training, transfer and outputs; YAML or JSON."""

import argparse
import dataclasses
import json
import os
import typing
from typing import Optional, Union

import yaml

from keras_mmtl.checks import check_known
from keras_mmtl.data.images import MAX_MEGAPIXELS
from keras_mmtl.files import read_bytes, write_text
from keras_mmtl.models.backbones import BACKBONES
from keras_mmtl.models.fusion import FUSIONS
from keras_mmtl.models.text import check_text_encoder
from keras_mmtl.presets import DEFAULT_PRESET, PRESETS

# The defaults below are the default preset's recipe, read from it (one source of truth).
_DEFAULT = PRESETS[DEFAULT_PRESET]

CONFIG_FILE = "config.yaml"


class ConfigError(ValueError):
    """A run config that cannot be used: unknown key, wrong type, missing manifest..."""


def _none_or(value):
    return None if value.lower() == "none" else value


def parse_image_size(value):
    """`"128x96"` -> `[128, 96]` (an argparse type)."""
    try:
        height, width = (int(x) for x in value.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 128x96, got {value!r}")
    return [height, width]


def _int_or_all(value):
    return value if value == "all" else int(value)


def _task_weight(value):
    task, _, weight = value.rpartition("=")
    try:
        return task, float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TASK=WEIGHT such as colour=0.5, got {value!r}")


def _field(default, help, **argument):
    """A config field: its default, its `--help` and how the CLI parses it."""
    return dataclasses.field(default=default, metadata={"help": help, **argument})


@dataclasses.dataclass
class DataConfig:
    """Where the samples are and how to read them (see `keras_mmtl.read_manifest`)."""

    manifest: Optional[str] = _field(
        None, "CSV or JSON Lines file, one row per sample; or a folder that keras-mmtl prepare "
              "wrote (its images decoded once; the column options were prepare's)")
    image_column: Union[str, list, None] = _field(
        "image", "column of image paths, relative to the manifest ('none' for text-only data); "
                 "several columns for several photos per sample", type=_none_or, nargs="+")
    text_column: Union[str, list, None] = _field(
        "text", "column of texts ('none' for image-only data); several columns for several "
                "texts per sample (title, description...)", type=_none_or, nargs="+")
    label_column: Union[str, list] = _field(
        "label", "column of labels; several columns train a multi-task model (one head per "
                 "column, the first is the main task)", nargs="+")
    split_column: Optional[str] = _field(
        None, "column of train/val/test; without it a stratified 80/10/10 split is drawn with "
              "--seed", type=_none_or)
    tabular_columns: list = _field(
        (), "columns of numbers given to the model as a third input (price, size, ...)",
        nargs="*")
    min_class_count: int = _field(1, "drop classes with fewer training rows")
    skip_bad_rows: bool = _field(
        False, "leave out rows with a missing image, empty text, ... and report them, instead "
               "of stopping")
    allow_missing: bool = _field(
        False, "keep rows with an empty image path or an empty text (not both): samples that "
               "lack a modality (the model is then built with --missing-modalities)")
    max_megapixels: float = _field(
        MAX_MEGAPIXELS, "larger images (millions of pixels, read from the file's header) are "
                        "bad rows, and the exported model refuses them in requests")
    data_root: Optional[str] = _field(
        None, "a folder image files must lie in: paths that leave it (absolute, '..', "
              "symlinks) are bad rows, never opened; for manifests you did not write")
    seed: int = _field(0, "seed of splits, shuffling and weight initialisation")

    def __post_init__(self):
        self.tabular_columns = list(self.tabular_columns)
        for name in ("image_column", "text_column", "label_column"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):  # one column is written as itself
                columns = [column for column in value if column is not None]
                setattr(self, name, (columns[0] if len(columns) == 1 else columns) or None)

    def read(self, manifest=None, **kwargs):
        """The `Records` of `manifest` (default `self.manifest`) read with these settings.

        A folder of prepared data (`keras_mmtl.prepare`) is read as it was prepared.

        `**kwargs` are more `read_manifest` arguments, or ones to override
        (`class_names` of a model, `check_images`...).
        """
        from keras_mmtl.data import prepared_records, read_manifest
        from keras_mmtl.data.prepared import is_prepared

        if is_prepared(manifest or self.manifest):  # checked by `prepare`: the columns were
            return prepared_records(manifest or self.manifest, kwargs.get("class_names"))
        kwargs = {"skip_bad_rows": self.skip_bad_rows, **kwargs}
        return read_manifest(
            manifest or self.manifest, self.image_column, self.text_column, self.label_column,
            self.split_column, tabular_columns=self.tabular_columns,
            min_class_count=self.min_class_count, allow_missing=self.allow_missing,
            max_megapixels=self.max_megapixels, allowed_root=self.data_root, seed=self.seed,
            **kwargs)


@dataclasses.dataclass
class ModelConfig:
    """The classifier (see `keras_mmtl.build_classifier`)."""

    image_backbone: str = _field(
        "mobilenet_v2", "a keras.applications backbone (or small_cnn, trained from scratch)",
        choices=sorted(BACKBONES), metavar="NAME")
    image_weights: Optional[str] = _field(
        "imagenet", "'imagenet' (downloaded once), a local weights file, or 'none'",
        type=_none_or)
    image_size: Optional[list] = _field(
        None, "HEIGHTxWIDTH of model images (default: the backbone's own)", type=parse_image_size)
    text_encoder: str = _field(
        _DEFAULT.model["text_encoder"],
        "'ngrams' (TF-IDF of word 1-2 grams and character 3-5 grams), 'scratch' (word "
        "embeddings learned from your texts), 'tfidf' (a TF-IDF bag of words), or a keras-hub "
        "preset name or local directory of a pretrained BERT-family encoder (needs "
        "keras-mmtl[hub])", check=check_text_encoder)
    sequence_length: int = _field(128, "tokens kept per text")
    text_tokenizer: str = _field(
        "core", "tokenizer of the scratch text encoder: 'core' (core TensorFlow ops: the export "
                "runs on stock TF Serving) or 'unicode_script' (tensorflow-text ops)",
        choices=["core", "unicode_script"])
    fusion: str = _field(
        "concat", "fusion of image and text: concat, gated, attention, hierarchical, late or "
                  "shared (one space and head shared by the modalities)", choices=list(FUSIONS))
    missing_modalities: bool = _field(
        False, "accept samples without their image or text (a learned stand-in replaces it)")
    modality_dropout: float = _field(
        0.0, "in training, hide each modality of a sample with this probability (e.g. 0.3), so "
             "the model stays accurate when one is missing")
    auxiliary_heads: bool = _field(
        False, "also train a head per modality and task on that modality alone (deep "
               "supervision; not exported)")
    dropout: float = _field(0.2, "dropout rate before the softmax")

    def __post_init__(self):
        if self.image_size is not None:
            self.image_size = list(self.image_size)


@dataclasses.dataclass
class TrainingConfig:
    """How the classifier is trained (see `keras_mmtl.train`)."""

    preset: str = _field(
        "auto", "quality preset: fast, medium or best (see keras_mmtl.presets); settings given "
                "explicitly win. 'auto': medium, or with --time-limit the best preset that fits",
        choices=["auto", *PRESETS])
    time_limit: Optional[str] = _field(
        None, "wall-time budget of the run, e.g. 15m, 1h30m or 600 (seconds): training stops "
              "in time to evaluate and export", type=_none_or)
    ensemble: int = _field(
        1, "models trained with seeds seed, seed+1, ... and averaged into one served model")
    modality_experts: bool = _field(
        _DEFAULT.modality_experts,
        "also train a model on each image input alone, and serve the geometric mean of the "
        "fused model and these experts (one task, inputs never missing)")
    refit: bool = _field(
        _DEFAULT.refit,
        "after training, train each model again on the train and val rows together, each "
        "phase for the epochs val chose (as AutoGluon's refit_full): the served model learns "
        "from every labelled row, for about twice the training time")
    test_time_mirror: bool = _field(
        False, "the served model averages each image's answer with its mirror image's "
               "(test-time augmentation; on the fashion photos, all shot facing one way, it "
               "cost image-only models a point of macro-F1: try it on your validation data)")
    epochs: int = _field(30, "max epochs, frozen backbone (early stopping ends most sooner)")
    fine_tune_epochs: int = _field(_DEFAULT.training["fine_tune_epochs"],
                                   "max epochs, fine-tuning")
    learning_rate: float = _field(1e-3, "learning rate with the backbone frozen")
    fine_tune_learning_rate: float = _field(1e-4, "peak learning rate of fine-tuning")
    unfreeze_blocks: Union[int, str] = _field(
        3, "top backbone blocks trained in fine-tuning, or 'all'", type=_int_or_all)
    unfreeze_text_layers: Union[int, str] = _field(
        0, "top layers of a pretrained text encoder trained in fine-tuning, or 'all'",
        type=_int_or_all)
    warmup: float = _field(0.1, "fraction of fine-tuning steps that ramp the learning rate up")
    layer_decay: float = _field(
        0.8, "learning-rate factor per block down each backbone in fine-tuning")
    batch_size: int = _field(32, "samples per batch (and per replica with several devices)")
    patience: int = _field(3, "epochs without validation improvement before a phase stops")
    class_weight: Optional[str] = _field(
        _DEFAULT.training["class_weight"], "'balanced': rare classes weigh as much as frequent "
        "ones (better macro-F1 on imbalanced data; each task by its own classes), or 'none'",
        choices=["balanced", None], type=_none_or)
    focal_gamma: float = _field(0.0, "focal loss exponent (0: cross-entropy; 2 is usual)")
    label_smoothing: Optional[float] = _field(
        None, "target mass spread over all classes, e.g. 0.1; unset: the preset's (0.1 for a "
        "model of images alone, also the image expert of a fused run; otherwise 0)")
    weight_decay: float = _field(0.0, "decoupled (AdamW) weight decay of kernels, e.g. 1e-4")
    ema_momentum: Optional[float] = _field(
        None, "keep an exponential moving average of the weights with this momentum, e.g. "
              "0.99, and validate and keep it in place of the raw weights")
    augment_images: bool = _field(
        False, "random flip, rotation, zoom, crop and contrast of training images")
    augment_text: bool = _field(False, "random word deletion and swap in training texts")
    task_weights: Optional[dict] = _field(
        None, "loss weight per task of a multi-task model, as TASK=WEIGHT (others weigh 1)",
        nargs="+", type=_task_weight)
    auxiliary_weight: float = _field(0.3, "loss weight of each auxiliary head")
    cache_features: bool = _field(True, "train on cached features of frozen backbones")
    projector: bool = _field(
        True, "write the validation embeddings for TensorBoard's Projector at the end")
    calibrate: bool = _field(
        True, "fit temperature scaling on the val split after training (in the exported graph; "
              "the test report gives the calibration error before and after)")
    precision: str = _field(
        "auto", "'auto' (mixed_float16 on a GPU with tensor cores, else float32), or a Keras "
                "policy such as float32 or mixed_float16")
    strategy: str = _field(
        "auto", "tf.distribute strategy: 'auto' (several workers in TF_CONFIG: multi-worker; "
                "several GPUs: mirrored; else one device), 'default', 'mirrored', "
                "'multi_worker'")

    def __post_init__(self):
        if self.task_weights is not None:
            self.task_weights = dict(self.task_weights)


@dataclasses.dataclass
class TransferConfig:
    """Domain transfer: train on a source dataset first (see `keras_mmtl.transfer`)."""

    source_manifest: Optional[str] = _field(None, "manifest of the source dataset")
    joint: bool = _field(
        False, "train source and target together: alpha * source + (1 - alpha) * target loss")
    alpha: float = _field(0.5, "source loss weight (joint)")
    domain_adversarial: bool = _field(
        False, "add a domain classifier behind gradient reversal (joint)")
    freeze: list = _field(
        ("image_backbone",), "layers frozen for the target training (e.g. fusion "
                             "text_embedding)", nargs="*")

    def __post_init__(self):
        self.freeze = list(self.freeze)


@dataclasses.dataclass
class OutputConfig:
    """Where a run writes."""

    name: Optional[str] = _field(None, "run name (default: the manifest's file name)")
    run_dir: Optional[str] = _field(None, "run folder (default: runs/NAME)")
    export_dir: Optional[str] = _field(
        None, "TF Serving model folder (default: saved_models/NAME)")
    export: bool = _field(True, "export a SavedModel after training")


SECTIONS = {"data": DataConfig, "model": ModelConfig, "training": TrainingConfig,
            "transfer": TransferConfig, "output": OutputConfig}


@dataclasses.dataclass
class RunConfig:
    """Everything a training run depends on, in one file.

    `keras-mmtl train --config run.yaml` reads it (flags given on the command
    line override it) and writes the complete config back to
    `<run_dir>/config.yaml`: training again from that file reproduces the
    run (on a CPU, the same metrics). Sections and keys are those of
    `keras-mmtl train --help`, with underscores.

    A config knows which keys were set explicitly (`given`): those of the
    dict or file it was read from, and those `replace` changed. A quality
    preset sets the others (`keras_mmtl.experiment.resolve_preset`).

    Example:

    >>> config = RunConfig.from_dict({"data": {"manifest": "products.csv"},
    ...                               "training": {"epochs": 3}})
    >>> config.training.epochs, config.training.batch_size, config.output_dir
    (3, 32, 'runs/products')
    >>> print(config.to_yaml().splitlines()[1])
      manifest: products.csv
    """

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    transfer: TransferConfig = dataclasses.field(default_factory=TransferConfig)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)

    @property
    def name(self):
        """The run's name: `output.name`, or the manifest's file name."""
        if self.output.name:
            return self.output.name
        if not self.data.manifest:
            raise ConfigError("The config names no manifest: set data.manifest (--manifest).")
        return os.path.splitext(os.path.basename(self.data.manifest))[0]

    @property
    def output_dir(self):
        """The run folder: `output.run_dir`, or `runs/<name>`."""
        return self.output.run_dir or os.path.join("runs", self.name)

    @classmethod
    def from_dict(cls, values, source="the config"):
        """A config from nested dicts `{section: {key: value}}`; unknown keys are errors."""
        values = values or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{source} must be a mapping of sections {list(SECTIONS)}; "
                              f"got {type(values).__name__}.")
        check_known(values, SECTIONS, lambda unknown: (
            f"{source} has unknown sections {unknown}. Expected some of {list(SECTIONS)}."),
            ConfigError)
        sections = {}
        for name, section in SECTIONS.items():
            given = values.get(name) or {}
            known = {f.name for f in dataclasses.fields(section)}
            check_known(given, known, lambda unknown: (
                f"{source} has unknown keys {unknown} in section {name!r}. Expected some of "
                f"{sorted(known)}."), ConfigError)
            for field in dataclasses.fields(section):
                if field.name in given:
                    _check_value(field, given[field.name], f"{source}, {name}.{field.name}")
            sections[name] = section(**given)
        config = cls(**sections)
        config._given = frozenset(f"{name}.{key}" for name in SECTIONS
                                  for key in values.get(name) or {})
        return config

    @property
    def given(self):
        """The keys set explicitly, as `"section.key"` (see the class docstring)."""
        return getattr(self, "_given", frozenset())

    @classmethod
    def from_file(cls, path):
        """Reads a YAML (`.yaml`, `.yml`) or JSON (`.json`) config file."""
        text = read_bytes(path).decode("utf-8")  # any filesystem (a run folder on gs://)
        try:
            values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as error:
            raise ConfigError(f"Cannot parse the config file {path}: {error}") from None
        return cls.from_dict(values, source=f"The config file {path}")

    def to_dict(self):
        """Nested dicts of plain values (lists, not tuples)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_yaml(self):
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path):
        """Writes the config as YAML, or JSON when `path` ends with `.json`."""
        write_text(path, json.dumps(self.to_dict(), indent=2) if path.endswith(".json")
                   else self.to_yaml())
        return path

    def replace(self, *, explicit=True, **sections):
        """A copy with keys changed, e.g. `replace(training={"epochs": 2})`.

        Args:
            explicit: whether the changed keys count as set explicitly (a
                preset's values do not: a later preset may change them).
            **sections: dict of key -> value per section to change.
        """
        values = self.to_dict()
        for name, changes in sections.items():
            values.setdefault(name, {}).update(changes)
        config = RunConfig.from_dict(values)
        changed = {f"{name}.{key}" for name, changes in sections.items() for key in changes}
        config._given = self.given | changed if explicit else self.given - changed
        return config

    def without_preset_values(self):
        """A copy whose keys holding its preset's values are unset (back to their defaults).

        A config written by a run holds the values its preset gave; choosing
        another preset for it (`--config runs/NAME/config.yaml --preset best`)
        lets the new preset set those keys, while values edited away from the
        written preset's stay.
        """
        preset = PRESETS.get(self.training.preset)
        if preset is None:
            return self
        values = {"model": preset.model, "training": {
            **preset.training, **preset.image_only, **preset.image_run,
            "ensemble": preset.ensemble,
            "modality_experts": preset.modality_experts, "refit": preset.refit}}
        defaults = {name: SECTIONS[name]() for name in values}
        unset = {name: {key: getattr(defaults[name], key) for key, value in section.items()
                        if getattr(getattr(self, name), key) == value}
                 for name, section in values.items()}
        return self.replace(explicit=False, **unset)


def _kind(field):
    """A field's type, with an optional number (`Optional[float]`) as its number type."""
    args = typing.get_args(field.type)
    if typing.get_origin(field.type) is Union and args[1:] == (type(None),) and args[0] in (
            int, float):
        return args[0]
    return field.type


def _check_value(field, value, where):
    """Raises a clear error for a value of the wrong kind or not among the field's choices."""
    kind = _kind(field)
    expected = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(kind)
    if expected is None or value is None and field.default is None:
        return
    if not isinstance(value, expected) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"{where} must be {kind.__name__}; got {value!r}.")
    choices = field.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where} is {value!r}; expected one of {choices}.")
    try:
        field.metadata.get("check", lambda value: value)(value)
    except ValueError as error:
        raise ConfigError(f"{where}: {error}") from None


def _checked(check):
    """`check` as an argparse type: its ValueError becomes argparse's one-line usage error."""
    def parse(value):
        try:
            return check(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    parse.__name__ = check.__name__
    return parse


def add_arguments(parser, section, defaults=True, only=None):
    """Adds one command-line flag per field of a config section to an argparse group.

    With `defaults=False` the flags have no default (argparse.SUPPRESS), so
    only flags given on the command line land in the parsed namespace and
    can override a config file. `only` names the fields to add (default: all).
    """
    group = parser.add_argument_group(section.__name__.removesuffix("Config").lower(),
                                      section.__doc__)
    for field in dataclasses.fields(section):
        if only is not None and field.name not in only:
            continue
        argument = dict(field.metadata)
        help = argument.pop("help")
        if "check" in argument:
            argument["type"] = _checked(argument.pop("check"))
        default = field.default
        argument["default"] = default if defaults else argparse.SUPPRESS
        shown = "x".join(map(str, default)) if field.name == "image_size" and default else default
        if field.type is bool:
            argument["action"] = argparse.BooleanOptionalAction
        elif "type" not in argument and _kind(field) in (int, float):
            argument["type"] = _kind(field)
        group.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name,
                           help=f"{help} (default: {shown})", **argument)
    return group


def from_arguments(args, base=None):
    """`base` (default `RunConfig()`) with the values of the flags `add_arguments` made.

    The flags given count as set explicitly (`RunConfig.given`). A `--preset`
    other than the one `base` names lets the new preset set the keys that
    hold the old one's values (`RunConfig.without_preset_values`).
    """
    given = vars(args)
    base = base or RunConfig()
    if "preset" in given and given["preset"] != base.training.preset:
        base = base.without_preset_values()
    changes = {}
    for name, section in SECTIONS.items():
        values = {f.name: given[f.name] for f in dataclasses.fields(section) if f.name in given}
        if values:
            changes[name] = values
    return base.replace(**changes)
