"""Files: written whole or not at all, and read from any filesystem TensorFlow knows.

A run killed mid-write (Ctrl-C, an out-of-memory kill, a preempted machine) must leave the
previous file, never half of a new one: every file the library writes for later reading goes
through `save_atomic` (write a temporary file beside it, then rename it into place).

Data and runs may live on any filesystem TensorFlow has (`gs://`, `s3://`, `hdfs://`,
`ram://`...): manifests, images, run folders, caches and exports are read and written
through `is_file`, `open_text`, `read_bytes`, `write_bytes`, `make_folder`... here, and
images decoded by `tf.io.read_file`, which reads the same paths.
"""

import glob
import io
import json
import os
import posixpath
import shutil

import tensorflow as tf


def save_atomic(save, path):
    """Calls `save(tmp_path)`, then renames into place: never a half-written file.

    Args:
        save: writes a file at the path it is given (e.g. `model.save_weights`);
            for a path on a TensorFlow filesystem (`gs://...`), through it.
        path: where the file ends up; its folder is created.

    Example:

    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "out", "notes.txt")
    >>> save_atomic(lambda tmp: open(tmp, "w").write("done"), path)
    >>> open(path).read(), os.listdir(os.path.dirname(path))
    ('done', ['notes.txt'])
    """
    if is_remote(path):  # TensorFlow filesystems: a rename within the folder
        base, name = posixpath.split(path)
        tf.io.gfile.makedirs(base)
        tmp = posixpath.join(base, f".tmp-{name}")
        save(tmp)
        tf.io.gfile.rename(tmp, path, overwrite=True)
        return
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

    write_text(path, json.dumps(value, indent=indent))


def write_bytes(path, data):
    """Writes `data` at `path` on any filesystem, atomically (see `save_atomic`).

    Example:

    >>> write_bytes("ram://notes/a.bin", b"done"); read_bytes("ram://notes/a.bin")
    b'done'
    """

    def write(tmp):
        with (tf.io.gfile.GFile(tmp, "wb") if is_remote(tmp) else open(tmp, "wb")) as f:
            f.write(data)

    save_atomic(write, path)


def write_text(path, text):
    """Writes `text` (UTF-8) at `path` on any filesystem, atomically (see `save_atomic`)."""
    write_bytes(path, text.encode("utf-8"))


# Paths with a scheme (`gs://`, `s3://`, `hdfs://`, `ram://`...) go through TensorFlow's
# filesystems (`tf.io.gfile`); plain paths through Python's, as they always did.


def is_remote(path):
    """Whether `path` names a file on a TensorFlow filesystem (`gs://bucket/a.jpg`, `ram://x`).

    Example:

    >>> is_remote("gs://bucket/products.csv"), is_remote("data/products.csv")
    (True, False)
    """
    return "://" in str(path)


def is_file(path):
    """Whether `path` is an existing file (not a folder), on any filesystem."""
    if not is_remote(path):
        return os.path.isfile(path)
    return tf.io.gfile.exists(path) and not tf.io.gfile.isdir(path)


def file_size(path):
    """The size of a file in bytes, on any filesystem."""
    return tf.io.gfile.stat(path).length if is_remote(path) else os.path.getsize(path)


def file_stamp(path):
    """`(size, modification time in ns)`: what tells a replaced file from the one read before."""
    if is_remote(path):
        stat = tf.io.gfile.stat(path)
        return stat.length, stat.mtime_nsec
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def exists(path):
    """Whether a file or folder is at `path`, on any filesystem."""
    return tf.io.gfile.exists(path) if is_remote(path) else os.path.exists(path)


def make_folder(path):
    """Creates a folder and its parents (nothing if it exists), on any filesystem."""
    if is_remote(path):
        tf.io.gfile.makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def remove(path):
    """Removes a file or a whole folder, if there is one, on any filesystem.

    Example:

    >>> write_bytes("ram://old/run/a.bin", b"x"); remove("ram://old/run"); exists("ram://old/run")
    False
    """
    if not exists(path):
        return
    if is_remote(path) and tf.io.gfile.isdir(path):
        # Bottom-up, file by file: object stores list names that are prefixes, not
        # folders, and `rmtree` stops at the first name that is not there to delete.
        for folder, _, names in tf.io.gfile.walk(path, topdown=False):
            for delete, name in [*((tf.io.gfile.remove, join_path(folder, n)) for n in names),
                                 (tf.io.gfile.rmtree, folder)]:
                try:
                    delete(name)
                except tf.errors.NotFoundError:
                    pass
    elif is_remote(path):
        tf.io.gfile.remove(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def find(folder, pattern):
    """The paths in `folder` whose names match a glob `pattern` (`"phase*.h5"`), sorted."""
    if is_remote(folder):
        return sorted(tf.io.gfile.glob(posixpath.join(folder, pattern)))
    return sorted(glob.glob(os.path.join(glob.escape(folder), pattern)))


def read_bytes(path):
    """The bytes of a file, on any filesystem (`FileNotFoundError` when it is not there)."""
    if is_remote(path):
        try:
            with tf.io.gfile.GFile(path, "rb") as f:
                return f.read()
        except tf.errors.NotFoundError:
            raise FileNotFoundError(f"No such file: {path}") from None
    with open(path, "rb") as f:
        return f.read()


def open_text(path):
    """A text file (UTF-8, a BOM dropped, bad bytes kept as surrogates) open for reading.

    Newlines are left as they are, as the `csv` module needs. A remote file is read whole.
    """
    if not is_remote(path):
        return open(path, newline="", encoding="utf-8-sig", errors="surrogateescape")
    text = read_bytes(path).decode("utf-8-sig", "surrogateescape")
    return io.StringIO(text, newline="")


def folder_of(path):
    """The folder a file is in, absolute for a local path: where relative names start.

    Example:

    >>> folder_of("gs://bucket/data/products.csv")
    'gs://bucket/data'
    """
    return posixpath.dirname(path) if is_remote(path) else os.path.dirname(os.path.abspath(path))


def join_path(folder, name):
    """`name` relative to `folder` (a path with its own scheme, or absolute, stays as it is).

    Example:

    >>> join_path("gs://bucket/data", "images/1.jpg"), join_path("gs://bucket", "ram://x.jpg")
    ('gs://bucket/data/images/1.jpg', 'ram://x.jpg')
    """
    if is_remote(name):
        return name
    return posixpath.join(folder, name) if is_remote(folder) else os.path.join(folder, name)
