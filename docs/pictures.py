"""Makes the README's pictures from one real run on the fashion benchmark task.

Trains the `fast` preset on `../shared/data/fashion` (article type from photo +
masked title; see that folder's README), then writes into `docs/`:

- `model.png`: the model's graph (`keras.utils.plot_model`; needs pydot and graphviz),
- `confusion_matrix.png` and `reliability.png`: the test report's pictures,
- `learning_curves.png`: loss and macro-F1 per epoch, both phases,
- `explanation.png`: integrated gradients over one test photo, and
  `explanation_words.png`: its per-word attributions (the HTML page in headless Chromium).

Run from the repository root (about 5 minutes on 2 CPU cores):

    python3 docs/pictures.py --image-weights ../shared/weights/mobilenet_v2_0.35_imagenet_notop.weights.h5
"""

import argparse
import os
import shutil
import subprocess

import keras

import keras_mmtl as mm
from keras_mmtl.plots import plot_history

DOCS = os.path.dirname(os.path.abspath(__file__))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.path.join(DOCS, "..", "..", "shared", "data",
                                                       "fashion", "manifest.csv"))
    parser.add_argument("--image-weights", default="imagenet")
    parser.add_argument("--run-dir", default=os.path.join("runs", "docs-pictures"))
    parser.add_argument("--sample", type=int, default=7, help="which test row to explain")
    args = parser.parse_args()

    config = mm.RunConfig.from_dict({
        "data": {"manifest": args.data, "text_column": "title_masked",
                 "label_column": "article_type", "split_column": "split",
                 "min_class_count": 20},
        "model": {"image_backbone": "mobilenet_v2_0.35", "image_weights": args.image_weights},
        "training": {"preset": "fast"},
        "output": {"run_dir": args.run_dir, "export": False},
    })
    result = mm.run_experiment(config)
    for name in ("confusion_matrix.png", "reliability.png"):
        shutil.copy(os.path.join(result.run_dir, "eval", name), os.path.join(DOCS, name))
    plot_history(result.history).savefig(os.path.join(DOCS, "learning_curves.png"), dpi=100)
    keras.utils.plot_model(result.model, os.path.join(DOCS, "model.png"), show_shapes=True,
                           show_layer_names=True, dpi=72)

    test = config.data.read().subset("test")
    explanation = mm.explain(result.model, image=test.images[args.sample],
                             text=test.texts[args.sample])
    print(explanation.summary())
    paths = explanation.save(os.path.join(args.run_dir, "explanation"))
    shutil.copy(paths["image"], os.path.join(DOCS, "explanation.png"))
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--hide-scrollbars",
                        "--window-size=900,700",
                        f"--screenshot={os.path.join(DOCS, 'explanation_words.png')}",
                        f"file://{os.path.abspath(paths['html'])}"], check=True)


if __name__ == "__main__":
    main()
