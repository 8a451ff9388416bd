"""tf.distribute: the strategy choice, and two replicas or two workers training as one."""

import itertools
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from keras_mmtl.training import distribute

# One process of a run with a global batch of 8: mirrored over one device ("single") or over
# two logical CPU devices, 4 rows each ("mirrored", the multi-GPU code path without GPUs), or
# one of two workers of a cluster on 127.0.0.1 ("worker", 4 rows each, TF_CONFIG set).
REPLICAS = textwrap.dedent("""
    import sys

    import keras
    import numpy as np
    import tensorflow as tf

    mode, run_dir, out = sys.argv[1:4]
    if mode == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    from keras_mmtl.training import distribution_strategy

    # First thing: a multi-worker strategy must exist before TensorFlow runs anything else.
    # One replica or two, the same code (LayerwiseAdam runs Keras' Adam under a strategy).
    strategy = distribution_strategy("auto" if mode == "worker" else "mirrored")

    from keras_mmtl.data import from_arrays, make_dataset
    from keras_mmtl.models import build_classifier_for, describe
    from keras_mmtl.training import train

    rng = np.random.default_rng(0)
    labels = ["a", "a", "b", "b"] * 12
    images = rng.integers(0, 255, (48, 16, 16, 3), dtype="uint8")
    records = from_arrays(labels, images=images, splits=["train", "val"] * 24)
    keras.utils.set_random_seed(0)  # the same initial weights in every process
    with strategy.scope():
        # No dropout: nothing random in a step, so every run can agree.
        model = build_classifier_for(records, image_backbone="small_cnn", image_weights=None,
                                     image_size=(16, 16), freeze_backbone=True, dropout=0.0)
    replicas = strategy.num_replicas_in_sync
    history = train(model, records, run_dir, epochs=2, fine_tune_epochs=1,
                    batch_size=8 // replicas, verbose=0)
    batch = make_dataset(records, "train", **describe(model).dataset_arguments(), batch_size=8)
    shares = strategy.experimental_local_results(
        next(iter(strategy.experimental_distribute_dataset(batch)))[1])
    np.savez(out, replicas=replicas, epochs=len(history["epoch"]),
             shares=[len(share) for share in shares],
             **{f"w{i}": w for i, w in enumerate(model.get_weights())})
""")


def _start(tmp_path, mode, name, env=None):
    script = tmp_path / "replicas.py"
    script.write_text(REPLICAS)
    run_dir = tmp_path / ("run" if mode == "worker" else name)
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen(
        [sys.executable, str(script), mode, str(run_dir), str(tmp_path / f"{name}.npz")],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})}, stdout=log,
        stderr=subprocess.STDOUT)


def _finish(tmp_path, processes):
    """Waits for the named processes; their saved arrays and logs."""
    try:
        codes = {name: p.wait(timeout=420) for name, p in processes.items()}
    finally:
        for p in processes.values():
            p.kill()
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in processes}
    assert set(codes.values()) == {0}, {name: log[-3000:] for name, log in logs.items()}
    return {name: np.load(tmp_path / f"{name}.npz") for name in processes}, logs


def _assert_same_weights(first, second, rtol=1e-4, atol=1e-5):
    names = [name for name in first.files if name.startswith("w")]
    assert names and sorted(names) == sorted(n for n in second.files if n.startswith("w"))
    for name in names:
        np.testing.assert_allclose(first[name], second[name], rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.slow
def test_two_replicas_train_as_one_device_at_the_same_global_batch(tmp_path):
    runs, logs = _finish(tmp_path, {mode: _start(tmp_path, mode, mode)
                                    for mode in ("single", "mirrored")})
    single, mirrored = runs["single"], runs["mirrored"]
    assert "MirroredStrategy, 2 replicas" in logs["mirrored"]
    assert int(single["replicas"]) == 1 and int(mirrored["replicas"]) == 2
    assert mirrored["shares"].tolist() == [4, 4]  # each replica takes half of each batch
    assert int(single["epochs"]) == int(mirrored["epochs"]) == 3
    _assert_same_weights(single, mirrored)


@pytest.mark.slow
def test_two_workers_train_as_one_process_at_the_same_global_batch(tmp_path):
    processes = {f"worker{index}": _start(tmp_path, "worker", f"worker{index}",
                                          {"TF_CONFIG": config})
                 for index, config in enumerate(distribute.local_cluster(2))}
    processes["single"] = _start(tmp_path, "single", "single")
    runs, logs = _finish(tmp_path, processes)
    assert "MultiWorkerMirroredStrategy, 2 replicas on 2 workers" in logs["worker0"]
    first, second, single = runs["worker0"], runs["worker1"], runs["single"]
    assert int(first["replicas"]) == 2 and int(first["epochs"]) == 3
    assert first["shares"].tolist() == second["shares"].tolist() == [4]  # half of each batch
    _assert_same_weights(first, second, rtol=0, atol=0)
    # One feature cache for the cluster: each worker computes half the rows of each split
    # (phase 1: the frozen backbone; phase 2: its frozen bottom), both read both halves and
    # train on them; worker 0 writes the whole files. The same model as one process.
    for log, shard in ((logs["worker0"], "shard 1 of 2"), (logs["worker1"], "shard 2 of 2")):
        assert f"Backbone features of the train split, {shard}: 12 rows" in log
        assert "on cached image features" in log
    cache = sorted(os.listdir(tmp_path / "run" / "cache"))
    for split, phase in itertools.product(("train", "val"), range(2)):
        keys = sorted({name.split(".")[0] for name in cache if name.startswith(f"{split}-")})
        assert len(keys) == 2  # phase 1's features and phase 2's bottom
        assert {f"{keys[phase]}.shard0of2.npz", f"{keys[phase]}.shard1of2.npz",
                f"{keys[phase]}.npz"} <= set(cache)
    assert not (tmp_path / "run" / "workers" / "worker1" / "cache").exists()
    _assert_same_weights(first, single)
    # The chief writes the run folder, the other worker its own below it.
    assert (tmp_path / "run" / "model.keras").exists()
    assert (tmp_path / "run" / "workers" / "worker1" / "model.keras").exists()


@pytest.mark.parametrize("config, workers, chief", [
    (None, 1, True),
    ({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 0}}, 2, True),
    ({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}, 2, False),
    ({"cluster": {"chief": ["c:1"], "worker": ["a:1"]}, "task": {"type": "worker", "index": 0}},
     2, False),
    ({"cluster": {"chief": ["c:1"], "worker": ["a:1"]}, "task": {"type": "chief", "index": 0}},
     2, True),
])
def test_workers_and_chief_from_tf_config(monkeypatch, config, workers, chief):
    if config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", json.dumps(config))
    assert distribute.num_workers() == workers
    assert distribute.is_chief() == chief


def test_auto_is_one_device_without_gpus_or_cluster(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    if len(tf.config.list_physical_devices("GPU")) > 1:
        pytest.skip("several GPUs: auto picks MirroredStrategy")
    strategy = distribute.distribution_strategy("auto")
    assert strategy.num_replicas_in_sync == 1
    assert distribute.distribution_strategy(strategy) is strategy


@pytest.mark.parametrize("value, message", [
    ("tpu", "Unknown strategy 'tpu'"),
])
@pytest.mark.bad_input
def test_bad_strategy_names_the_choices(value, message):
    with pytest.raises(ValueError, match=message):
        distribute.distribution_strategy(value)


@pytest.mark.bad_input
def test_bad_tf_config_says_what_is_expected(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "{cluster")
    with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
        distribute.num_workers()
