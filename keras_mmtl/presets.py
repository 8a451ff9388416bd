"""Quality presets: recipes measured together, and the one that fits a time budget.

A preset is a set of model and training settings chosen together and measured together
on held-out data (`benchmarks/recipe.py`), as AutoGluon's presets are: `"fast"`,
`"medium"` (what `keras-mmtl train` does by default) and `"best"`. Settings given
explicitly always win over the preset's.
"""

import dataclasses
import functools
import re


@dataclasses.dataclass(frozen=True)
class Preset:
    """One recipe.

    Attributes:
        description: what it does, in a sentence.
        model: `build_classifier_for` arguments (keys of the config's `model` section).
        training: `train` arguments (keys of the config's `training` section).
        ensemble: models trained with consecutive seeds and averaged into one.
        modality_experts: also a model on each image input alone, all
            served as their geometric mean (`run_experiment`).
        minutes_per_10k_rows: wall time of a whole `keras-mmtl train` run
            (reading, feature extraction, training, evaluation, export) for
            10,000 image + text rows on 2 CPU cores, as `benchmarks/recipe.py`
            measured it, less the `refit`, which a run with a time limit does
            only where the time left covers it; what `choose_preset` plans with.
        image_only: training settings added for a model whose inputs are
            all images: an image-only run, and the image expert of a fused run.
        image_run: training settings added for an image-only run alone (not
            an image expert, whose time the fused run shares).
        refit: train each model again on the train and val rows together, for
            the epochs val chose (`keras_mmtl.refit`).
    """

    description: str
    model: dict
    training: dict
    ensemble: int
    modality_experts: bool
    minutes_per_10k_rows: float
    image_only: dict = dataclasses.field(default_factory=dict)
    image_run: dict = dataclasses.field(default_factory=dict)
    refit: bool = False


# The recipe every preset shares: n-gram text features that beat word embeddings on short
# texts, and balanced class weights for macro-F1 on imbalanced classes.
_RECIPE_MODEL = {"text_encoder": "ngrams"}
_RECIPE_TRAINING = {"class_weight": "balanced"}
# Label smoothing helps a fine-tuned image backbone alone and hurts the fused model (selection
# splits, benchmarks/RESULTS.md 2026-12-03): the image-only models of medium and best smooth,
# image-only runs and the image experts of fused runs alike. So do 10 epochs of fine-tuning in
# place of 5: on three selection cuts they raised the image expert (+1.1, +2.2, +0.1 points of
# macro-F1) and the fused ensemble served with it (+0.2, +0.3, +0.1), and image-only runs at 5
# and at 8 blocks (5 of 6 cut-runs higher, +0.5 on average), while the fused model itself lost
# 0.3 with them: it keeps 5 (benchmarks/RESULTS.md, 2026-12-04).
_IMAGE_ONLY_TRAINING = {"label_smoothing": 0.1, "fine_tune_epochs": 10}
# Fine-tuning the top 5 blocks in place of 3 raised the image model alone on each of three
# selection cuts (+0.9, +0.6, +0.8 points of macro-F1) and the fused ensemble served with it
# as the image expert by 0.1 on average (+0.1, -0.1, +0.5): an image-only run, whose whole
# budget is the image model's, fine-tunes 5; the image expert stays at 3, sparing the fused
# run's time (benchmarks/RESULTS.md, 2026-12-04; on the test split, not a choice, the image
# model scored 0.746 against 0.747 at 3 blocks).
_IMAGE_RUN_TRAINING = {"unfreeze_blocks": 5}

# Refit: after the run, each model trained again on the train and val rows together, each phase
# for the epochs val chose. On three selection cuts of the fashion task, two seeds, it raised
# the served ensemble (the fused model and its image expert, both refit) on each of the six
# cut-seeds, by 0.9 points of macro-F1 on average (+1.3, +1.1, +0.4; +0.5, +1.0, +0.8), above
# the default's spread over three seeds (benchmarks/RESULTS.md, 2026-12-04 22:27), for about
# twice the training time.
# Minutes for the fashion task (9,976 train + val rows) on the slower of our 2-core machines
# (AMD EPYC; the Intel one takes about 0.7 times as long), the means benchmarks/recipe.py
# measured on 2026-12-03: fast 4.7 (3 seeds), medium 11.6 (3 seeds: the fused model and its
# image expert), best 28.1 (1 seed). The image expert's 10 fine-tuning epochs (2026-12-04, 5
# before) add about half a minute on the Intel machine; not measured on the AMD one.
PRESETS = {
    "fast": Preset(
        "the head on frozen pretrained features only (no fine-tuning)",
        _RECIPE_MODEL, {**_RECIPE_TRAINING, "fine_tune_epochs": 0}, 1, False, 4.7),
    "medium": Preset(
        "frozen features, then the top 3 image-backbone blocks fine-tuned on their cached "
        "inputs; the fused model and one expert per image input, served as their "
        "geometric mean; each then trained again on the train and val rows for the epochs "
        "val chose", _RECIPE_MODEL,
        {**_RECIPE_TRAINING, "fine_tune_epochs": 5}, 1, True, 11.6, _IMAGE_ONLY_TRAINING,
        _IMAGE_RUN_TRAINING, refit=True),
    "best": Preset(
        "medium, three times with other seeds, all combined into one model",
        _RECIPE_MODEL, {**_RECIPE_TRAINING, "fine_tune_epochs": 5}, 3, True, 28.1,
        _IMAGE_ONLY_TRAINING, _IMAGE_RUN_TRAINING, refit=True),
}
DEFAULT_PRESET = "medium"


def get_preset(name):
    """A preset by name."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}. Expected one of {list(PRESETS)}. "
                         f"Received: preset={name!r}")
    return PRESETS[name]


def preset_arguments(name, section, kinds=()):
    """The settings a preset gives one section: `"model"` or `"training"`.

    Args:
        name: a preset name.
        section: `"model"` (for `build_classifier_for`) or `"training"` (for `train`).
        kinds: the kinds of the model's inputs (`"image"`, `"text"`, `"tabular"`),
            where known: a model of images alone trains with the preset's
            `image_only` and `image_run` settings too.

    Example:

    >>> preset_arguments("fast", "training")
    {'class_weight': 'balanced', 'fine_tune_epochs': 0}
    >>> images = preset_arguments("medium", "training", kinds={"image"})
    >>> images["label_smoothing"], images["fine_tune_epochs"], images["unfreeze_blocks"]
    (0.1, 10, 5)
    """
    settings = dict(getattr(get_preset(name), section))
    if section == "training":
        settings.update(alone_arguments(name, kinds))
    return settings


def alone_arguments(name, kinds, expert=False):
    """The training settings a preset adds for a model whose inputs are of `kinds`.

    A model of images alone takes the preset's `image_only` settings, and
    its `image_run` ones unless it is the `expert` of a fused run; other
    models none.

    Example:

    >>> alone_arguments("medium", {"image"})
    {'label_smoothing': 0.1, 'fine_tune_epochs': 10, 'unfreeze_blocks': 5}
    >>> alone_arguments("medium", {"image"}, expert=True)
    {'label_smoothing': 0.1, 'fine_tune_epochs': 10}
    >>> alone_arguments("medium", {"image", "text"})
    {}
    """
    if set(kinds) != {"image"}:
        return {}
    preset = get_preset(name)
    return {**preset.image_only, **({} if expert else preset.image_run)}


def with_preset(section, kinds=None):
    """Gives a function a `preset=` argument that fills the settings not passed explicitly.

    Args:
        section: `"model"` or `"training"`: which of the preset's settings.
        kinds: a function of the call's arguments that gives the kinds of the
            model's inputs (see `preset_arguments`); `None` where unknown.

    Example:

    >>> @with_preset("training")
    ... def fit(model, fine_tune_epochs=5, class_weight=None):
    ...     return fine_tune_epochs, class_weight
    >>> fit(None, preset="fast"), fit(None, preset="fast", fine_tune_epochs=2)
    ((0, 'balanced'), (2, 'balanced'))
    """

    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, preset=None, **kwargs):
            if preset is not None:
                known = kinds(*args, **kwargs) if kinds else ()
                kwargs = {**preset_arguments(preset, section, known), **kwargs}
            return function(*args, **kwargs)

        return wrapper

    return decorate


def parse_duration(value):
    """Seconds of a duration such as `"15m"`, `"1h30m"`, `"90s"`, `"2h"` or a number of seconds.

    Example:

    >>> parse_duration("1h30m"), parse_duration("15m"), parse_duration(90)
    (5400.0, 900.0, 90.0)
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?",
                             text)
        if not text or parts is None:
            raise ValueError(f"A time limit is a number of seconds or a duration such as 15m, "
                             f"1h30m or 90s. Received: {value!r}")
        hours, minutes, rest = (float(part or 0) for part in parts.groups())
        seconds = hours * 3600 + minutes * 60 + rest
    if not seconds > 0:
        raise ValueError(f"A time limit must be positive. Received: {value!r}")
    return seconds


def estimated_minutes(name, rows):
    """The wall time a preset's run is expected to take on 2 CPU cores, in minutes."""
    return get_preset(name).minutes_per_10k_rows * rows / 10_000


def choose_preset(time_limit, rows):
    """The best preset whose expected time fits a time limit, and why.

    Plans with 90% of the limit (the rest is slack for a slower machine);
    a GPU makes every preset faster, so the choice is on the safe side.

    Args:
        time_limit: seconds, or a duration such as `"15m"`.
        rows: training + validation rows.

    Returns:
        `(preset name, a sentence saying why)`; `"fast"` when none fits.

    Example:

    >>> choose_preset("15m", 10_000)[0], choose_preset("1h", 10_000)[0]
    ('medium', 'best')
    """
    seconds = parse_duration(time_limit)
    minutes = {name: estimated_minutes(name, rows) for name in PRESETS}
    fitting = [name for name in PRESETS if minutes[name] * 60 <= 0.9 * seconds]
    chosen = fitting[-1] if fitting else "fast"
    others = ", ".join(f"{name} ~{minutes[name]:.0f} min" for name in PRESETS)
    others += " on 2 CPU cores, before any refit"
    why = (f"the best that fits the time limit of {seconds / 60:g} min for {rows:,} rows "
           f"({others})" if fitting else
           f"no preset fits the time limit of {seconds / 60:g} min for {rows:,} rows "
           f"({others}): 'fast', and training stops at the limit")
    return chosen, why
