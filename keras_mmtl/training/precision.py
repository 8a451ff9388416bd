"""Numeric precision: mixed float16 where the GPU gains from it, float32 elsewhere."""

import keras
import tensorflow as tf

from keras_mmtl.progress import logger


def setup_precision(policy="auto"):
    """Sets the global Keras dtype policy for the models built next, and GPU memory growth.

    Call it once, before building the model. With `"auto"`, a GPU of compute
    capability 7.0 or more (Volta, Turing, Ampere, Hopper: tensor cores)
    gets `"mixed_float16"`; anything else, a CPU included, gets `"float32"`
    (float16 and bfloat16 are slower than float32 on a CPU). Under
    mixed precision the classifier's softmax head and the loss stay float32,
    and `compile` wraps the optimizer in Keras' `LossScaleOptimizer`.

    Args:
        policy: `"auto"`, or a Keras policy name (`"float32"`,
            `"mixed_float16"`, `"mixed_bfloat16"`).

    Returns:
        the name of the policy set.

    Example:

    >>> setup_precision("auto")  # on a machine without a GPU
    Precision: float32 (no GPU with tensor cores found)
    'float32'
    """
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # the GPU is already in use by this process
            pass
    if policy == "auto":
        capabilities = [tf.config.experimental.get_device_details(gpu).get(
            "compute_capability", (0, 0)) for gpu in gpus]
        fast = [c for c in capabilities if tuple(c) >= (7, 0)]
        policy = "mixed_float16" if fast else "float32"
        reason = (f"GPU compute capability {max(fast)[0]}.{max(fast)[1]}" if fast
                  else "no GPU with tensor cores found")
    else:
        reason = "as asked"
    keras.mixed_precision.set_global_policy(policy)
    logger.info(f"Precision: {policy} ({reason})")
    return policy
