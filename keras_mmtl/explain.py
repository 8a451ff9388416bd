"""Why a classifier answered as it did: which pixels, which words and which modality.

`explain` takes one raw sample (an image file or its bytes, a string), decodes it
as serving does (`keras_mmtl.export.request_inputs`) and measures three things
about the probability of one class:

- pixels: integrated gradients (Sundararajan et al., 2017, "Axiomatic
  Attribution for Deep Networks") from a blurred copy of the image, or from
  the black image of that paper (`BASELINES`);
- words: leave-one-word-out occlusion, one batched call per text. The text is
  tokenized inside the model, where no gradient reaches the string; dropping
  whole words works the same for every text encoder (scratch, TF-IDF,
  n-grams, WordPiece);
- modalities: the drop in the probability when a modality is removed, as
  `keras_mmtl.evaluation.modality_report` removes it, and the weights of
  the fusion (a gated fusion's gates, an attention fusion's attention).
"""

import base64
import dataclasses
import html
import io
import os

import keras
import numpy as np
import tensorflow as tf

from keras_mmtl.export import encoded_inputs, request_inputs
from keras_mmtl.modalities import modality_kind
from keras_mmtl.models.fusion import AttentionFusion, GatedFusion
from keras_mmtl.models.spec import describe

HTML_FILE = "explanation.html"


@dataclasses.dataclass
class Explanation:
    """What drove a classifier's probability of one class for one sample.

    Attributes:
        target: the class explained (by default the predicted one).
        probability: the model's probability of `target` for the sample.
        prediction: the predicted class.
        task: the task explained, for a multi-task model (else `None`).
        images: input name -> uint8 `(h, w, 3)`, the image as the model saw it.
        pixel_attributions: input name -> float32 `(h, w)` in [0, 1]: the
            integrated gradients' magnitude summed over the colour channels,
            divided by its maximum.
        baseline_probabilities: input name -> the probability of `target`
            with the image replaced by its baseline: the attributions share
            out `probability` minus this (near 0: the baseline keeps what the
            model needs, and the map explains little).
        convergence_deltas: input name -> |sum of the signed attributions -
            (probability - baseline probability)|; integrated gradients make
            it 0 with enough `steps` (a few hundredths is fine).
        word_attributions: input name -> `[(word, score)]` in text order, the
            words split on whitespace; score: how much the probability drops
            when the word is left out (negative: the word speaks against
            `target`).
        modality_drops: input name -> how much the probability drops when that
            input is removed (models with two or more image or text inputs).
        fusion_gates: input name -> its weight in the fusion for this
            sample: a `GatedFusion`'s gates, or how an `AttentionFusion`'s
            [CLS] token attends to each input (last block, heads averaged);
            empty for other fusions.

    Example:

    >>> explanation = explain(model, image="bag.jpg", text="Urban wool bag")  # doctest: +SKIP
    >>> print(explanation.summary())  # doctest: +SKIP
    Explaining 'red wool' (probability 0.970); predicted 'red wool'.
    Modality shares: image 60% (probability 0.002 without it), text 40% (...)
    text: top words 'wool' +0.964, 'bag' -0.002, 'Urban' -0.002
    image: the top 10% of pixels hold 41% of the attribution (...)
    >>> explanation.save("explanations/bag")  # doctest: +SKIP
    {'html': 'explanations/bag/explanation.html', 'image': 'explanations/bag/image_attribution.png'}
    """

    target: str
    probability: float
    prediction: str
    task: str = None
    images: dict = dataclasses.field(default_factory=dict, repr=False)
    pixel_attributions: dict = dataclasses.field(default_factory=dict, repr=False)
    baseline_probabilities: dict = dataclasses.field(default_factory=dict)
    convergence_deltas: dict = dataclasses.field(default_factory=dict)
    word_attributions: dict = dataclasses.field(default_factory=dict)
    modality_drops: dict = dataclasses.field(default_factory=dict)
    fusion_gates: dict = dataclasses.field(default_factory=dict)

    @property
    def modality_shares(self):
        """Input name -> share of the probability drops (the positive ones), summing to 1.

        All 0 when no input alone lowers the probability (each is redundant).
        """
        drops = {name: max(drop, 0.0) for name, drop in self.modality_drops.items()}
        total = sum(drops.values())
        return {name: drop / total if total else 0.0 for name, drop in drops.items()}

    def summary(self):
        """A few lines: the class, the modality shares, the top words, the pixels' spread."""
        task = "" if self.task is None else f" [task {self.task}]"
        lines = [(f"Explaining {self.target!r} (probability {self.probability:.3f}); "
                  f"predicted {self.prediction!r}{task}.")]
        if self.modality_drops:
            lines.append("Modality shares: " + ", ".join(
                f"{name} {share:.0%} (probability "
                f"{self.probability - self.modality_drops[name]:.3f} without it)"
                for name, share in self.modality_shares.items()))
        if self.fusion_gates:
            lines.append("Fusion weights: " + ", ".join(
                f"{name} {gate:.2f}" for name, gate in self.fusion_gates.items()))
        for name, words in self.word_attributions.items():
            top = sorted(words, key=lambda pair: -pair[1])[:5]
            lines.append(f"{name}: top words " + ", ".join(f"{w!r} {s:+.3f}" for w, s in top))
        for name, attribution in self.pixel_attributions.items():
            lines.append(f"{name}: the top 10% of pixels hold {_top_mass(attribution, 0.1):.0%} "
                         f"of the attribution (probability {self.baseline_probabilities[name]:.3f}"
                         f" from the baseline; convergence delta "
                         f"{self.convergence_deltas[name]:.3f}).")
        return "\n".join(lines)

    def image_png(self, name="image"):
        """The PNG bytes of an image input and its attribution heatmap, side by side."""
        if name not in self.pixel_attributions:
            raise ValueError(f"This explanation has no image attribution for {name!r}; it has "
                             f"{list(self.pixel_attributions)}.")
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(8, 4))
        FigureCanvasAgg(fig)
        left, right = fig.subplots(1, 2)
        left.imshow(self.images[name])
        right.imshow(self.images[name].mean(axis=-1), cmap="gray", vmin=0, vmax=255)
        shown = _smoothed(self.pixel_attributions[name])  # for the eye: the map, a little blurred
        heat = right.imshow(shown, cmap="inferno", alpha=np.clip(0.15 + shown, 0, 0.85),
                            vmin=0, vmax=1)
        fig.colorbar(heat, ax=right, fraction=0.046, label="attribution (smoothed)")
        for ax, title in ((left, name), (right, f"integrated gradients for {self.target!r}")):
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        return buffer.getvalue()

    def save_image(self, path, name="image"):
        """Writes `image_png(name)` to `path`; returns `path`."""
        with open(path, "wb") as f:
            f.write(self.image_png(name))
        return path

    def to_html(self):
        """A standalone HTML page: the heatmaps, and the words shaded by their scores.

        Words that raise the probability of the target are shaded orange,
        words that lower it blue, more deeply the more they weigh; a word's
        score shows when the pointer rests on it.
        """
        e = html.escape
        task = "" if self.task is None else f", task {e(self.task)}"
        parts = [(f"<h2>{e(self.target)} <small>probability {self.probability:.3f}, predicted "
                  f"{e(self.prediction)}{task}</small></h2>")]
        if self.modality_drops:
            parts.append("<p>Modality shares: " + ", ".join(
                f"{e(name)} {share:.0%}" for name, share in self.modality_shares.items()) + "</p>")
        if self.fusion_gates:
            parts.append("<p>Fusion weights: " + ", ".join(
                f"{e(name)} {gate:.2f}" for name, gate in self.fusion_gates.items()) + "</p>")
        for name in self.pixel_attributions:
            data = base64.b64encode(self.image_png(name)).decode("ascii")
            parts.append(f'<p><img alt="{e(name)}" src="data:image/png;base64,{data}"></p>')
        for name, words in self.word_attributions.items():
            scale = max((abs(score) for _, score in words), default=0) or 1.0
            spans = [f'<span title="{score:+.4f}" style="background: '
                     f"{_shade(score / scale)}; padding: 1px 2px\">{e(word)}</span>"
                     for word, score in words]
            parts.append(f"<p><b>{e(name)}</b>: {' '.join(spans)}</p>")
        return ('<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Explanation: '
                f"{e(self.target)}</title></head>\n<body style=\"font-family: sans-serif\">\n"
                + "\n".join(parts) + "\n</body></html>\n")

    def save_html(self, path):
        """Writes `to_html()` to `path` (UTF-8); returns `path`."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_html())
        return path

    def save(self, out_dir):
        """Writes the HTML page and one heatmap PNG per image input into `out_dir`.

        Returns:
            dict: `"html"` -> path of `explanation.html`, and each image
            input's name -> path of `<input>_attribution.png`.
        """
        os.makedirs(out_dir, exist_ok=True)
        paths = {"html": self.save_html(os.path.join(out_dir, HTML_FILE))}
        for name in self.pixel_attributions:
            paths[name] = self.save_image(os.path.join(out_dir, f"{name}_attribution.png"), name)
        return paths


def explain(model, image=None, text=None, *, task=None, target=None, baseline="blur", steps=32,
            batch_size=32, **inputs):
    """Explains a classifier's probability of one class for one raw sample.

    Pixels get integrated gradients with respect to the decoded image (float
    in [0, 255], what the model takes), along the straight path from a
    baseline image: the trapezoid rule on the gradients at `steps` evenly
    spaced images of the path, both ends included, `batch_size` per call.
    Words get leave-one-word-out occlusion: the text without each
    whitespace-separated word, all in one batch, scored by the drop in the
    probability. Gradients cannot reach a string tokenized in the graph;
    occlusion needs none, so it explains every text encoder alike. With two
    or more image or text inputs, each is removed in turn (a model built with
    `missing_modalities=True` is told it is missing; others see a black image
    or an empty text, as in `modality_report`), and a gated or attention
    fusion also gives its weights per input.

    Args:
        model: a classifier from `keras_mmtl.models`.
        image: the image file's path or bytes; `None` for a model without
            images, or to leave it missing (`missing_modalities=True`).
        text: the text (str); `None` as for `image`.
        task: the task explained, for a multi-task model (default its first).
        target: the class name explained; default the predicted class.
        baseline: where integrated gradients start, a key of `BASELINES`:
            `"blur"` (the image blurred until only its overall colours stay;
            pixels count where they differ from their surroundings) or
            `"black"` (the original paper's; it also credits brightness).
        steps: points on the path of integrated gradients, at least 2
            (more: more exact; see `Explanation.convergence_deltas`).
        batch_size: images per model call in integrated gradients.
        **inputs: more inputs by name, as for `keras_mmtl.predict`:
            `image_2=`, `text_2=`, `tabular=` (a vector of numbers).

    Returns:
        `Explanation`.

    Example:

    >>> from keras_mmtl.models import build_classifier
    >>> model = build_classifier(["cotton", "wool"], image_backbone=None,
    ...                          text_vocabulary=["warm", "wool"])
    >>> explanation = explain(model, text="warm wool scarf", target="wool")
    >>> [word for word, score in explanation.word_attributions["text"]]
    ['warm', 'wool', 'scarf']
    >>> paths = explanation.save("explanations/scarf")  # doctest: +SKIP
    """
    if baseline not in BASELINES:
        raise ValueError(f"Unknown baseline {baseline!r}. Expected one of {sorted(BASELINES)}. "
                         f"Received: baseline={baseline!r}")
    if steps < 2:
        raise ValueError(f"steps must be at least 2 (the path's two ends). Received: "
                         f"steps={steps}")
    spec = describe(model)
    raw = _raw_inputs(model, {"image": image, "text": text, **inputs})
    names = spec.class_names(task)
    task = task or next(iter(spec.tasks))
    model_inputs, _ = request_inputs(model, check=False)  # ablations send empty texts
    sample = _model_inputs(model_inputs, model, raw)
    probabilities = _probabilities(model, sample, task)[0]
    if target is None:
        index = int(np.argmax(probabilities))
    elif target in names:
        index = names.index(target)
    else:
        raise ValueError(f"Unknown target class {target!r}. Expected one of {names}"
                         f"{'' if task is None else f' (task {task!r})'}. Received: "
                         f"target={target!r}")
    explanation = Explanation(target=names[index], probability=float(probabilities[index]),
                              prediction=names[int(np.argmax(probabilities))],
                              task=task)
    given = [name for name in spec.modalities if name != "tabular" and _has(raw[name])]
    for name in given:
        if modality_kind(name) == "image":
            attribution, start, delta = _integrated_gradients(
                model, sample, name, index, task, baseline, steps, batch_size)
            explanation.images[name] = np.clip(sample[name][0].numpy(), 0, 255).astype(np.uint8)
            explanation.pixel_attributions[name] = attribution
            explanation.baseline_probabilities[name] = start
            explanation.convergence_deltas[name] = delta
        else:
            explanation.word_attributions[name] = _word_occlusion(
                model, model_inputs, raw, name, index, task)
    if given and len([m for m in spec.modalities if m != "tabular"]) > 1:
        explanation.modality_drops = _modality_drops(model, model_inputs, raw, given, index,
                                                     task, probabilities[index])
    explanation.fusion_gates = _fusion_gates(model, sample)
    return explanation


def _raw_inputs(model, given):
    """The request values of one sample: input name -> a list of one value (None: missing)."""
    spec = describe(model)
    modalities, optional = spec.modalities, spec.presence
    unknown = sorted(n for n, v in given.items() if n not in modalities and v is not None)
    if unknown:
        raise ValueError(f"This model has no inputs {unknown}; it takes {list(modalities)}.")
    missing = [name for name in modalities if given.get(name) is None
               and (name not in optional or name == "tabular")]
    if missing:
        raise ValueError(f"This model needs inputs {list(modalities)}; missing: {missing}.")
    return {name: [np.asarray(given[name], np.float32)] if name == "tabular"
            else encoded_inputs([given.get(name)], name) for name in modalities}


def _has(values):
    """Whether a request value (a list of one) holds an image or a non-blank text."""
    value = values[0]
    return bool(value.strip() if isinstance(value, str) else value)


def _model_inputs(model_inputs, model, raw):
    """The model's input dict for a batch of request values (lists of equal length)."""
    return model_inputs(*(tf.constant(np.stack(raw[name]) if name == "tabular" else raw[name])
                          for name in describe(model).modalities))


def _probabilities(model, inputs, task):
    outputs = model(inputs, training=False)
    return tf.cast(outputs if task is None else outputs[task], tf.float32).numpy()


def _modality_drops(model, model_inputs, raw, given, index, task, probability):
    """Input name -> the drop in probability without it, one batch row per input in `given`."""
    batch = {key: [_removed(model, key) if key == name else values[0] for name in given]
             for key, values in raw.items()}
    without = _probabilities(model, _model_inputs(model_inputs, model, batch), task)[:, index]
    return {name: float(probability - p) for name, p in zip(given, without)}


def _removed(model, name):
    """The request value of an input removed as `modality_report` removes it.

    A model with a presence input is told the input is missing (empty bytes or
    text); another sees a black image (a PNG of zeros) or an empty text.
    """
    if modality_kind(name) == "text":
        return ""
    spec = describe(model)
    if name in spec.presence:
        return b""
    return tf.io.encode_png(tf.zeros((*spec.image_size, 3), tf.uint8)).numpy()


def black_baseline(image):
    """A black image: the baseline of the integrated gradients paper.

    It credits pixels by their brightness as well as by their use to the
    model: light backgrounds draw attribution, dark objects little
    (Sturmfels et al., 2020, "Visualizing the Impact of Feature Attribution
    Baselines").
    """
    return tf.zeros_like(image)


def _smoothed(attribution, sigma_share=0.015):
    """A map under a small Gaussian blur (sigma 1.5% of its shorter side), scaled to max 1.

    Integrated gradients are sharp, scattered pixels; a heatmap drawn blurred shows the
    regions they fall in.
    """
    sigma = max(min(attribution.shape) * sigma_share, 0.5)
    radius = max(1, int(3 * sigma))
    taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma**2))
    taps /= taps.sum()
    smooth = np.apply_along_axis(np.convolve, 0, np.asarray(attribution, np.float64), taps,
                                 mode="same")
    smooth = np.apply_along_axis(np.convolve, 1, smooth, taps, mode="same")
    return smooth / max(smooth.max(), 1e-12)


def blurred_baseline(image):
    """The image under a Gaussian blur of sigma a quarter of its shorter side.

    Shapes and objects are gone, the overall colours and brightness stay, so
    pixels are credited where they differ from their surroundings and the
    model uses them (Fong & Vedaldi, 2017; Sturmfels et al., 2020).

    Example:

    >>> image = tf.concat([tf.zeros((1, 8, 4, 3)), 255 * tf.ones((1, 8, 4, 3))], axis=2)
    >>> row = blurred_baseline(image)[0, 0, :, 0].numpy()
    >>> bool(0 < row[0] < row[3] < row[4] < row[7] < 255)
    True
    """
    image = tf.convert_to_tensor(image, tf.float32)
    sigma = min(image.shape[1:3]) / 4
    radius = min(int(3 * sigma), min(image.shape[1:3]) - 1)  # symmetric padding's limit
    taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma**2)).astype(np.float32)
    taps = np.tile((taps / taps.sum())[:, None, None], (1, image.shape[-1], 1))
    padded = tf.pad(image, [[0, 0], [radius, radius], [radius, radius], [0, 0]], "SYMMETRIC")
    rows = tf.nn.depthwise_conv2d(padded, taps[:, None], [1, 1, 1, 1], "VALID")
    return tf.nn.depthwise_conv2d(rows, taps[None], [1, 1, 1, 1], "VALID")


BASELINES = {"blur": blurred_baseline, "black": black_baseline}


def _integrated_gradients(model, sample, name, index, task, baseline, steps, batch_size):
    """Integrated gradients of one image input: `(map (h, w), baseline probability, delta)`."""
    image = tf.cast(sample[name], tf.float32)  # (1, h, w, 3)
    start_image = BASELINES[baseline](image)
    alphas = np.linspace(0.0, 1.0, steps, dtype=np.float32)
    weights = np.full(steps, 1.0 / (steps - 1), np.float32)
    weights[[0, -1]] /= 2  # the trapezoid rule
    total = tf.zeros_like(image[0])
    probabilities = []
    for start in range(0, steps, batch_size):
        alpha = alphas[start:start + batch_size]
        batch = {key: tf.repeat(value, len(alpha), axis=0) for key, value in sample.items()}
        path = start_image + tf.constant(alpha)[:, None, None, None] * (image - start_image)
        with tf.GradientTape() as tape:
            tape.watch(path)
            outputs = model({**batch, name: path}, training=False)
            probability = tf.cast((outputs if task is None else outputs[task])[:, index],
                                  tf.float32)
        gradients = tf.cast(tape.gradient(probability, path), tf.float32)
        total += tf.tensordot(weights[start:start + batch_size], gradients, axes=1)
        probabilities += probability.numpy().tolist()
    attributions = ((image - start_image)[0] * total).numpy()
    delta = abs(float(attributions.sum()) - (probabilities[-1] - probabilities[0]))
    magnitude = np.abs(attributions).sum(axis=-1)
    return magnitude / max(float(magnitude.max()), 1e-12), probabilities[0], delta


def _word_occlusion(model, model_inputs, raw, name, index, task):
    """`[(word, drop in probability without it)]` for one text input, in one batch."""
    words = raw[name][0].split()
    variants = [raw[name][0]] + [" ".join(words[:i] + words[i + 1:]) for i in range(len(words))]
    batch = {key: variants if key == name else values * len(variants)
             for key, values in raw.items()}
    probability = _probabilities(model, _model_inputs(model_inputs, model, batch), task)[:, index]
    return [(word, float(probability[0] - p)) for word, p in zip(words, probability[1:])]


def _fusion_gates(model, sample):
    """Input name -> its weight in the fusion for the sample: a `GatedFusion`'s gate, or the
    [CLS] token's attention of an `AttentionFusion`; `{}` for other fusions."""
    fusion = next((layer for layer in model.layers
                   if isinstance(layer, (GatedFusion, AttentionFusion))), None)
    if fusion is None:
        return {}
    # The fusion's inputs: one feature tensor per modality, then their presence masks.
    modalities = describe(model).modalities
    tensors = keras.Model(model.input, fusion.input)(sample, training=False)
    features, presence = tensors[:len(modalities)], tensors[len(modalities):] or None
    _, gates = (fusion(features, presence=presence, return_gates=True)
                if isinstance(fusion, GatedFusion) else
                fusion(features, presence=presence, return_attention=True))
    return dict(zip(modalities, tf.cast(gates[0], tf.float32).numpy().astype(float).tolist()))


def _top_mass(attribution, fraction):
    """The share of an attribution map's total held by its top `fraction` of pixels."""
    values = np.sort(attribution.ravel())[::-1]
    return float(values[:max(1, int(len(values) * fraction))].sum() / max(values.sum(), 1e-12))


def _shade(score):
    """A background colour for a score in [-1, 1]: orange for positive, blue for negative."""
    red, green, blue = (230, 120, 20) if score >= 0 else (40, 110, 220)
    return f"rgba({red}, {green}, {blue}, {min(abs(score), 1.0):.2f})"
