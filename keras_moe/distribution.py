"""Everything TensorFlow-specific about distributing MoE layers.

The layers themselves are backend-neutral (`keras.ops`); this module is the
one place that imports TensorFlow, and only when the TensorFlow backend is
active.

PAPER.md section 5: experts must be balanced over the *combined* batch of all
data-parallel replicas, so `Importance` and `Load` are summed across replicas
before CV^2 is taken (`global_batch_sum`). Every replica then holds the same,
global balancing loss and adds it with `add_loss`. Keras' TensorFlow trainer
treats additional losses as per-replica values to average (it scales them by
`1 / replicas` and sums the gradients), so the global loss enters `fit`
exactly once, and its gradients are exact: the all-reduce's gradient sums the
replicas' identical upstream gradients, which the `1 / replicas` cancels.
In a custom loop, average `layer.losses` over replicas the same way.
"""

import keras


def _tensorflow():
    """The `tensorflow` module when it is the Keras backend, else None."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    return tf


def global_batch_sum(value):
    """Sums a per-replica statistic over all replicas in sync.

    Inside the replica function of a `tf.distribute` strategy with more than
    one replica this is an all-reduce (differentiable: its gradient is the
    all-reduce of the incoming gradients). Everywhere else (no strategy,
    cross-replica context, other backends) it returns `value` unchanged.

    Args:
        value: tensor of any shape, e.g. `[num_experts]`.

    Returns:
        tensor of the same shape.
    """
    if num_replicas_in_sync() == 1:
        return value
    tf = _tensorflow()
    return tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, value
    )


def global_batch_sums(values):
    """`global_batch_sum` of several tensors with one all-reduce.

    Each all-reduce is a synchronisation point of the replicas, so a gate's
    statistics are packed into one vector, summed once and unpacked.

    Args:
        values: list of float32 tensors with static shapes.

    Returns:
        list of tensors with the same shapes.
    """
    if num_replicas_in_sync() == 1:
        return list(values)
    from keras import ops

    flat = [ops.reshape(value, (-1,)) for value in values]
    sizes = [int(value.shape[0]) for value in flat]
    summed = global_batch_sum(ops.concatenate(flat, axis=0))
    pieces, start = [], 0
    for value, size in zip(values, sizes):
        pieces.append(ops.reshape(summed[start : start + size], value.shape))
        start += size
    return pieces


def num_replicas_in_sync():
    """Replicas whose batches make up one global batch (1 off-strategy)."""
    tf = _tensorflow()
    if tf is None or not tf.distribute.has_strategy():
        return 1
    if tf.distribute.in_cross_replica_context():
        return 1
    context = tf.distribute.get_replica_context()
    return 1 if context is None else context.num_replicas_in_sync


def check_jit_compile(layer):
    """Raises a clear error for XLA under a multi-replica strategy.

    TensorFlow 2.21 cannot run `jit_compile=True` steps under
    `MirroredStrategy` (it fails even for `Embedding -> Dense`).
    `jit_compile="auto"` already turns XLA off there; this names the fix
    when a user forces it.
    """
    tf = _tensorflow()
    if tf is None or num_replicas_in_sync() == 1:
        return
    from tensorflow.python.ops import control_flow_util

    if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
        strategy = type(tf.distribute.get_strategy()).__name__
        raise ValueError(
            f"{layer.__class__.__name__} '{layer.name}' is being compiled "
            f"with XLA (jit_compile=True) under {strategy}; TensorFlow "
            f"{tf.__version__} cannot run XLA-compiled steps under "
            f"tf.distribute mirrored strategies (even Embedding -> Dense "
            f"fails). Compile the model with jit_compile=False or "
            f"jit_compile='auto' (which turns XLA off under strategies)."
        )


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
    global batch (`global_batch_sum`).
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
    reduce_one = strategy.reduce

    def rank(item):
        if isinstance(item, tf.distribute.DistributedValues):
            item = strategy.experimental_local_results(item)[0]
        return getattr(item, "shape", tf.TensorShape(None)).rank

    def reduce(reduce_op, value, axis=None):
        def reduce_item(item):
            item_axis = None if rank(item) == 0 else axis
            return reduce_one(reduce_op, item, axis=item_axis)

        return tf.nest.map_structure(reduce_item, value)

    strategy.reduce = reduce
    return strategy
