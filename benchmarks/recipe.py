"""The default recipe against classical baselines, measured in one run, on the fashion task.

On the benchmark task of ../shared/data (article_type from the photo and `title_masked`,
55 classes; train on `train`, select on `val`, report on `test`):

1. `keras-mmtl train` exactly as the README's fashion command gives it (every setting at
   its default: the medium preset), for the fused model, the image-only model
   (`--text-column none`) and the text-only model (`--image-column none`), with seeds
   0, 1 and 2, each a fresh process timed from start to end (reading, feature
   extraction, both phases, calibration, evaluation and export included);
2. the classical baselines, fitted on `train` with the inverse regularisation C chosen on
   `val` from 0.001 to 100 in half decades: scikit-learn logistic regression on TF-IDF word
   1-2 grams of the text, on frozen MobileNetV2-0.35 features (the README's 128x96, and the
   model's 224x168), and the late fusion of text and image (sum of log-probabilities, with
   the pair of Cs chosen on val for the fusion);
3. the phase-2 feature cache: phase 1 of the fused model once, then phase 2 (2 epochs, the
   top 3 blocks) with the frozen bottom of the backbone cached and without, from the same
   weights: training samples/s (median epoch) and best validation accuracy of each.

Prints the tables and appends a section to `benchmarks/RESULTS.md`. scikit-learn is a
benchmark dependency only. Run from the repository root (about 40 minutes on 2 CPU cores;
`--models image` trains the image-only models alone, beside the classical rows, and
`--models` with no model measures the classical rows alone (about 4 minutes); `--preset
fast` or `--preset best` trains another preset's models in place of the default's):

    python benchmarks/recipe.py
    python benchmarks/recipe.py --preset best --models fused --seeds 0
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results import append_section  # noqa: E402
from transfer import FASHION, WEIGHTS  # noqa: E402

SEEDS = (0, 1, 2)
MODELS = {"fused": [], "image": ["--text-column", "none"], "text": ["--image-column", "none"]}
COMMAND = ["train", "--manifest", FASHION, "--image-column", "image", "--text-column",
           "title_masked", "--label-column", "article_type", "--split-column", "split",
           "--min-class-count", "20", "--image-backbone", "mobilenet_v2_0.35",
           "--image-weights", WEIGHTS]
# The inverse regularisations tried, half a decade apart (a coarser grid let small changes of
# the features flip the choice between 0.1 and 10, and the late fusion by 3 points).
CS = tuple(10.0 ** (k / 2) for k in range(-6, 5))  # 0.001 ... 100


def run_command(name, seed, work, preset=None):
    """One `keras-mmtl train` in a fresh process: `{accuracy, macro_f1, minutes}`."""
    label = f"{name}-{preset}-{seed}" if preset else f"{name}-{seed}"
    run_dir = os.path.join(work, label)
    command = [sys.executable, "-m", "keras_mmtl", *COMMAND, *MODELS[name], "--seed", str(seed),
               *(["--preset", preset] if preset else []),
               "--run-dir", run_dir, "--export-dir", os.path.join(work, "saved", label)]
    print(f"== {name}, seed {seed}: keras-mmtl {' '.join(command[3:])}", flush=True)
    start = time.perf_counter()
    with open(os.path.join(work, f"{label}.log"), "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    minutes = (time.perf_counter() - start) / 60
    with open(os.path.join(run_dir, "eval", "report.json")) as f:
        report = json.load(f)
    print(f"   test accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f}, "
          f"{minutes:.1f} min", flush=True)
    return dict(accuracy=report["accuracy"], macro_f1=report["macro_f1"], minutes=minutes)


def classical(records, work):
    """Logistic regression on TF-IDF text, frozen image features, and their late fusion."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.preprocessing import StandardScaler

    splits = {name: records.splits == name for name in ("train", "val", "test")}
    labels = records.labels

    def log_probabilities(model, features):
        scores = np.full((features.shape[0], len(records.class_names)), -50.0)
        scores[:, model.classes_] = model.predict_log_proba(features)
        return scores

    def val_f1(scores):
        return f1_score(labels[splits["val"]], scores.argmax(-1), average="macro")

    def fit(features):
        """`{C: (val, test) log-probabilities}` of logistic regression at each C of the grid."""
        model = LogisticRegression(max_iter=3000, warm_start=True)
        fitted = {}
        for c in CS:  # ascending: each fit starts from the last one's weights
            model.set_params(C=c).fit(features["train"], labels[splits["train"]])
            fitted[c] = tuple(log_probabilities(model, features[s]) for s in ("val", "test"))
        return fitted

    def score_of(scores, name, c):
        predicted = scores.argmax(-1)
        truth = labels[splits["test"]]
        figures = dict(accuracy=accuracy_score(truth, predicted),
                       macro_f1=f1_score(truth, predicted, average="macro"), C=c)
        print(f"   {name}: test accuracy {figures['accuracy']:.4f}, macro-F1 "
              f"{figures['macro_f1']:.4f} (C={c})", flush=True)
        return figures

    def chosen(fitted):
        return max(fitted, key=lambda c: val_f1(fitted[c][0]))

    def refit(features, c):
        """Test log-probabilities at C, fitted again on the train and val rows (as keras-mmtl's
        refit): `features` maps "train" (the train and val rows) and "test"."""
        model = LogisticRegression(max_iter=3000, C=c).fit(features["train"], labels[learn])
        return log_probabilities(model, features["test"])

    learn = splits["train"] | splits["val"]
    texts = records.texts.astype(str)
    text_features = {}
    for rows, key in ((splits["train"], "held out"), (learn, "refit")):
        vectorizer = TfidfVectorizer(ngram_range=(1, 2)).fit(texts[rows])
        text_features[key] = {s: vectorizer.transform(texts[m]) for s, m in (
            *splits.items(), ("train", rows))}
    text = fit(text_features["held out"])
    c_text_alone = chosen(text)
    results = {"text: TF-IDF word 1-2 grams": score_of(text[c_text_alone][1], "text TF-IDF",
                                                       f"{c_text_alone:.2g}")}
    refit_text = {}
    for size in ((128, 96), (224, 168)):
        features = image_features(records, size, work)
        scaled = {}
        for rows, key in ((splits["train"], "held out"), (learn, "refit")):
            scaler = StandardScaler().fit(features[rows])
            scaled[key] = {s: scaler.transform(features[m]) for s, m in (
                *splits.items(), ("train", rows))}
        image = fit(scaled["held out"])
        c = chosen(image)
        results[f"image: frozen features at {size[0]}x{size[1]}"] = score_of(
            image[c][1], f"image {size[0]}x{size[1]}", f"{c:.2g}")
        # The late fusion's own choice: the pair of Cs whose summed log-probabilities score
        # best on val (each model's own best C can be an overconfident one that drowns the other).
        pairs = {(t, i): tuple(a + b for a, b in zip(text[t], image[i]))
                 for t in CS for i in CS}
        c_text, c_image = max(pairs, key=lambda pair: val_f1(pairs[pair][0]))
        results[f"late fusion at {size[0]}x{size[1]}"] = score_of(
            pairs[c_text, c_image][1], f"late fusion {size[0]}x{size[1]}",
            f"{c_text:.2g} text, {c_image:.2g} image")
        # The same choices, each model fitted again on the train and val rows.
        for c_refit in {c_text_alone, c_text} - set(refit_text):
            refit_text[c_refit] = refit(text_features["refit"], c_refit)
        refit_image = refit(scaled["refit"], c)
        results[f"image: frozen features at {size[0]}x{size[1]}, refit on train + val"] = (
            score_of(refit_image, f"image {size[0]}x{size[1]}, refit", f"{c:.2g}"))
        results[f"late fusion at {size[0]}x{size[1]}, refit on train + val"] = score_of(
            refit_text[c_text] + (refit_image if c_image == c else refit(scaled["refit"],
                                                                         c_image)),
            f"late fusion {size[0]}x{size[1]}, refit", f"{c_text:.2g} text, {c_image:.2g} image")
    results["text: TF-IDF word 1-2 grams, refit on train + val"] = score_of(
        refit_text[c_text_alone], "text TF-IDF, refit", f"{c_text_alone:.2g}")
    return results


def image_features(records, size, work):
    """Pooled frozen MobileNetV2-0.35 (ImageNet) features of every row, at `size`."""
    from keras_mmtl.data import make_dataset
    from keras_mmtl.models.backbones import build_image_backbone

    backbone = build_image_backbone("mobilenet_v2_0.35", WEIGHTS, size)
    data = make_dataset(records, image_size=size, modalities=("image",), batch_size=64,
                        shuffle=False).map(lambda x, y: x["image"])
    return backbone.predict(data, verbose=0)


def phase2_cache(records, work):
    """Phase 2 of the fused default model with and without the cached frozen bottom."""
    import keras

    from keras_mmtl import build_classifier_for, train
    from keras_mmtl.presets import preset_arguments
    from training import TrainingTimer, throughput

    def default_model():
        keras.utils.set_random_seed(0)
        return build_classifier_for(records, image_backbone="mobilenet_v2_0.35",
                                    image_weights=WEIGHTS, preset="medium")

    settings = preset_arguments("medium", "training")
    phase1 = os.path.join(work, "phase1")
    train(default_model(), records, phase1, **{**settings, "fine_tune_epochs": 0},
          projector=False, verbose=2)
    samples = len(records.subset("train"))
    figures = {}
    for cached in (True, False):
        run_dir = os.path.join(work, f"phase2-{'cached' if cached else 'uncached'}")
        shutil.copytree(phase1, run_dir)
        # Phase 2 continues phase 1's finished run on purpose, with other settings: drop the
        # run's fingerprint, which would refuse them.
        state_path = os.path.join(run_dir, "state.json")
        with open(state_path) as f:
            state = json.load(f)
        state.pop("fingerprint", None)
        with open(state_path, "w") as f:
            json.dump(state, f)
        model = default_model()  # frozen again: phase 2 resumes from phase 1's weights
        timer = TrainingTimer()
        history = train(model, records, run_dir, **{**settings, "fine_tune_epochs": 2},
                        patience=10, cache_features=cached, cache_dir=os.path.join(
                            run_dir, "cache" if cached else "none"),
                        projector=False, callbacks=[timer], verbose=2)
        # The main head's (auxiliary heads add outputs: "val_<task>_accuracy").
        key = min((k for k in history if k.startswith("val_") and k.endswith("accuracy")),
                  key=len)
        accuracy = max(a for a, p in zip(history[key], history["phase"]) if p == 2)
        figures[cached] = dict(**throughput(timer.phases[-1], samples), val_accuracy=accuracy)
        print(f"   phase 2, {'cached' if cached else 'not cached'}: "
              f"{figures[cached]['steady'] or figures[cached]['first']:.0f} samples/s, best "
              f"val accuracy {accuracy:.4f}", flush=True)
    return figures


def _speed(cache):
    return {cached: f["steady"] or f["first"] for cached, f in cache.items()}


def _cache_sentence(cache):
    speed = _speed(cache)
    return ("Phase 2 (2 epochs, top 3 blocks, same starting weights): "
            f"{speed[True]:.0f} training samples/s with the frozen bottom cached, "
            f"{speed[False]:.0f} without; best val accuracy {cache[True]['val_accuracy']:.4f} vs "
            f"{cache[False]['val_accuracy']:.4f}.")


def _cache_headline(cache):
    speed = _speed(cache)
    return {"phase2_cache_speedup": round(speed[True] / speed[False], 2),
            "phase2_cache_accuracy_delta_points": round(
                100 * abs(cache[True]["val_accuracy"] - cache[False]["val_accuracy"]), 2)}


def cache_section(cache, start):
    """The RESULTS.md section of `--only-cache`."""
    body = ("Fashion benchmark task, the default (medium) fused model. " + _cache_sentence(cache)
            + f"\n\nWall time of the benchmark: {(time.perf_counter() - start) / 60:.0f} min.")
    print(body)
    append_section("recipe phase-2 cache", body, _cache_headline(cache))


def mean_std(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", help="where runs go (default: a temporary folder)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--only-cache", action="store_true",
                        help="measure the phase-2 cache speedup alone (about 10 minutes)")
    parser.add_argument("--models", nargs="*", choices=list(MODELS), default=list(MODELS),
                        help="the keras-mmtl models to train (default: all; none: the "
                             "classical rows alone); the phase-2 cache is measured with the "
                             "fused one")
    parser.add_argument("--preset", choices=["fast", "best"],
                        help="train with this preset in place of the default (medium); the "
                             "phase-2 cache is not measured")
    args = parser.parse_args()
    work = args.work_dir or tempfile.mkdtemp(prefix="recipe_")
    os.makedirs(work, exist_ok=True)
    start = time.perf_counter()

    from keras_mmtl import read_manifest
    from keras_mmtl.presets import PRESETS

    records = read_manifest(FASHION, "image", "title_masked", "article_type", "split",
                            min_class_count=20)
    if args.only_cache:
        cache_section(phase2_cache(records, work), start)
        return
    print("== classical baselines", flush=True)
    baselines = classical(records, work)
    cache = None
    if "fused" in args.models and not args.preset:
        print("== phase 2 with and without the partial cache", flush=True)
        cache = phase2_cache(records, work)
    runs = {name: [run_command(name, seed, work, args.preset) for seed in args.seeds]
            for name in args.models}

    rows = ["| model | test accuracy | test macro-F1 | wall time (min) |", "|---|---|---|---|"]
    for name, results in runs.items():
        accuracy, macro_f1 = (mean_std([r[key] for r in results])
                              for key in ("accuracy", "macro_f1"))
        minutes = mean_std([r["minutes"] for r in results])
        rows.append(f"| keras-mmtl {name}{f' ({args.preset})' if args.preset else ''}, "
                    f"{len(results)} seed{'s' * (len(results) > 1)} | {accuracy[0]:.4f} ± "
                    f"{accuracy[1]:.4f} | {macro_f1[0]:.4f} ± {macro_f1[1]:.4f} | "
                    f"{minutes[0]:.1f} ± {minutes[1]:.1f} |")
    for name, figures in baselines.items():
        rows.append(f"| logistic regression, {name} (C={figures['C']}) | "
                    f"{figures['accuracy']:.4f} | {figures['macro_f1']:.4f} | - |")
    medium = ("every setting at its default (preset medium: n-gram text, balanced class "
              "weights, MobileNetV2-0.35 ImageNet at its own 224 px reshaped to the photos' 4:3, "
              "phase 2 on the top 3 blocks over the cached frozen bottom (5 for an image-only "
              "run); a fused run also trains an image-only expert and serves the geometric "
              "mean of the two; a model of images alone, an image-only run or the image "
              "expert, smooths its labels by 0.1 and fine-tunes for 10 epochs, the fused "
              "model for 5; a fused run's models then trained again on the train and val rows "
              "for the epochs val chose, the refit)")
    chosen = (f"`--preset {args.preset}` ({PRESETS[args.preset].description}) and every other "
              "setting at its default" if args.preset else medium)
    trained = (f"keras-mmtl: the README's fashion command with {chosen}, `--seed` "
               f"{', '.join(map(str, args.seeds))}; mean ± standard deviation; each run's wall "
               "time is the whole command in a fresh process (reading, features, training, "
               "calibration, evaluation, export). " if runs else "")
    body = (
        "Fashion benchmark task (8730 train, 1246 val, 2521 test rows, 55 classes). " + trained
        + "Classical rows: scikit-learn logistic regression fitted on train, C chosen on val "
        "from 0.001 to 100 in half decades (for a late fusion, the pair of Cs whose summed "
        "log-probabilities score best on val), scored on test, in the same run; the rows "
        "'refit on train + val' fit the same models at the same Cs again on the train and val "
        "rows (TF-IDF vocabulary and feature scaling too), as keras-mmtl's refit does.\n\n"
        + "\n".join(rows) +
        ("\n\n" + _cache_sentence(cache) if cache else "") + "\n\nWall time of the benchmark: "
        f"{(time.perf_counter() - start) / 60:.0f} min.")
    print(body)

    def macro(name):
        return round(mean_std([r["macro_f1"] for r in runs[name]])[0], 4)

    prefix = f"recipe_{args.preset}" if args.preset else "recipe"
    headline = {f"{prefix}_{name}_macro_f1_mean": macro(name) for name in runs}
    if "fused" in runs:
        headline[f"{prefix}_fused_macro_f1_std"] = round(
            mean_std([r["macro_f1"] for r in runs["fused"]])[1], 4)
        headline[f"{prefix}_train_minutes"] = round(
            mean_std([r["minutes"] for r in runs["fused"]])[0], 2)
    headline.update({
        "classical_late_fusion_macro_f1": round(baselines["late fusion at 128x96"]["macro_f1"], 4),
        "classical_late_fusion_224_macro_f1": round(
            baselines["late fusion at 224x168"]["macro_f1"], 4),
        "classical_image_macro_f1": round(
            baselines["image: frozen features at 128x96"]["macro_f1"], 4),
        "classical_image_224_macro_f1": round(
            baselines["image: frozen features at 224x168"]["macro_f1"], 4),
        "classical_text_macro_f1": round(baselines["text: TF-IDF word 1-2 grams"]["macro_f1"], 4),
        # The same models fitted again on the train and val rows, as keras-mmtl's refit does.
        **{key.replace("classical_", "classical_refit_"): round(baselines[
            f"{name}, refit on train + val"]["macro_f1"], 4) for key, name in (
            ("classical_late_fusion_macro_f1", "late fusion at 128x96"),
            ("classical_late_fusion_224_macro_f1", "late fusion at 224x168"),
            ("classical_image_macro_f1", "image: frozen features at 128x96"),
            ("classical_image_224_macro_f1", "image: frozen features at 224x168"),
            ("classical_text_macro_f1", "text: TF-IDF word 1-2 grams"))},
        **(_cache_headline(cache) if cache else {}),
    })
    append_section("recipe", body, headline)


if __name__ == "__main__":
    main()
