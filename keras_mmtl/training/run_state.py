"""What a run folder was trained on: a fingerprint of the settings and the data.

A run folder resumes (or reuses a finished run) only for the settings and
data it was trained on; `check_run_folder` stops any other run before it
starts, and `clear_run_folder` forgets the old one (`--overwrite`).
"""

import hashlib
import json

import numpy as np

from keras_mmtl.files import find, join_path, read_bytes, remove, write_json

# What a run folder holds (`train` writes them).
STATE_FILE = "state.json"
MODEL_FILE = "model.keras"
LOGS = "logs"
REFIT_FOLDER = "refit"  # where `refit` trains again on the train and val rows
FINGERPRINT_FILE = "fingerprint.json"
# Config keys that do not change the trained model: paths whose data is fingerprinted
# itself, outputs, and the feature cache (it gives the same model).
NOT_FINGERPRINTED = ("data.manifest", "data.data_root", "data.skip_bad_rows",
                     "transfer.source_manifest", "training.cache_features", "training.projector",
                     "output.")
# What training leaves in a run folder (`cache/`, keyed by its own content, is kept).
TRAINING_STATE = (STATE_FILE, MODEL_FILE, "phase*.weights.h5", "backup", "checkpoints", LOGS,
                  "eval", "source", "target", "workers", "member*", REFIT_FOLDER)


class StaleRunError(ValueError):
    """A run folder holds a run trained on other settings or data than those asked for."""


def fingerprint(config, datasets):
    """The fingerprint of a run: its model settings and a digest of each dataset.

    Args:
        config: a dict of config sections (`RunConfig.to_dict()`), with the
            preset resolved.
        datasets: dict of name (`"data.manifest"`...) -> `Records`.

    Returns:
        a JSON-able dict `{"config": {"section.key": value}, "data": {name: digest}}`.

    Example:

    >>> from keras_mmtl.data import from_arrays
    >>> records = from_arrays(["a", "b"], texts=["x", "y"], splits=["train"] * 2)
    >>> found = fingerprint({"training": {"epochs": 3}}, {"data.manifest": records})
    >>> found["config"], len(found["data"]["data.manifest"])
    ({'training.epochs': 3}, 64)
    """
    settings = {f"{section}.{key}": value for section, values in config.items()
                for key, value in values.items()}
    return {"config": {key: value for key, value in settings.items()
                       if not key.startswith(NOT_FINGERPRINTED)},
            "data": {name: data_digest(records) for name, records in datasets.items()}}


def data_digest(records):
    """A digest of what a model learns from: every input, label and split of the records.

    Image files count by path, size and modification time, so a replaced
    image changes the digest without being read.
    """
    digest = hashlib.sha256()

    def add(value):
        digest.update(repr(value).encode("utf-8", "backslashreplace") + b"\0")

    add((records.tasks, records.tabular_columns, records.input_digest()))
    for task in records.tasks:
        digest.update(np.ascontiguousarray(records.task_labels(task), np.int32).tobytes())
    add(list(records.splits))
    return digest.hexdigest()


def check_run_folder(run_dir, found, overwrite=False):
    """Readies `run_dir` for a run with fingerprint `found`, or stops before any work.

    A folder without training state, or whose fingerprint is `found`, is
    used as it is (an interrupted run resumes, a finished one is reused);
    with `overwrite`, its training state is cleared first. Then `found` is
    written to `run_dir/fingerprint.json`.

    Raises:
        StaleRunError: the folder holds a run of other settings or data (or
            one from before fingerprints were kept), and not `overwrite`.
    """
    path = join_path(run_dir, FINGERPRINT_FILE)
    found = json.loads(json.dumps(found))  # as it reads back
    if overwrite:
        clear_run_folder(run_dir)
    elif _training_state(run_dir):
        recorded = None
        try:
            recorded = json.loads(read_bytes(path))
        except (OSError, ValueError):  # none, or not whole: what it trained on is unknown
            pass
        if recorded != found:
            raise StaleRunError(
                f"The run folder {run_dir} holds a run of other settings or data, so it can "
                "neither resume nor be reused; nothing was trained or exported. What changed: "
                f"{changes(recorded, found)}. To train with these settings, pass "
                "--overwrite (Python: run_experiment(..., overwrite=True)), which clears its "
                "training state (the feature cache is kept), or give another run folder with "
                "--run-dir (output.run_dir).")
    write_json(path, found)


def clear_run_folder(run_dir):
    """Removes what training left in `run_dir` (state, checkpoints, models, logs, members)."""
    for path in _training_state(run_dir):
        remove(path)


def _training_state(run_dir):
    return sorted(path for name in TRAINING_STATE for path in find(run_dir, name))


def changes(recorded, found):
    """What differs between a recorded fingerprint and a new one, in words.

    A fingerprint is `{"config": {key: value}, "data": {name: digest}}`.
    """
    if recorded is None:
        return (f"unknown (the folder has no readable {FINGERPRINT_FILE}: it was trained before "
                "keras-mmtl recorded what a run was trained on)")
    old, new = recorded.get("config", {}), found["config"]
    keys = sorted(key for key in {*old, *new} if old.get(key) != new.get(key))
    said = [f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in keys[:8]]
    if len(keys) > 8:
        said.append(f"{len(keys) - 8} more settings")
    data = recorded.get("data", {})
    said += [f"the data of {name} (its rows or image files)" for name in sorted(
        {*data, *found["data"]}) if data.get(name) != found["data"].get(name)]
    return ", ".join(said)
