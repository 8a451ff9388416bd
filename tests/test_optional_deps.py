"""Optional dependencies: the default models work without tensorflow-text (no Windows wheel)."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from keras_mmtl.export import export_saved_model, predict
from keras_mmtl.models import build_classifier_for

# Run in a child process where `import tensorflow_text` fails, as where it has no wheel.
WITHOUT_TENSORFLOW_TEXT = textwrap.dedent("""
    import json, sys

    class HideTensorflowText:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "tensorflow_text":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, HideTensorflowText())

    import keras_mmtl
    from keras_mmtl.data import make_demo_dataset, read_manifest
    from keras_mmtl.models.text import register_text_ops

    folder = sys.argv[1]
    records = read_manifest(make_demo_dataset(folder, num_samples=60, image_size=32),
                            text_column="title", split_column="split")
    test = records.subset("test")
    images, texts = list(test.images[:4]), list(test.texts[:4])
    result = {"registered": register_text_ops(), "trained": {}}
    for encoder in ("scratch", "ngrams", "tfidf"):
        model = keras_mmtl.build_classifier_for(
            records, text_encoder=encoder, image_backbone="small_cnn", image_weights=None,
            image_size=(32, 32))
        history = keras_mmtl.train(model, records, f"{folder}/{encoder}", epochs=1,
                                   fine_tune_epochs=0, batch_size=16, verbose=0)
        result["trained"][encoder] = len(history["loss"])
        if encoder == "scratch":  # the default: exported and served
            export = keras_mmtl.export_saved_model(model, f"{folder}/export")
            result["keras"] = keras_mmtl.predict(model, images=images, texts=texts)
            result["export"] = keras_mmtl.predict(export, images=images, texts=texts)
    try:
        keras_mmtl.build_classifier_for(records, image_backbone=None,
                                        text_tokenizer="unicode_script")
    except ImportError as error:
        result["unicode_script"] = str(error)
    result["modules"] = sorted(m for m in sys.modules if m.startswith("tensorflow_text"))
    print(json.dumps(result))
""")


@pytest.mark.slow
def test_the_default_models_train_export_and_serve_without_tensorflow_text(tmp_path):
    child = subprocess.run([sys.executable, "-c", WITHOUT_TENSORFLOW_TEXT, str(tmp_path)],
                           capture_output=True, text=True, timeout=300, check=False)
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["modules"] == [] and result["registered"] is False
    assert result["trained"] == {"scratch": 1, "ngrams": 1, "tfidf": 1}
    for served, answered in zip(result["export"], result["keras"]):
        assert [label for label, _ in served] == [label for label, _ in answered]
        np.testing.assert_allclose([p for _, p in served], [p for _, p in answered], atol=1e-5)
    assert "The 'unicode_script' tokenizer needs tensorflow-text" in result["unicode_script"]
    assert "pip install tensorflow-text" in result["unicode_script"]


@pytest.mark.slow
def test_an_export_with_tensorflow_text_ops_loads_in_a_fresh_process(tmp_path, product_records):
    pytest.importorskip("tensorflow_text")
    model = build_classifier_for(product_records, modalities=("text",),
                                 text_tokenizer="unicode_script")
    with pytest.warns(UserWarning, match="text_tokenizer='core'"):  # the op audit's warning
        path = export_saved_model(model, str(tmp_path / "export"))
    texts = list(product_records.subset("test").texts)
    script = ("import json, sys, keras_mmtl\n"  # keras_mmtl alone imports no tensorflow_text
              "print(json.dumps(keras_mmtl.predict(sys.argv[1], texts=json.loads(sys.argv[2]))))")
    child = subprocess.run([sys.executable, "-c", script, path, json.dumps(texts)],
                           capture_output=True, text=True, timeout=300, check=False)
    assert child.returncode == 0, child.stderr[-3000:]
    served = json.loads(child.stdout.strip().splitlines()[-1])
    for got, want in zip(served, predict(model, texts=texts)):
        assert [label for label, _ in got] == [label for label, _ in want]
        np.testing.assert_allclose([p for _, p in got], [p for _, p in want], atol=1e-5)
