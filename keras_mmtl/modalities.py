"""Input names: one kind per modality (image, text, tabular), several inputs of a kind.

A dataset may have more than one image column (front and back photos) or text column (title
and description). Their inputs are named by kind, in column order: `"image"`, `"image_2"`,
..., `"text"`, `"text_2"`, ...; there is one `"tabular"` input for all numeric columns.
Inputs of one kind share their branch (backbone or text encoder) in a model.
"""

import re

KINDS = ("image", "text", "tabular")
_NAME = re.compile(r"^(image|text)(?:_([2-9]|[1-9]\d+))?$|^tabular$")


def input_names(kind, count):
    """The names of `count` inputs of one kind.

    Example:

    >>> input_names("text", 3)
    ['text', 'text_2', 'text_3']
    """
    if kind not in KINDS or count < 1 or (kind == "tabular" and count != 1):
        raise ValueError(f"Expected a kind of {KINDS} and a count >= 1 (1 for tabular). "
                         f"Received: kind={kind!r}, count={count}")
    return [kind] + [f"{kind}_{i}" for i in range(2, count + 1)]


def modality_kind(name):
    """The kind of an input name: `"image"` for `"image_2"`, `"text"` for `"text"`...

    Example:

    >>> modality_kind("image_2"), modality_kind("tabular")
    ('image', 'tabular')
    """
    match = _NAME.match(name)
    if not match:
        raise ValueError(f"Not an input name: {name!r}. Expected image, image_2, ..., text, "
                         "text_2, ... or tabular.")
    return match.group(1) or "tabular"


def is_input_name(name):
    """Whether `name` names a modality input (not a presence mask or cached features)."""
    return bool(_NAME.match(name))


def ordered(names):
    """Input names in model order: images, then texts, then tabular, each in column order."""
    def key(name):
        kind = modality_kind(name)
        return KINDS.index(kind), 1 if name == kind else int(name.rsplit("_", 1)[1])

    return tuple(sorted(names, key=key))
