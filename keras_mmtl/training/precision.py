"""Numeric precision: mixed bfloat16 or float16 where the GPU gains from it, float32 elsewhere."""

import keras
import tensorflow as tf

from keras_mmtl.progress import logger

# (least compute capability, policy), best first: bfloat16 has float32's range and needs no
# loss scaling, but only Ampere (8.0) and later GPUs compute it fast; Volta and Turing (7.x)
# have float16 tensor cores.
AUTO_POLICIES = (((8, 0), "mixed_bfloat16"), ((7, 0), "mixed_float16"))


def setup_precision(policy="auto"):
    """Sets the global Keras dtype policy for the models built next, and GPU memory growth.

    Call it once, before building the model. With `"auto"`, the policy
    follows the least capable GPU (all of them train the same model):
    compute capability 8.0 or more (Ampere, Ada, Hopper, Blackwell) gets
    `"mixed_bfloat16"` (float32's range, so no loss scaling, and no
    overflow of large activations); 7.x (Volta, Turing) gets
    `"mixed_float16"`; anything else, a CPU included, gets `"float32"`
    (float16 and bfloat16 are slower than float32 on a CPU). Under mixed
    precision the classifier's softmax head, the tabular standardisation
    and the loss stay float32; under `"mixed_float16"`, `compile` also
    wraps the optimizer in Keras' `LossScaleOptimizer`.

    Args:
        policy: `"auto"`, or a Keras policy name (`"float32"`,
            `"mixed_float16"`, `"mixed_bfloat16"`).

    Returns:
        the name of the policy set.

    Example:

    >>> setup_precision("auto")  # without a GPU; logs "Precision: float32 (no GPU ...)"
    'float32'
    """
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # the GPU is already in use by this process
            pass
    if policy == "auto":
        policy, reason = _auto_policy(gpus)
    else:
        reason = "as asked"
    keras.mixed_precision.set_global_policy(policy)
    logger.info(f"Precision: {policy} ({reason})")
    return policy


def _auto_policy(gpus):
    """`(policy, reason)` for the least compute capability among `gpus`."""
    capabilities = [tuple(tf.config.experimental.get_device_details(gpu).get(
        "compute_capability", (0, 0))) for gpu in gpus]
    if not capabilities:
        return "float32", "no GPU with tensor cores found"
    least = min(capabilities)
    for needed, policy in AUTO_POLICIES:
        if least >= needed:
            return policy, f"GPU compute capability {least[0]}.{least[1]}"
    return "float32", f"GPU compute capability {least[0]}.{least[1]}: no tensor cores"
