"""tf.distribute: the strategy choice, and two workers training in step on 127.0.0.1."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from keras_mmtl.training import distribute

# One worker of a two-worker cluster: builds a small image + text model in the strategy's
# scope, trains both phases and saves its final weights.
WORKER = textwrap.dedent("""
    import sys

    import numpy as np

    from keras_mmtl.training import distribution_strategy

    strategy = distribution_strategy("auto")  # before anything else runs in TensorFlow

    from keras_mmtl.data import from_arrays
    from keras_mmtl.models import build_classifier_for
    from keras_mmtl.training import train

    run_dir, out = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)
    labels = ["a", "a", "b", "b"] * 12
    images = rng.integers(0, 255, (48, 16, 16, 3), dtype="uint8")
    texts = [f"word{i % 5} thing" for i in range(48)]
    records = from_arrays(labels, images=images, texts=texts, splits=["train", "val"] * 24)
    with strategy.scope():
        model = build_classifier_for(records, image_backbone="small_cnn", image_weights=None,
                                     image_size=(16, 16), freeze_backbone=True)
    history = train(model, records, run_dir, epochs=2, fine_tune_epochs=1, batch_size=4,
                    verbose=0)
    np.savez(out, replicas=strategy.num_replicas_in_sync, epochs=len(history["epoch"]),
             **{f"w{i}": w for i, w in enumerate(model.get_weights())})
""")


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _tf_config(workers, index):
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


@pytest.mark.slow
def test_two_workers_finish_with_identical_weights(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    run_dir = tmp_path / "run"
    processes = []
    for index in range(2):
        env = {**os.environ, "TF_CONFIG": _tf_config(workers, index), "CUDA_VISIBLE_DEVICES": ""}
        log = open(tmp_path / f"worker{index}.log", "w")
        processes.append(subprocess.Popen(
            [sys.executable, str(script), str(run_dir), str(tmp_path / f"weights{index}.npz")],
            env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=420) for p in processes]
    finally:
        for p in processes:
            p.kill()
    logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], [log[-3000:] for log in logs]
    assert "MultiWorkerMirroredStrategy, 2 replicas on 2 workers" in logs[0]
    first, second = (np.load(tmp_path / f"weights{i}.npz") for i in range(2))
    assert int(first["replicas"]) == 2 and int(first["epochs"]) == 3
    assert sorted(first.files) == sorted(second.files)
    for name in first.files:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    # The chief writes the run folder, the other worker its own below it.
    assert (run_dir / "model.keras").exists()
    assert (run_dir / "workers" / "worker1" / "model.keras").exists()


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
