"""Image bombs: the memory and time of one served request with a huge image, beside a normal one.

A classifier (MobileNetV2-0.35 at 128x96 + scratch text, random weights: the decode does not
depend on them) is exported with `export_saved_model`, once with the default pixel limit (50
megapixels) and once with the limit raised to 200. Each case then runs in a fresh process: load
the SavedModel with only TensorFlow imported, call `serving_default` once with a 128x96 JPEG
(warm-up), reset the peak resident memory (`/proc/self/clear_refs`), and send one request of one
image and one text. The extra memory is the peak resident memory during that request less the
resident memory before it; the seconds are its wall time. The cases:

- `small`: a 128x96 JPEG photo-like gradient;
- `bomb`: a 12000x12000 JPEG (a smooth gradient: about 2 MB), refused from its header;
- `bomb_631_bytes`: a 631-byte JPEG whose header claims 12000x12000 (the decoder fills in
  the missing rows, so it decodes to the full size), refused from its header;
- `bomb_allowed`: the 12000x12000 JPEG sent to the export whose limit is 200 megapixels:
  decoded at 1/8 (1500x1500) and answered;
- `unbounded_decode`: the decode before the pixel budget (whole image, float32, then resize)
  of the 12000x12000 JPEG, in a process with TensorFlow only: what one request cost.

`bad_input_cases_tested` counts the test cases marked `bad_input` (a bad row, config,
argument or request that must fail with a clear error: `pytest --collect-only -m bad_input`).

Appends a section with the headline figures to `benchmarks/RESULTS.md`. About a minute on 2 CPU
cores. Run from the repository root:

    python benchmarks/robustness.py
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SIZE = (128, 96)
BOMB_SIDE = 12000


def memory_mb():
    """`(resident, peak resident)` memory of this process in MiB."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(value.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def measure(model, image_path, small_path):
    """In this (fresh) process: one request after a warm-up; extra peak memory and seconds."""
    import tensorflow as tf

    def read(path):
        with open(path, "rb") as f:
            return f.read()

    if model == "unbounded":  # the decode of every image before the pixel budget
        def request(data):
            image = tf.io.decode_image(data, channels=3, expand_animations=False)
            return tf.image.resize(tf.cast(image, tf.float32), SIZE)
    else:
        serve = tf.saved_model.load(model).signatures["serving_default"]

        def request(data):
            return serve(image=tf.constant([data]), text=tf.constant(["a nice wool thing"]))
    request(read(small_path))  # warm-up: loaded, traced, thread pools started
    data = read(image_path)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets the peak resident memory (VmHWM)
    before, _ = memory_mb()
    start = time.perf_counter()
    try:
        request(data)
        answer = "answered"
    except tf.errors.InvalidArgumentError as error:
        answer = "refused: " + error.message.split("assertion failed: [")[-1].split("]")[0]
    seconds = time.perf_counter() - start
    _, peak = memory_mb()
    return {"extra_memory_mb": peak - before, "seconds": seconds, "answer": answer}


def run_fresh(model, image_path, small_path):
    """`measure` in a new Python process; its figures."""
    command = [sys.executable, __file__, "--measure", model, image_path, small_path]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"Measuring {image_path} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def prepare(work):
    """Exports the model twice (limits 50 and 200 megapixels) and writes the test JPEGs."""
    import numpy as np
    import tensorflow as tf

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from conftest import claimed_size_jpeg
    from keras_mmtl import build_classifier_for, export_saved_model
    from keras_mmtl.data import from_arrays

    records = from_arrays(["wool", "cotton"] * 4, images=np.zeros((8, *SIZE, 3), np.uint8),
                          texts=["a nice wool thing", "a cotton thing"] * 4)
    model = build_classifier_for(records, image_backbone="mobilenet_v2_0.35",
                                 image_weights=None, image_size=SIZE, text_encoder="scratch")
    exports = {limit: export_saved_model(model, os.path.join(work, f"limit{limit}"),
                                         max_megapixels=limit) for limit in (50, 200)}

    def gradient(height, width):
        rows, columns = np.ogrid[0:height, 0:width]
        image = np.empty((height, width, 3), np.uint8)
        image[..., 0] = rows * 255 // height
        image[..., 1] = columns * 255 // width
        image[..., 2] = (rows + columns) * 255 // (height + width)
        return tf.io.encode_jpeg(image, quality=90).numpy()

    paths = {"small": gradient(*SIZE), "bomb": gradient(BOMB_SIDE, BOMB_SIDE),
             "bomb_631_bytes": claimed_size_jpeg(BOMB_SIDE, BOMB_SIDE)}
    for name, data in paths.items():
        paths[name] = os.path.join(work, f"{name}.jpg")
        with open(paths[name], "wb") as f:
            f.write(data)
    return exports, paths


def bad_input_cases():
    """The number of test cases marked `bad_input` (collected, not run)."""
    tests = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")
    listed = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-n", "0",
                             "-m", "bad_input", "-p", "no:cacheprovider", tests],
                            capture_output=True, text=True, check=True).stdout
    return sum("::" in line for line in listed.splitlines())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", nargs=3, metavar=("MODEL", "IMAGE", "WARMUP_IMAGE"),
                        help=argparse.SUPPRESS)  # the fresh process's part
    parser.add_argument("--quick", action="store_true", help="check the script; writes nothing")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as work:
        exports, paths = prepare(work)
        cases = {"small": (exports[50], paths["small"]), "bomb": (exports[50], paths["bomb"]),
                 "bomb_631_bytes": (exports[50], paths["bomb_631_bytes"]),
                 "bomb_allowed": (exports[200], paths["bomb"]),
                 "unbounded_decode": ("unbounded", paths["bomb"])}
        figures = {name: run_fresh(model, image, paths["small"])
                   for name, (model, image) in cases.items()}
        bomb_mb = os.path.getsize(paths["bomb"]) / 2**20
    lines = ["| case | extra memory (MiB) | seconds | answer |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['extra_memory_mb']:.0f} | {r['seconds']:.3f} | {r['answer']} |"
              for name, r in figures.items()]
    body = (f"One request (one image, one text) to an exported classifier (MobileNetV2-0.35 at "
            f"{SIZE[0]}x{SIZE[1]} + scratch text) in a fresh process after a warm-up request; "
            f"extra memory is the peak resident memory during the request less the resident "
            f"memory before it. The {BOMB_SIDE}x{BOMB_SIDE} JPEG is a smooth gradient of "
            f"{bomb_mb:.1f} MiB. `bomb_allowed` is sent to an export whose pixel limit is 200 "
            "megapixels (decoded at 1/8); `unbounded_decode` is the decode before the pixel "
            "budget (whole image, float32, resize) in a process with TensorFlow only. Wall time "
            f"of the benchmark: {time.monotonic() - started:.0f} s.\n\n" + "\n".join(lines))
    print(body)
    headline = {}
    for name, figure in figures.items():
        prefix = name if name == "unbounded_decode" else f"{name}_request"
        headline[f"{prefix}_extra_memory_mb"] = round(figure["extra_memory_mb"], 1)
        headline[f"{prefix}_seconds"] = round(figure["seconds"], 3)
    headline["bad_input_cases_tested"] = bad_input_cases()
    print("\n".join(f"{key}: {value}" for key, value in headline.items()))
    if not args.quick:
        from results import append_section

        append_section("robustness", body, headline)


if __name__ == "__main__":
    main()
