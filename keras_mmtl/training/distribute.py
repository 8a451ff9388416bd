"""Which `tf.distribute` strategy a run uses: one device, several GPUs, or several machines."""

import json
import os
import socket

import tensorflow as tf

from keras_mmtl.progress import logger

STRATEGIES = ("auto", "default", "mirrored", "multi_worker")
_MADE = {}  # the strategies made in this process, by name


def distribution_strategy(strategy="auto"):
    """The `tf.distribute` strategy to build and train a model in.

    `"auto"` picks `MultiWorkerMirroredStrategy` when the `TF_CONFIG`
    environment variable names several workers (each machine runs the same
    command with its own `TF_CONFIG`), `MirroredStrategy` when this machine
    has several GPUs, and TensorFlow's default (one device) otherwise. This
    is plain `tf.distribute`: build the model inside `strategy.scope()` and
    `keras_mmtl.training.train` does the rest (optimizer and metrics in the
    same scope, batch size per replica).

    Call it first thing in a program: a multi-worker strategy must exist
    before TensorFlow runs anything else. A strategy is made once per
    process; calling again returns the same one.

    Args:
        strategy: `"auto"`, `"default"`, `"mirrored"`, `"multi_worker"` or a
            `tf.distribute.Strategy`, returned as is.

    Returns:
        a `tf.distribute.Strategy`.

    Example:

    >>> strategy = distribution_strategy("default")  # logs "Distribution: one device, 1 replica."
    >>> strategy.num_replicas_in_sync
    1
    >>> with strategy.scope():  # doctest: +SKIP
    ...     model = keras_mmtl.build_classifier_for(records)
    """
    if isinstance(strategy, tf.distribute.Strategy):
        return strategy
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown strategy {strategy!r}. Expected one of {list(STRATEGIES)} "
                         f"or a tf.distribute.Strategy. Received: strategy={strategy!r}")
    if strategy == "auto":
        if num_workers() > 1:
            strategy = "multi_worker"
        elif len(tf.config.list_physical_devices("GPU")) > 1:
            strategy = "mirrored"
        else:
            strategy = "default"
    if strategy == "default":
        chosen = tf.distribute.get_strategy()
    else:  # made once per process: a second multi-worker strategy would fail
        if strategy not in _MADE:
            _MADE[strategy] = (tf.distribute.MultiWorkerMirroredStrategy()
                               if strategy == "multi_worker" else tf.distribute.MirroredStrategy())
        chosen = _MADE[strategy]
    logger.info(f"Distribution: {describe_strategy(chosen)}.")
    return chosen


def describe_strategy(strategy):
    """A short description of a strategy, e.g. 'MirroredStrategy, 2 replicas'."""
    replicas = strategy.num_replicas_in_sync
    workers = f" on {num_workers()} workers" if is_multi_worker(strategy) else ""
    if is_multi_worker(strategy):
        name = "MultiWorkerMirroredStrategy"  # its class is CollectiveAllReduceStrategy
    elif isinstance(strategy, tf.distribute.MirroredStrategy):
        name = "MirroredStrategy"
    else:
        name = "one device" if type(strategy).__name__.startswith("_") else type(strategy).__name__
    return f"{name}, {replicas} replica{'s' if replicas > 1 else ''}{workers}"


def is_multi_worker(strategy):
    """Whether a strategy spans several workers (machines or processes)."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def num_workers():
    """Workers (chief included) that `TF_CONFIG` names; 1 without it."""
    cluster = _tf_config().get("cluster", {})
    return max(1, sum(len(cluster.get(kind, [])) for kind in ("chief", "worker")))


def worker_id():
    """`(task type, index)` of this process in `TF_CONFIG`, or `("worker", 0)` without it."""
    task = _tf_config().get("task", {})
    return task.get("type", "worker"), int(task.get("index", 0))


def worker_rank():
    """This process's number among the workers, 0 to `num_workers() - 1`; the chief's is 0."""
    kind, index = worker_id()
    has_chief = bool(_tf_config().get("cluster", {}).get("chief"))
    return 0 if kind == "chief" else index + has_chief


def is_chief():
    """Whether this process writes the run's shared outputs (the chief, or worker 0 without one)."""
    kind, index = worker_id()
    has_chief = bool(_tf_config().get("cluster", {}).get("chief"))
    return kind == "chief" or (not has_chief and kind == "worker" and index == 0)


def _tf_config():
    value = os.environ.get("TF_CONFIG")
    if not value:
        return {}
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error}). Expected for example "
                         '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                         '"task": {"type": "worker", "index": 0}}') from None


def local_cluster(workers):
    """`TF_CONFIG` values of a cluster of `workers` processes on this machine, one per worker.

    For trying multi-worker training on one machine: start one process per
    value, with the environment variable `TF_CONFIG` set to it (ports are
    free ones of 127.0.0.1 when called).

    Example:

    >>> configs = local_cluster(2)
    >>> [json.loads(config)["task"] for config in configs]
    [{'type': 'worker', 'index': 0}, {'type': 'worker', 'index': 1}]
    """
    sockets = [socket.socket() for _ in range(workers)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    addresses = [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]
    for s in sockets:
        s.close()
    return [json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": i}})
            for i in range(workers)]
