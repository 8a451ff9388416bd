"""Doctests of the package run quiet: the library's progress lines are no part of an example."""

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
