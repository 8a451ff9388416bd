"""Explanations of one prediction: pixels, words, modality shares, gates, HTML and PNG."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_mmtl.cli import main
from keras_mmtl.data import make_dataset, make_demo_dataset, read_manifest
from keras_mmtl.data.demo import COLOURS
from keras_mmtl.data.images import decode_image
from keras_mmtl.explain import BASELINES, explain
from keras_mmtl.models import build_classifier, build_classifier_for, describe
from keras_mmtl.training import compile_classifier

SMALL = dict(image_backbone="small_cnn", image_weights=None, image_size=(32, 32))
SAMPLES = 8  # test rows of the demo data explained (and one photo made here)


def _png(seed=0, size=32):
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return tf.io.encode_png(pixels).numpy()


def _corner_product(colour):
    """A demo-like product photo whose shape sits in the top right corner, off the diagonal."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(170, 240, size=3) + rng.normal(0, 12, size=(32, 32, 3))
    pixels[3:13, 19:29] = np.asarray(colour) + rng.normal(0, 8, size=(10, 10, 3))
    return tf.io.encode_png(np.clip(pixels, 0, 255).astype(np.uint8)).numpy()


def _shape_mask(pixels):
    """The demo's coloured shape: pixels far in colour from the border's median (background)."""
    pixels = pixels.astype(np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return np.abs(pixels - np.median(border, axis=0)).sum(axis=-1) > 90


def _concentration(explanation):
    """The attribution's share inside the shape, over the shape's share of the image."""
    mask = _shape_mask(explanation.images["image"])
    attribution = explanation.pixel_attributions["image"]
    return attribution[mask].sum() / attribution.sum() / mask.mean()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo data (colour in the photo, material in the title's third word), a model
    trained on it, an untrained twin, and the first test rows as `(image path, title)`."""
    folder = str(tmp_path_factory.mktemp("demo"))
    records = read_manifest(make_demo_dataset(folder, num_samples=300, image_size=32),
                            text_column="title", split_column="split")
    keras.utils.set_random_seed(0)
    model = build_classifier_for(records, **SMALL, fusion_units=32)
    compile_classifier(model, 3e-3)
    model.fit(make_dataset(records, "train", **describe(model).dataset_arguments(), batch_size=32),
              epochs=8, verbose=0)
    test = make_dataset(records, "test", **describe(model).dataset_arguments(), batch_size=64)
    accuracy = model.evaluate(test, verbose=0, return_dict=True)["accuracy"]
    assert accuracy > 0.9, f"the demo model did not learn (test accuracy {accuracy:.2f})"
    rows = records.subset("test")
    samples = [(os.path.join(folder, image), text)
               for image, text in zip(rows.images[:SAMPLES], rows.texts[:SAMPLES])]
    samples.append((_corner_product(COLOURS["blue"]), "Urban slim cotton cap"))
    return {"model": model, "untrained": build_classifier_for(records, **SMALL, fusion_units=32),
            "samples": samples,
            "explanations": [explain(model, image, text) for image, text in samples]}


@pytest.mark.slow
def test_pixels_that_matter_are_the_coloured_shape(demo):
    trained = [_concentration(e) for e in demo["explanations"]]
    untrained = [_concentration(explain(demo["untrained"], image, text))
                 for image, text in demo["samples"]]
    # Inside the shape, attribution is several times denser than its area alone gives; an
    # untrained model's (the blurred baseline's own pull towards edges) is much less so.
    assert np.median(trained) > 3.0
    assert np.median(trained) > 1.25 * np.median(untrained)
    assert trained[-1] > 3.0  # where the shape is off-centre and off the diagonal too


@pytest.mark.slow
def test_the_top_word_is_the_material(demo):
    for (_, title), explanation in zip(demo["samples"], demo["explanations"]):
        words = explanation.word_attributions["text"]
        assert [word for word, _ in words] == title.split()
        assert max(words, key=lambda pair: pair[1])[0] == title.split()[2]


@pytest.mark.slow
def test_the_command_prints_the_summary_and_writes_the_files(demo, tmp_path, capsys):
    model_file = str(tmp_path / "model.keras")
    demo["model"].save(model_file)
    image, title = demo["samples"][0]
    out_dir = tmp_path / "why"
    assert main(["explain", "--model", model_file, "--image", image, "--text", title,
                 "--out-dir", str(out_dir), "--steps", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Explaining '") and f"'{title.split()[2]}' +" in out
    assert sorted(os.listdir(out_dir)) == ["explanation.html", "image_attribution.png"]
    assert main(["explain", "--model", model_file, "--image", image, "--text", title,
                 "--out-dir", str(out_dir), "--target", "purple silk"]) == 2
    assert capsys.readouterr().err.startswith("error: cannot explain: Unknown target class")


@pytest.mark.slow
def test_both_modalities_share_the_prediction(demo):
    shares = [e.modality_shares for e in demo["explanations"]]
    for share in shares:
        assert set(share) == {"image", "text"} and sum(share.values()) == pytest.approx(1)
    for name in ("image", "text"):  # the colour is only in the image, the material in the text
        assert np.mean([share[name] for share in shares]) > 0.2


@pytest.mark.slow
@pytest.mark.parametrize("baseline, steps", [("blur", 32), ("black", 128)])
def test_attributions_add_up_to_the_change_from_the_baseline(demo, baseline, steps):
    image, text = demo["samples"][0]
    explanation = explain(demo["model"], image, text, baseline=baseline, steps=steps)
    pixels = decode_image(tf.io.read_file(image), SMALL["image_size"])[None]
    start = demo["model"]({"image": BASELINES[baseline](pixels), "text": tf.constant([text])})
    class_index = describe(demo["model"]).class_names().index(explanation.target)
    assert explanation.baseline_probabilities["image"] == pytest.approx(
        float(start[0, class_index]), abs=1e-4)
    change = explanation.probability - explanation.baseline_probabilities["image"]
    assert explanation.convergence_deltas["image"] < 0.03
    assert explanation.pixel_attributions["image"].max() == pytest.approx(1)
    assert abs(change) > 0.1  # so that the check above could fail


def test_target_class_defaults_to_the_prediction_and_can_be_chosen():
    model = build_classifier(["cotton", "wool"], image_backbone=None,
                             text_vocabulary=["warm", "wool", "scarf"])
    probabilities = model({"text": tf.constant(["warm wool scarf"])}, training=False).numpy()[0]
    predicted = explain(model, text="warm wool scarf")
    other = ["cotton", "wool"][1 - int(np.argmax(probabilities))]
    chosen = explain(model, text="warm wool scarf", target=other)
    assert predicted.target == predicted.prediction == chosen.prediction
    assert chosen.target == other
    assert chosen.probability == pytest.approx(probabilities.min(), abs=1e-6)


@pytest.mark.parametrize("arguments, message", [
    ({"target": "silk"}, "Unknown target class 'silk'. Expected one of \\['cotton', 'wool'\\]"),
    ({"task": "size"}, "no task 'size'"),
    ({"baseline": "white"}, "Unknown baseline 'white'"),
    ({"steps": 1}, "steps must be at least 2"),
    ({"image": b"x"}, "no inputs \\['image'\\]"),
])
@pytest.mark.bad_input
def test_bad_arguments_are_clear_errors(arguments, message):
    model = build_classifier(["cotton", "wool"], image_backbone=None, text_vocabulary=["wool"])
    with pytest.raises(ValueError, match=message):
        explain(model, **{"text": "wool", **arguments})


@pytest.mark.bad_input
def test_a_missing_required_input_is_a_clear_error():
    model = build_classifier(["a", "b"], **SMALL, text_vocabulary=["x"])
    with pytest.raises(ValueError, match="missing: \\['text'\\]"):
        explain(model, image=_png())


@pytest.mark.parametrize("modalities", [("image",), ("text",)])
def test_single_modality_models_explain_their_own_part(modalities):
    model = build_classifier(
        ["a", "b"], **{**SMALL, **({} if "image" in modalities else {"image_backbone": None})},
        text_encoder="scratch" if "text" in modalities else None, text_vocabulary=["x"])
    given = {"image": _png(), "text": "x y"}
    explanation = explain(model, **{name: given[name] for name in modalities}, steps=4)
    assert set(explanation.pixel_attributions) == set(explanation.images) == (
        {"image"} & set(modalities))
    assert set(explanation.word_attributions) == {"text"} & set(modalities)
    assert explanation.modality_drops == {} and explanation.fusion_gates == {}
    assert explanation.summary().startswith("Explaining ")


def test_more_inputs_are_fed_as_given():
    model = build_classifier(["a", "b"], image_backbone=None, text_vocabulary=["x", "z"],
                             modalities=("text", "text_2", "tabular"),
                             tabular_statistics=([0.0, 0.0], [1.0, 1.0]))
    explanation = explain(model, text="x y", text_2="z", tabular=[3.0, -1.0])
    outputs = model({"text": tf.constant(["x y"]), "text_2": tf.constant(["z"]),
                     "tabular": tf.constant([[3.0, -1.0]])}, training=False).numpy()[0]
    assert explanation.probability == pytest.approx(outputs.max(), abs=1e-6)
    assert [[w for w, _ in words] for words in explanation.word_attributions.values()] == [
        ["x", "y"], ["z"]]
    assert set(explanation.modality_drops) == {"text", "text_2"}


def test_multi_task_models_explain_the_chosen_task():
    model = build_classifier({"colour": ["red", "blue"], "material": ["cotton", "wool", "silk"]},
                             image_backbone=None, text_vocabulary=["wool"])
    assert explain(model, text="wool").task == "colour"
    explanation = explain(model, text="wool", task="material", target="silk")
    assert (explanation.task, explanation.target) == ("material", "silk")
    probabilities = model({"text": tf.constant(["wool"])}, training=False)["material"].numpy()[0]
    assert explanation.probability == pytest.approx(probabilities[2], abs=1e-6)


@pytest.mark.parametrize("fusion", ["gated", "attention"])
def test_fusion_weights_are_given_and_a_missing_input_counts_for_nothing(fusion):
    model = build_classifier(["a", "b"], **SMALL, text_vocabulary=["x"], fusion=fusion,
                             fusion_units=8, missing_modalities=True)
    both = explain(model, image=_png(), text="x y", steps=4)
    assert set(both.fusion_gates) == set(both.modality_drops) == {"image", "text"}
    assert sum(both.fusion_gates.values()) == pytest.approx(1, abs=1e-5)
    assert 0 < both.fusion_gates["image"] < 1
    text_only = explain(model, text="x y")
    assert text_only.fusion_gates == pytest.approx({"image": 0.0, "text": 1.0})
    assert set(text_only.modality_drops) == {"text"} and text_only.pixel_attributions == {}


@pytest.mark.bad_input
def test_html_escapes_the_text_and_the_class_names():
    model = build_classifier(["<b>bold</b>", "plain"], image_backbone=None,
                             text_vocabulary=["alert"])
    text = 'see <script>alert("x")</script> now'
    page = explain(model, text=text, target="<b>bold</b>").to_html()
    assert "<script>" not in page and "<b>bold" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page
    assert page.index(">see<") < page.index("&lt;script&gt;") < page.index(">now<")


def test_save_writes_a_readable_heatmap_and_the_page(tmp_path):
    model = build_classifier(["a", "b"], **SMALL, text_vocabulary=["x"])
    explanation = explain(model, image=_png(), text="x y", steps=4)
    paths = explanation.save(str(tmp_path / "out"))
    assert paths == {"html": str(tmp_path / "out" / "explanation.html"),
                     "image": str(tmp_path / "out" / "image_attribution.png")}
    heatmap = tf.io.decode_png(tf.io.read_file(paths["image"])).numpy()
    assert heatmap.shape[0] >= 200 and heatmap.shape[1] >= 400 and heatmap.std() > 0
    with open(paths["html"], encoding="utf-8") as f:
        page = f.read()
    assert page.startswith("<!DOCTYPE html>") and "data:image/png;base64," in page
    assert ">x<" in page and ">y<" in page
    with pytest.raises(ValueError, match="no image attribution for 'image_2'"):
        explanation.image_png("image_2")


def test_baselines_keep_the_image_shape_and_black_is_zero():
    image = tf.constant(np.random.default_rng(0).uniform(0, 255, (1, 12, 20, 3)), tf.float32)
    for name, baseline in BASELINES.items():
        assert baseline(image).shape == image.shape, name
    assert float(tf.reduce_max(BASELINES["black"](image))) == 0.0
    blurred = BASELINES["blur"](image).numpy()
    assert blurred.std() < 0.2 * image.numpy().std()  # little but the overall colour is left
    assert blurred.mean() == pytest.approx(image.numpy().mean(), rel=0.05)
