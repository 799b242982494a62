"""Data-parallel training with `tf.distribute` (TensorFlow backend only).

Strategies that Keras' `fit` can train MoE models with, and logical CPU
devices for running them without accelerators. The layers stay
backend-neutral: the one thing they need from a strategy, sums of the
routing statistics over the replicas (so that experts are balanced over the
global batch, PAPER.md section 5), is `keras_moe.replicas`.
"""

import keras

from keras_moe import compat


def _tensorflow():
    """The `tensorflow` module when it is the Keras backend, else None."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    return tf


def use_virtual_cpu_devices(count):
    """Splits the host CPU into `count` logical devices.

    For running multi-device code (MirroredStrategy, DTensor meshes) on a
    machine without accelerators. Must be called before TensorFlow
    initialises its devices (before any op runs).

    Returns:
        the list of logical CPU device names.
    """
    tf = _tensorflow()
    if tf is None:
        raise RuntimeError("use_virtual_cpu_devices needs the TensorFlow backend")
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
    )
    return [device.name for device in tf.config.list_logical_devices("CPU")]


def mirrored_strategy(num_cpu_devices=None):
    """A `tf.distribute.MirroredStrategy` over the machine's accelerators.

    Uses every GPU when there is one. Without GPUs it uses the logical CPU
    devices (see `use_virtual_cpu_devices`; `num_cpu_devices` creates them
    first), with a reduction through the host, which works for CPUs.
    Experts are replicated on every device; balancing is measured on the
    global batch (`keras_moe.replicas.global_batch_sum`).
    """
    tf = _tensorflow()
    if tf is None:
        raise RuntimeError("mirrored_strategy needs the TensorFlow backend")
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return tf.distribute.MirroredStrategy([d.name for d in gpus])
    if num_cpu_devices:
        use_virtual_cpu_devices(num_cpu_devices)
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(
        cpus, cross_device_ops=tf.distribute.ReductionToOneDevice()
    )


def multi_worker_mirrored_strategy(**kwargs):
    """A `tf.distribute.MultiWorkerMirroredStrategy` that Keras 3 can `fit`.

    Reads the cluster from `TF_CONFIG` (or `cluster_resolver=`); create it
    before anything else touches TensorFlow. Keras 3.15's `fit` calls
    `strategy.reduce("MEAN", (x, y))` on a whole per-replica batch to build
    the model symbolically, which this strategy cannot reduce as one
    structure (`ValueError: Attempt to convert a value (PerReplica...`),
    and then `strategy.reduce("MEAN", log, axis=0)` on scalar logs
    (`Invalid reduction dimension 0 for input with 0 dimensions`); see
    keras-team/keras#20585. This instance reduces nested structures element
    by element, and scalars across replicas only; nothing else changes.
    """
    tf = _tensorflow()
    if tf is None:
        raise RuntimeError(
            "multi_worker_mirrored_strategy needs the TensorFlow backend"
        )
    strategy = tf.distribute.MultiWorkerMirroredStrategy(**kwargs)
    return compat.elementwise_strategy_reduce(strategy)
