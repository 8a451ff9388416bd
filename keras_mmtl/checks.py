"""Checks of arguments that every module makes alike."""


def check_known(given, known, message, error=ValueError):
    """Raises `error(message(unknown))` when `given` holds names that `known` lacks.

    Args:
        given: the names passed (a dict's keys, a list...).
        known: the names allowed.
        message: a function of the sorted list of unknown names -> the error's text,
            which says what the names are and what is expected.
        error: the exception class raised.

    Example:

    >>> check_known({"a": 1}, ["a", "b"], lambda unknown: f"Unknown keys {unknown}.")
    >>> check_known(["c", "a"], ["a", "b"], lambda unknown: f"Unknown keys {unknown}.")
    Traceback (most recent call last):
    ...
    ValueError: Unknown keys ['c'].
    """
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise error(message(unknown))
