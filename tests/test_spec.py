"""describe(model): one self-description, read from the model and kept through saving."""

import keras
import pytest

from keras_mmtl.models import ClassifierSpec, build_classifier, describe, ensemble, learn_ngrams
from keras_mmtl.models.text import NGRAM_LAYERS
from keras_mmtl.training.cache import cacheable_outputs

SMALL = dict(image_backbone="mobilenet_v2_0.35", image_weights=None, image_size=(40, 32))
VOCAB = ["cotton", "wool", "a"]
NGRAMS = learn_ngrams(["cotton shirt", "wool scarf"])

CASES = {
    "image only": (dict(text_encoder=None, **SMALL), ClassifierSpec(
        modalities=("image",), presence=(), tasks={None: ["a", "b"]}, outputs=None,
        image_size=(40, 32), tokenizers={})),
    "scratch text": (dict(image_backbone=None, text_vocabulary=VOCAB), ClassifierSpec(
        modalities=("text",), presence=(), tasks={None: ["a", "b"]}, outputs=None,
        image_size=None, tokenizers={"text": "text_tokenizer"})),
    "n-gram text": (dict(image_backbone=None, text_encoder="ngrams", text_vocabulary=NGRAMS),
                    ClassifierSpec(modalities=("text",), presence=(), tasks={None: ["a", "b"]},
                                   outputs=None, image_size=None, tokenizers={})),
    "two texts, missing": (
        dict(modalities=("image", "text", "text_2"), missing_modalities=True,
             text_vocabulary=VOCAB, **SMALL),
        ClassifierSpec(modalities=("image", "text", "text_2"),
                       presence=("image", "text", "text_2"), tasks={None: ["a", "b"]},
                       outputs=None, image_size=(40, 32),
                       tokenizers={"text": "text_tokenizer", "text_2": "text_tokenizer"})),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_classifier_describes_itself_before_and_after_saving(case, tmp_path):
    kwargs, expected = CASES[case]
    model = build_classifier(["a", "b"], **kwargs)
    assert describe(model) == expected
    model.save(tmp_path / "m.keras")
    assert describe(keras.models.load_model(tmp_path / "m.keras")) == expected


def test_a_multi_task_spec_names_tasks_outputs_and_heads():
    model = build_classifier({"type": ["shirt", "shoe"], "colour": ["red", "blue", "green"]},
                             auxiliary_heads=True, text_vocabulary=VOCAB, **SMALL)
    spec = describe(model)
    assert spec.tasks == {"type": ["shirt", "shoe"], "colour": ["red", "blue", "green"]}
    assert spec.outputs == {"type": "type", "colour": "colour", "type_aux_image": "type",
                            "type_aux_text": "type", "colour_aux_image": "colour",
                            "colour_aux_text": "colour"}
    assert spec.multi_output and spec.class_names("colour") == ["red", "blue", "green"]
    assert spec.label_classes == spec.tasks and spec.head("colour") == "head_colour"
    assert spec.dataset_arguments()["tasks"] == spec.outputs
    assert "tasks: type: 2 classes; colour: 3 classes" in spec.summary()
    with pytest.raises(ValueError, match="no task 'size'"):
        spec.class_names("size")


def test_an_ensemble_describes_itself_as_its_members():
    members = [build_classifier(["a", "b"], text_vocabulary=VOCAB, name=f"m{i}", **SMALL)
               for i in range(2)]
    spec = describe(ensemble(members))
    assert (spec.modalities, spec.tasks, spec.image_size) == (
        ("image", "text"), {None: ["a", "b"]}, (40, 32))
    assert spec.label_classes == ["a", "b"] and spec.head() == "head"


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_feature_cache_stores_token_ids_where_the_spec_says_preprocessing_ends(case):
    model = build_classifier(["a", "b"], freeze_backbone=True, **CASES[case][0])
    cached_texts = {m: layers for m, layers in cacheable_outputs(model).items()
                    if m.startswith("text")}
    expected = {m: (layer,) for m, layer in describe(model).tokenizers.items()}
    if case == "n-gram text":  # no tokenizer: its bags of n-gram counts
        expected = {"text": NGRAM_LAYERS}
    assert cached_texts == expected
