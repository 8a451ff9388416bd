"""The `keras-mmtl` command's start: TensorFlow's C++ start-up lines held back.

Importing TensorFlow and probing for GPUs write a few lines from C++ straight
to the process's standard error (oneDNN, CUDA drivers, CPU instructions, "failed
call to cuInit" on a machine without a GPU), before Python's logging or
`TF_CPP_MIN_LOG_LEVEL` can stop them. The command line holds these back;
anything else TensorFlow writes then (a GPU library that fails to load) is
passed on. Imported as a library, nothing is filtered; `TF_CPP_MIN_LOG_LEVEL=0`
or `--verbose` shows everything in the command too.
"""

import contextlib
import os
import re
import sys
import tempfile

NOISE = re.compile(r"I\d{4} |WARNING: All log messages before absl::InitializeLog\(\) is called"
                   r"|To enable the following instructions: |E\d{4} .*failed call to cuInit")


def is_command(argv=None):
    """Whether this process is the `keras-mmtl` command (or `python -m keras_mmtl`).

    Example:

    >>> is_command(["/usr/bin/python3", "-m", "keras_mmtl", "train"])
    True
    >>> is_command(["/usr/bin/python3", "-m", "pytest"])
    False
    """
    argv = list(getattr(sys, "orig_argv", sys.argv) if argv is None else argv)
    ran_module = "-m" in argv[:-1] and argv[argv.index("-m") + 1] == "keras_mmtl"
    return ran_module or any(os.path.basename(arg) in ("keras-mmtl", "keras-mmtl.exe")
                             for arg in argv[:2])


def without_noise(text):
    """`text` without the start-up lines (see the module docstring).

    Example:

    >>> without_noise("I0000 00:00:17.6 1 port.cc:153] oneDNN custom operations are on.\\n"
    ...               "E0000 00:00:17.9 1 cuda_dnn.cc:8] Unable to register cuDNN factory\\n")
    'E0000 00:00:17.9 1 cuda_dnn.cc:8] Unable to register cuDNN factory\\n'
    """
    return "".join(line for line in text.splitlines(keepends=True) if not NOISE.match(line))


@contextlib.contextmanager
def quiet_native_startup():
    """Within: what is written to file descriptor 2 is held, then passed on without the noise."""
    argv = getattr(sys, "orig_argv", sys.argv)
    if (not is_command() or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0"
            or {"-v", "--verbose"} & set(argv)):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            sys.stderr.write(without_noise(held.read().decode("utf-8", "replace")))
            sys.stderr.flush()
