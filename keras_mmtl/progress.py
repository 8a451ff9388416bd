"""Messages and progress: the `keras_mmtl` logger, and a display for each long step.

The library says what it does through the standard `logging` module, logger
`"keras_mmtl"`: phases, presets, what a run reuses (INFO), problems it works
around (WARNING). By default these go to the current standard output as plain
lines, so a notebook and a terminal show them; `set_verbosity("warning")`
keeps only problems, and `set_verbosity(None)` hands the logger back to your
own logging configuration (its records then propagate to the root logger).

A step that can take more than a few seconds (checking images, extracting
features, scoring a split) shows a progress bar on a terminal or in a
notebook, and one line when it ends elsewhere (a log file, CI), so logs stay
short; nothing at all when the verbosity is above INFO.
"""

import contextlib
import itertools
import logging
import os
import re
import sys
import time

import keras

logger = logging.getLogger("keras_mmtl")

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


class _CurrentStdout(logging.StreamHandler):
    """Writes to whatever `sys.stdout` is when a message comes (notebooks and pytest swap it)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):  # logging.StreamHandler sets it; the current stdout wins
        pass


_HANDLER = _CurrentStdout()
_HANDLER.setFormatter(logging.Formatter("%(message)s"))


def set_verbosity(level="info"):
    """How much the library says: `"debug"`, `"info"` (default), `"warning"`, `"error"`.

    `None` removes the library's own handler: messages then go wherever your
    `logging` configuration sends them.

    Example:

    >>> set_verbosity("warning")
    >>> logger.info("not shown")
    >>> set_verbosity("info")
    >>> logger.info("shown")
    shown
    """
    if level is None:
        logger.removeHandler(_HANDLER)
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
        return
    if level not in LEVELS:
        raise ValueError(f"Unknown verbosity {level!r}; use one of {list(LEVELS)} or None.")
    if _HANDLER not in logger.handlers:
        logger.addHandler(_HANDLER)
    logger.propagate = False
    logger.setLevel(LEVELS[level])


def interactive():
    """Whether progress can redraw one line: a terminal, or a notebook's kernel.

    A kernel is recognised by its running shell, not by `ipykernel` having
    been imported (a test run or a tool may import it without being one).
    """
    if getattr(sys.stdout, "isatty", lambda: False)() or "PYCHARM_HOSTED" in os.environ:
        return True
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if hasattr(ipython, "get_ipython") else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def keras_verbose(verbose="auto"):
    """`verbose` for Keras' loops: `"auto"` follows the library's verbosity and the display.

    A bar on a terminal or in a notebook (1), a line per epoch elsewhere (2),
    nothing when the logger is quieter than INFO (0); other values are kept.
    """
    if verbose != "auto":
        return verbose
    if not logger.isEnabledFor(logging.INFO):
        return 0
    return 1 if interactive() else 2


class Progress:
    """Progress of one long step over `total` items.

    A bar on a terminal or in a notebook; elsewhere one line when the step
    ends ("Checking images: 15000 images in 12.3 s"); nothing when the
    logger is quieter than INFO.

    Example:

    >>> set_verbosity("info")
    >>> with Progress("Counting", 3, unit="items") as progress:  # doctest: +ELLIPSIS
    ...     for _ in range(3):
    ...         progress.add(1)
    Counting: 3 items in ... s
    """

    def __init__(self, title, total, unit="rows"):
        self.title, self.total, self.unit = title, int(total), unit
        self.done = 0
        self._bar = None
        self._shown = logger.isEnabledFor(logging.INFO) and self.total > 0

    def __enter__(self):
        self._started = time.perf_counter()
        if self._shown and interactive():
            logger.info(f"{self.title}:")
            self._bar = keras.utils.Progbar(self.total, unit_name=self.unit.rstrip("s"))
        return self

    def add(self, count):
        """Marks `count` more items done."""
        self.done = min(self.total, self.done + int(count))
        if self._bar is not None:
            self._bar.update(self.done)

    def __exit__(self, kind, error, trace):
        if self._bar is not None or not self._shown or kind is not None:
            return
        seconds = time.perf_counter() - self._started
        logger.info(f"{self.title}: {self.done} {self.unit} in {seconds:.1f} s")

    def callback(self, batch_size):
        """A Keras callback advancing this display by `batch_size` rows per predicted batch."""
        return _PredictProgress(self, batch_size)


class _PredictProgress(keras.callbacks.Callback):
    def __init__(self, progress, batch_size):
        super().__init__()
        self.progress, self.batch_size = progress, batch_size

    def on_predict_batch_end(self, batch, logs=None):
        self.progress.add(self.batch_size)


def predict_with_progress(model, data, title, rows, batch_size):
    """`model.predict(data)` with a `Progress` display over its `rows` rows."""
    with Progress(title, rows) as progress, expected_retracing():
        return model.predict(data, verbose=0, callbacks=[progress.callback(batch_size)])


class _NotRetracing(logging.Filter):
    def filter(self, record):
        return "triggered tf.function retracing" not in record.getMessage()


@contextlib.contextmanager
def expected_retracing():
    """Within: TensorFlow's "triggered tf.function retracing" warnings are dropped.

    The library's own loops trace on purpose: each model (the image-only,
    text-only and fused ones, each phase's top model, each feature
    extractor) gets its own predict and train functions, which TensorFlow
    counts as retraces of one Keras function, and text batches of varying
    length trace until `reduce_retracing` makes their shape general. Your
    own code keeps the warning.
    """
    logger = logging.getLogger("tensorflow")
    notice = _NotRetracing()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def error_gist(error):
    """The line of an error message that names the problem.

    TensorFlow's (an `OpError`, with `.message`) comes last, after the trace
    of the traced function, stripped of node names, and a failed assertion
    reads as its message and data; other errors' first line.

    Example:

    >>> import tensorflow as tf
    >>> error_gist(tf.errors.InvalidArgumentError(None, None, (
    ...     "Graph execution error:\\n\\nassertion failed: [Input text: items that are empty "
    ...     "(0-based):] [1 3]\\n\\t [[{{node Assert}}]] [Op:__inference_serve_9]")))
    'Input text: items that are empty (0-based): 1 3'
    """
    lines = (getattr(error, "message", None) or str(error)).splitlines()
    if hasattr(error, "message"):
        lines = [re.sub(r"\{\{[^}]*\}\}|\[\[.*?\]\]|\[Op:[^]]*\]( name:)?|^\w+Error: ", "",
                        line.strip()) for line in reversed(lines)]
    gist = next((line.strip() for line in lines if line.strip()), type(error).__name__)
    if gist.startswith("assertion failed: "):  # [message] [data]..., up to a [Condition ...]
        parts = re.findall(r"\[([^\[\]]*)\]", gist)
        kept = itertools.takewhile(lambda part: not part.startswith("Condition "), parts)
        gist = " ".join(kept) or gist
    return gist


set_verbosity("info")
