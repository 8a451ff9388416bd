import os
import urllib.error

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import MOBILENET_WEIGHTS
from keras_mmtl.export import export_saved_model, predict
from keras_mmtl.models.text import NGRAMS, NgramProjection
from keras_mmtl.training.optimizers import LayerwiseAdam
from keras_mmtl.models import (
    BACKBONES,
    ClassifierHead,
    ConcatFusion,
    MaskedMeanPooling,
    TextTokenizer,
    WeightsUnavailableError,
    backbone_blocks,
    backbone_network,
    build_classifier,
    build_classifier_for,
    build_image_backbone,
    describe,
    learn_ngrams,
    learn_tfidf,
    learn_vocabulary,
    tokenize,
    unfreeze_top_blocks,
)

SMALL = dict(image_backbone="mobilenet_v2_0.35", image_weights=None, image_size=(32, 32))
VOCAB = ["cotton", "wool", "a"]


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_builds_small_and_has_unfreeze_blocks(name):
    backbone = build_image_backbone(name, weights=None, image_size=(32, 32))
    features = backbone(np.zeros((1, 32, 32, 3), "float32"))
    assert features.shape[0] == 1 and len(features.shape) == 2
    blocks = backbone_blocks(backbone_network(backbone))
    assert len(blocks) >= 4
    assert len({block for block, _ in blocks}) == len(blocks)


def test_unfreezing_keeps_batchnorm_frozen_and_lower_blocks_frozen():
    model = build_classifier(["a", "b"], text_encoder=None, freeze_backbone=True, **SMALL)
    network = backbone_network(model)
    assert not model.get_layer("image_backbone").trainable
    unfrozen = unfreeze_top_blocks(model, 2)
    assert unfrozen == ["block_16", "Conv_1"]
    batchnorms = [l for l in network.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert batchnorms and not any(layer.trainable for layer in batchnorms)
    trainable = {layer.name for layer in network.layers if layer.trainable and layer.weights}
    assert trainable == {"block_16_expand", "block_16_depthwise", "block_16_project", "Conv_1"}


@pytest.mark.parametrize("count", ["all", 1000])
def test_unfreezing_more_blocks_than_there_are_unfreezes_all(count):
    model = build_classifier(["a", "b"], text_encoder=None, freeze_backbone=True, **SMALL)
    blocks = backbone_blocks(backbone_network(model))
    assert unfreeze_top_blocks(model, count) == [block for block, _ in blocks]


def test_offline_imagenet_download_fails_with_instructions(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr("keras.src.utils.file_utils.urlretrieve", no_network)
    with pytest.raises(WeightsUnavailableError) as error:
        build_image_backbone("mobilenet_v2_0.35", weights="imagenet", image_size=(96, 96))
    message = str(error.value)
    expected_cache = os.path.join(str(tmp_path), "models",
                                  "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96_no_top.h5")
    assert expected_cache in message
    assert "--image-weights PATH" in message and "image_weights=None" in message


def test_missing_local_weights_file():
    with pytest.raises(FileNotFoundError, match="Weights file not found"):
        build_image_backbone("mobilenet_v2", weights="/nope/weights.h5")


@pytest.mark.skipif(not os.path.exists(MOBILENET_WEIGHTS), reason="../shared weights absent")
def test_local_imagenet_weights_file_loads():
    pretrained = build_image_backbone("mobilenet_v2_0.35", MOBILENET_WEIGHTS, (64, 64))
    random = build_image_backbone("mobilenet_v2_0.35", None, (64, 64))
    kernel = lambda m: backbone_network(m).get_layer("Conv1").kernel.numpy()  # noqa: E731
    assert not np.allclose(kernel(pretrained), kernel(random))


@pytest.mark.parametrize("kwargs, message", [
    ({"image_backbone": "vgg99"}, "Unknown image backbone 'vgg99'"),
    ({"fusion": "sum"}, "Unknown fusion 'sum'"),
    ({"text_encoder": "gpt"}, "Unknown text encoder 'gpt'"),
    ({"image_backbone": None, "text_encoder": None}, "needs an image backbone, a text encoder"),
])
@pytest.mark.bad_input
def test_builder_errors_name_the_choices(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_classifier(["a", "b"], **{**SMALL, "text_vocabulary": VOCAB, **kwargs})


@pytest.mark.parametrize("modalities", [("image",), ("text",), ("image", "text")])
def test_classifier_builds_saves_and_loads(tmp_path, modalities):
    model = build_classifier(
        ["a", "b", "c"], text_vocabulary=VOCAB,
        **{**SMALL, "image_backbone": SMALL["image_backbone"] if "image" in modalities else None,
           "text_encoder": "scratch" if "text" in modalities else None})
    assert describe(model).modalities == modalities
    assert describe(model).class_names() == ["a", "b", "c"]
    inputs = {"image": tf.random.uniform((2, 32, 32, 3), maxval=255),
              "text": tf.constant(["a cotton thing", "wool"])}
    inputs = {k: v for k, v in inputs.items() if k in modalities}
    probabilities = model(inputs).numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_allclose(loaded(inputs).numpy(), probabilities, atol=1e-6)
    assert describe(loaded).image_size == ((32, 32) if "image" in modalities else None)


def test_pretrained_backbone_is_frozen_by_default_random_one_is_not():
    assert build_classifier(["a", "b"], text_encoder=None, **SMALL).get_layer(
        "image_backbone").trainable
    if os.path.exists(MOBILENET_WEIGHTS):
        frozen = build_classifier(["a", "b"], text_encoder=None, **{
            **SMALL, "image_weights": MOBILENET_WEIGHTS})
        assert not frozen.get_layer("image_backbone").trainable


@pytest.mark.parametrize("tokenizer", ["core", "unicode_script"])
def test_tokenizer_ids_padding_truncation_and_unknown_words(tokenizer):
    tokenizer = TextTokenizer(["shirt", "red"], sequence_length=4, tokenizer=tokenizer)
    ids = tokenizer(tf.constant(["Red SHIRT", "blue shirt red red red"])).numpy()
    assert ids.tolist() == [[3, 2, 0, 0], [1, 2, 3, 3]]


@pytest.mark.parametrize("text, core, unicode_script", [
    ("Men's T-Shirt (Blue)", ["men", "'", "s", "t", "-", "shirt", "(", "blue", ")"], None),
    ("ÉCOLE naïve café", ["école", "naïve", "café"], None),
    ("size 3/4", ["size", "3", "/", "4"], ["size", "3/4"]),
    ("abc123", ["abc123"], ["abc", "123"]),
    ("  ", [], None),
])
def test_the_core_tokenizer_splits_like_the_unicode_script_one(text, core, unicode_script):
    def tokens(tokenizer):
        return [t.decode() for t in tokenize(tf.constant([text]), tokenizer=tokenizer)[0].numpy()]

    assert tokens("core") == core
    assert tokens("unicode_script") == (core if unicode_script is None else unicode_script)


def test_a_tokenizer_saved_before_the_option_keeps_its_tokenization():
    config = TextTokenizer(["red"]).get_config()
    assert config["tokenizer"] == "core"
    del config["tokenizer"]
    assert TextTokenizer.from_config(config).tokenizer == "unicode_script"
    with pytest.raises(ValueError, match="Unknown tokenizer 'nltk'"):
        TextTokenizer(["red"], tokenizer="nltk")
    with pytest.raises(ValueError, match="text_tokenizer is an option of the 'scratch'"):
        build_classifier(["a", "b"], image_backbone=None, text_encoder="tfidf",
                         text_vocabulary={"x": 1.0}, text_tokenizer="unicode_script")


def test_learn_vocabulary_orders_by_count_and_drops_rare_tokens():
    texts = ["Red shirt", "red shoe", "RED shirt"]
    assert learn_vocabulary(texts) == ["red", "shirt", "shoe"]
    assert learn_vocabulary(texts, min_count=2) == ["red", "shirt"]
    assert learn_vocabulary(texts, max_tokens=1) == ["red"]


LAYERS = [
    (TextTokenizer, {"vocabulary": VOCAB, "sequence_length": 5}, [tf.constant(["a wool"])]),
    (MaskedMeanPooling, {}, [np.ones((2, 3, 4), "float32"), np.array([[2, 3, 0]] * 2)]),
    (ConcatFusion, {"units": 4}, [[np.ones((2, 3), "float32"), np.ones((2, 5), "float32")]]),
    (ConcatFusion, {"units": None}, [[np.ones((2, 3), "float32"), np.ones((2, 5), "float32")]]),
    (ClassifierHead, {"class_names": ["x", "y"], "dropout": 0.1}, [np.ones((2, 6), "float32")]),
]


@pytest.mark.parametrize("cls, config, args", LAYERS)
def test_layer_config_round_trip(cls, config, args):
    layer = cls(**config)
    output = layer(*args)
    clone = cls.from_config(layer.get_config())
    clone(*args)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(np.asarray(clone(*args)), np.asarray(output))
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"].startswith("keras_mmtl>")


def test_masked_mean_ignores_padding():
    embeddings = np.array([[[1.0], [3.0], [100.0]]], "float32")
    pooled = MaskedMeanPooling()(embeddings, np.array([[5, 6, 0]]))
    assert pooled.numpy().tolist() == [[2.0]]


def test_head_outputs_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_classifier(["a", "b"], image_backbone=None, text_vocabulary=VOCAB)
        assert model({"text": tf.constant(["a wool"])}).dtype == tf.float32
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_learn_tfidf_weights_rare_tokens_higher():
    weights = learn_tfidf(["Red shirt!", "red shoe", "RED shirt", "blue"], max_tokens=3)
    assert list(weights) == ["red", "shirt", "shoe"]
    assert weights["red"] < weights["shirt"] < weights["shoe"]


@pytest.mark.parametrize("encoder", ["tfidf", "ngrams"])
def test_bag_of_ngrams_text_encoders_save_and_export_with_core_ops(tmp_path, product_records,
                                                                    encoder):
    model = build_classifier_for(product_records, image_backbone=None, text_encoder=encoder)
    texts = tf.constant(["red cotton", "blue wool"])
    probabilities = model({"text": texts}).numpy()
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(loaded({"text": texts}).numpy(), probabilities, atol=1e-6)
    served = predict(export_saved_model(model, str(tmp_path / "saved"), custom_ops="error"),
                     texts=["red cotton", "blue wool"], top_k=1)
    np.testing.assert_allclose([top[0][1] for top in served], probabilities.max(axis=1),
                               atol=1e-5)


@pytest.mark.parametrize("encoder", ["tfidf", "ngrams"])
def test_bag_of_ngrams_encoders_need_idf_weights(encoder):
    with pytest.raises(ValueError, match=f"learn_{encoder}"):
        build_classifier(["a", "b"], image_backbone=None, text_encoder=encoder,
                         text_vocabulary=VOCAB)


def _ngram_counts(texts, bags):
    vectorizers = [keras.layers.TextVectorization(output_mode="count", sparse=True,
                                                  vocabulary=list(bags[bag]), **options)
                   for bag, options in NGRAMS.items()]
    return [vectorizer(tf.constant(texts)) for vectorizer in vectorizers]


def test_the_ngram_projection_is_a_dense_layer_on_unit_tfidf_vectors():
    texts = ["red cotton shirt", "blue woollen cap", "red cap", "zzz"]
    bags = learn_ngrams(texts[:2])
    layer = NgramProjection(8, [list(bags[bag].values()) for bag in NGRAMS], dropout=0.5)
    counts = _ngram_counts(texts, bags)
    got = layer(counts).numpy()
    parts = []
    for bag, count in zip(NGRAMS, counts):
        idf = np.array(list(bags[bag].values()))
        tfidf = tf.sparse.to_dense(count).numpy() * np.concatenate([[idf.mean()], idf])
        parts.append(tfidf / np.maximum(np.linalg.norm(tfidf, axis=1, keepdims=True), 1e-12))
    kernel, bias = layer.kernel.numpy(), layer.bias.numpy()
    np.testing.assert_allclose(got, np.maximum(np.concatenate(parts, 1) @ kernel + bias, 0),
                               atol=1e-5)
    assert not np.allclose(layer(counts, training=True).numpy(), got)  # dropout
    again = NgramProjection.from_config(layer.get_config())
    again.build([c.shape for c in counts])
    again.set_weights(layer.get_weights())
    np.testing.assert_allclose(again(counts).numpy(), got, atol=1e-6)
    # Dense counts (a model built under tf.distribute sees dense placeholders) are made sparse.
    np.testing.assert_allclose(layer([tf.sparse.to_dense(c) for c in counts]).numpy(), got,
                               atol=1e-6)


def test_an_ngram_step_updates_the_rows_of_the_ngrams_present_only():
    bags = learn_ngrams(["red cotton shirt", "blue woollen cap"])
    layer = NgramProjection(4, [list(bags[bag].values()) for bag in NGRAMS])
    counts = _ngram_counts(["red cap"], bags)
    layer.build([c.shape for c in counts])
    layer.bias.assign(tf.ones_like(layer.bias))  # every unit active: no ReLU stops the gradient
    before = layer.kernel.numpy()
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(counts))
    gradient = tape.gradient(loss, layer.kernel.value)
    assert isinstance(gradient, tf.IndexedSlices)
    LayerwiseAdam(learning_rate=0.1).apply([gradient], [layer.kernel])
    changed = np.flatnonzero(np.abs(layer.kernel.numpy() - before).sum(axis=1))
    present = np.concatenate([c.indices[:, 1].numpy() + offset for c, offset in
                              zip(counts, [0, counts[0].shape[-1]])])
    assert 0 < len(changed) and set(changed) <= set(present)


def test_character_ngrams_read_words_outside_the_vocabulary():
    bags = learn_ngrams(["red cotton shirt", "blue woollen cap"])
    vectorizer = keras.layers.TextVectorization(
        output_mode="tf_idf", vocabulary=list(bags["characters"]),
        idf_weights=list(bags["characters"].values()), **NGRAMS["characters"])
    # "cottons" is no training word, but shares its character n-grams with "cotton".
    unseen = np.asarray(vectorizer(tf.constant(["cottons", "zzz"])))
    assert unseen[0, 1:].sum() > 0 and unseen[1, 1:].sum() == 0
