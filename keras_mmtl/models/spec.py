"""What a classifier is, read from the model itself: `describe(model)`.

Every part of the package that needs to know what a built or loaded classifier takes and
gives (training, the feature cache, evaluation, calibration, export, TFLite, transfer,
explanations) reads one `ClassifierSpec`. Its facts live in the model's own saved
configuration, so a `.keras` file describes itself after loading:

- the inputs are named after their modalities (`image`, `image_2`, `text`, `tabular`,
  `<modality>_present` for a modality that may be missing), and the image inputs' shape
  is the image size;
- each head (`ClassifierHead`) holds its task's class names, and the outputs of a
  classifier with several are named after their tasks (`<task>_aux_<modality>` for an
  auxiliary head);
- the scratch text encoder's tokenizer layer (`TextTokenizer`, named `text_tokenizer`) is
  the line between the preprocessing that serving needs (strings in, token ids out) and the
  learned layers: the feature cache stores its ids and TFLite cuts the graph there.
"""

import dataclasses
from typing import Optional

from keras_mmtl.modalities import is_input_name, modality_kind, ordered
from keras_mmtl.models.missing import presence_input
from keras_mmtl.models.text import TOKENIZER, TextTokenizer


@dataclasses.dataclass(frozen=True)
class ClassifierSpec:
    """What a classifier takes and gives (see `describe`).

    Attributes:
        modalities: the inputs it takes in model order, e.g. `("image", "text")`.
        presence: the modalities whose presence it also takes as an input
            (`"<modality>_present"`, built with `missing_modalities=True`).
        tasks: `{task: class names}` of its main heads; `{None: class names}`
            for a classifier with one output.
        outputs: `{output name: task}` of a classifier with named outputs
            (several tasks or auxiliary heads), or `None` for one output.
        image_size: `(height, width)` of its image inputs, or `None`.
        tokenizers: `{text modality: tokenizer layer}` for the text inputs
            tokenized into one tensor of ids inside the model (the scratch
            encoder): the end of their preprocessing.
    """

    modalities: tuple
    presence: tuple
    tasks: dict
    outputs: Optional[dict]
    image_size: Optional[tuple]
    tokenizers: dict

    @property
    def multi_output(self):
        """Whether the model returns a dict of outputs (several tasks or auxiliary heads)."""
        return self.outputs is not None

    @property
    def label_classes(self):
        """What `read_manifest(class_names=...)` takes to read data for the classifier.

        The class names of a classifier with one task; `{task: class names}`
        of one with several.
        """
        return self.class_names() if self.outputs is None else dict(self.tasks)

    def class_names(self, task=None):
        """The class names of the first task, or of `task`."""
        if task is None:
            return next(iter(self.tasks.values()))
        if task not in self.tasks:
            raise ValueError(f"This classifier has no task {task!r}; its tasks: "
                             f"{[t for t in self.tasks if t is not None]}.")
        return self.tasks[task]

    def head(self, task=None):
        """The name of the head layer of a task (`None`: the first task's)."""
        return head_name(task if task is not None else next(iter(self.tasks)))

    def dataset_arguments(self):
        """The `make_dataset` arguments that give the classifier the inputs it takes."""
        return {"image_size": self.image_size, "modalities": self.modalities,
                "presence": self.presence, "tasks": self.outputs}

    def summary(self):
        """One line per fact, for people."""
        tasks = "; ".join(f"{task or 'label'}: {len(names)} classes"
                          for task, names in self.tasks.items())
        lines = [f"inputs: {', '.join(self.modalities)}", f"tasks: {tasks}"]
        if self.presence:
            lines.append(f"may be missing: {', '.join(self.presence)}")
        if self.image_size:
            lines.append(f"image size: {self.image_size[0]}x{self.image_size[1]}")
        if self.outputs and len(self.outputs) > len(self.tasks):
            lines.append(f"outputs: {', '.join(self.outputs)}")
        return "\n".join(lines)


def head_name(output=None):
    """The name of the head layer of one output (`None`: a one-output classifier's)."""
    return "head" if output is None else f"head_{output}"


def auxiliary_output(task, modality):
    """The output name of the auxiliary head of one task on one modality alone."""
    return f"{task}_aux_{modality}"


def describe(model):
    """What a classifier takes and gives, read from its layers and inputs.

    Works on every classifier the builders make, on those loaded from a
    `.keras` file (today's and earlier ones) and on ensembles.

    Example:

    >>> from keras_mmtl.models import build_classifier
    >>> model = build_classifier(["cat", "dog"], image_backbone="mobilenet_v2_0.35",
    ...                          image_weights=None, image_size=(64, 48),
    ...                          text_vocabulary=["a", "cat", "dog"])
    >>> spec = describe(model)
    >>> spec.modalities, spec.class_names(), spec.image_size, spec.tokenizers
    (('image', 'text'), ['cat', 'dog'], (64, 48), {'text': 'text_tokenizer'})
    >>> print(spec.summary())
    inputs: image, text
    tasks: label: 2 classes
    image size: 64x48
    """
    modalities = ordered(name for name in model.input if is_input_name(name))
    outputs = output_tasks(model)
    if outputs is None:
        tasks = {None: list(model.get_layer(head_name()).class_names)}
    else:
        tasks = {task: list(model.get_layer(head_name(task)).class_names)
                 for name, task in outputs.items() if name == task}
    layers = {layer.name: layer for layer in model.layers}
    tokenizer = layers.get(TOKENIZER)
    tokenizers = {name: TOKENIZER for name in modalities if modality_kind(name) == "text"
                  and isinstance(tokenizer, TextTokenizer)}
    return ClassifierSpec(
        modalities=modalities,
        presence=tuple(name for name in modalities if presence_input(name) in model.input),
        tasks=tasks, outputs=outputs,
        image_size=input_image_size(model),
        tokenizers=tokenizers)


def input_image_size(model):
    """The `(height, width)` of a model's image inputs (any model on them), or `None`."""
    image = next((tensor for name, tensor in model.input.items()
                  if is_input_name(name) and modality_kind(name) == "image"), None)
    return None if image is None else tuple(image.shape[1:3])


def output_tasks(model):
    """`{output name: task}` of a model with a classifier's outputs, or `None` for one output.

    `describe(model).outputs` for a whole classifier; this reads the outputs
    alone, so it also serves a model that ends in a classifier's heads
    without holding them at its top level (the top trained on cached features).
    """
    if not isinstance(model.output, dict):
        return None
    # Not from the model's inputs: a model on cached features has other ones.
    def task(name):
        for other in model.output:
            prefix = auxiliary_output(other, "")
            if name.startswith(prefix) and is_input_name(name[len(prefix):]):
                return other
        return name

    return {name: task(name) for name in model.output}
