"""Doctests run quiet: the library's progress lines are not part of an example's output."""

import pytest


@pytest.fixture(autouse=True)
def _quiet_doctests(request):
    if type(request.node).__name__ != "DoctestItem":
        yield
        return
    from keras_mmtl.progress import set_verbosity

    set_verbosity("warning")
    try:
        yield
    finally:
        set_verbosity("info")
