"""Keras 3 on JAX on a GPU: MobileNetV2-0.35 at 224x168, float32 against mixed precision.

`benchmarks/gpu.py` measures keras_mmtl itself on a GPU, and needs TensorFlow with CUDA there.
Where a GPU machine has JAX but no TensorFlow, and TensorFlow cannot be installed (the lent
machines here: no network, and a 64 MiB transfer against TensorFlow's 573 MB wheel), this
measures the same image model and head through Keras 3 on JAX (every step XLA-compiled):
training samples/s with the backbone frozen, with its top 3 blocks fine-tuned (as keras_mmtl's
phase 2, but on whole images: no feature cache) and with every layer trained, under the
`float32`, `mixed_bfloat16` and `mixed_float16` policies (Keras wraps the optimizer in loss
scaling for float16), and whether every loss was finite. Random uint8 images of 55 classes,
8,192 a epoch, 4 epochs; samples/s is the median of the epochs after the first (which
compiles). Prints one JSON line per run and writes them to `$OUT/keras_gpu_probe.json` where
`OUT` is set. About 4 minutes on one H200; `--quick` (64 rows) also runs on a CPU:

    KERAS_BACKEND=jax python benchmarks/gpu_jax.py WEIGHTS_FILE [--quick]

where WEIGHTS_FILE is ../shared/weights/mobilenet_v2_0.35_imagenet_notop.weights.h5, and
`BATCH` (default 256) sets the batch size.
"""

import json
import math
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

WEIGHTS = sys.argv[1]
QUICK = "--quick" in sys.argv
SHAPE = (224, 168, 3)
CLASSES = 55
BATCH = 16 if QUICK else int(os.environ.get("BATCH", 256))
ROWS = 64 if QUICK else 8192
EPOCHS = 2 if QUICK else 4


class EpochTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def build(policy, mode):
    keras.backend.clear_session()
    keras.config.set_dtype_policy(policy)
    base = keras.applications.MobileNetV2(input_shape=SHAPE, alpha=0.35, include_top=False,
                                          weights=WEIGHTS, pooling="avg")
    base.trainable = mode != "frozen"
    if mode == "top3":  # blocks 14-16 and the last 1x1 convolution, as keras_mmtl's default
        trainable = False
        for layer in base.layers:
            trainable = trainable or layer.name.startswith("block_14")
            layer.trainable = trainable and not isinstance(
                layer, keras.layers.BatchNormalization)
    inputs = keras.Input(SHAPE, dtype="uint8")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = base(x, training=False)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(CLASSES, activation="softmax", dtype="float32")(x)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def main():
    print("jax", jax.__version__, jax.devices(), "keras", keras.__version__, flush=True)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (ROWS, *SHAPE)).astype("uint8")  # 4x less to copy in
    y = rng.integers(0, CLASSES, ROWS)
    results = []
    for mode in ("frozen", "top3", "all"):
        for policy in ("float32", "mixed_bfloat16", "mixed_float16"):
            model = build(policy, mode)
            timer = EpochTimer()
            started = time.perf_counter()
            history = model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, verbose=0,
                                callbacks=[timer])
            losses = history.history["loss"]
            steady = sorted(timer.seconds[1:])[len(timer.seconds[1:]) // 2]
            row = {"mode": mode, "policy": policy,
                   "samples_per_s": round(ROWS / steady, 1),
                   "first_epoch_s": round(timer.seconds[0], 1),
                   "total_s": round(time.perf_counter() - started, 1),
                   "finite": all(math.isfinite(v) for v in losses),
                   "losses": [round(v, 4) for v in losses]}
            print(json.dumps(row), flush=True)
            results.append(row)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "keras_gpu_probe.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
