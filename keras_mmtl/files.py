"""Files written whole or not at all: what a run, a report or a cache leaves on disk.

A run killed mid-write (Ctrl-C, an out-of-memory kill, a preempted machine) must leave the
previous file, never half of a new one: every file the library writes for later reading goes
through `save_atomic` (write a temporary file beside it, then rename it into place).
"""

import json
import os


def save_atomic(save, path):
    """Calls `save(tmp_path)`, then renames into place: never a half-written file.

    Args:
        save: writes a file at the path it is given (e.g. `model.save_weights`).
        path: where the file ends up; its folder is created.

    Example:

    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "out", "notes.txt")
    >>> save_atomic(lambda tmp: open(tmp, "w").write("done"), path)
    >>> open(path).read(), os.listdir(os.path.dirname(path))
    ('done', ['notes.txt'])
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    base, name = os.path.split(path)
    tmp = os.path.join(base, f".tmp-{name}")
    save(tmp)
    os.replace(tmp, path)


def write_json(path, value, indent=2):
    """Writes `value` as JSON (UTF-8) at `path`, atomically (see `save_atomic`).

    Example:

    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "state.json")
    >>> write_json(path, {"epoch": 3})
    >>> json.load(open(path))
    {'epoch': 3}
    """

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=indent)

    save_atomic(write, path)


def write_text(path, text):
    """Writes `text` (UTF-8) at `path`, atomically (see `save_atomic`)."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    save_atomic(write, path)
