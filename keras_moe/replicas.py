"""Sums over the data-parallel replicas of a `tf.distribute` strategy.

PAPER.md section 5: experts must be balanced over the *combined* batch of all
data-parallel replicas, so `Importance` and `Load` are summed across replicas
before CV^2 is taken. Every replica then holds the same, global balancing
loss and adds it with `add_loss`. Keras' TensorFlow trainer treats
additional losses as per-replica values to average (it scales them by
`1 / replicas` and sums the gradients), so the global loss enters `fit`
exactly once, and its gradients are exact: the all-reduce's gradient sums the
replicas' identical upstream gradients, which the `1 / replicas` cancels.
In a custom loop, average `layer.losses` over replicas the same way.

The only backend-specific code the layers call. TensorFlow is imported only
when it is the Keras backend; on other backends (and off-strategy) every
function here is the identity. Imports nothing of the package.
"""

import keras
from keras import ops


def _tensorflow():
    """The `tensorflow` module when it is the Keras backend, else None."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    return tf


def num_replicas_in_sync():
    """Replicas whose batches make up one global batch (1 off-strategy)."""
    tf = _tensorflow()
    if tf is None or not tf.distribute.has_strategy():
        return 1
    if tf.distribute.in_cross_replica_context():
        return 1
    context = tf.distribute.get_replica_context()
    return 1 if context is None else context.num_replicas_in_sync


def strategy_name():
    """The class name of the current `tf.distribute` strategy, or None."""
    tf = _tensorflow()
    if tf is None or not tf.distribute.has_strategy():
        return None
    return type(tf.distribute.get_strategy()).__name__


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
    flat = [ops.reshape(value, (-1,)) for value in values]
    sizes = [int(value.shape[0]) for value in flat]
    summed = global_batch_sum(ops.concatenate(flat, axis=0))
    pieces, start = [], 0
    for value, size in zip(values, sizes):
        pieces.append(ops.reshape(summed[start : start + size], value.shape))
        start += size
    return pieces
