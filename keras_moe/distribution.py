"""Everything TensorFlow-specific about distributing MoE layers.

The layers themselves are backend-neutral (`keras.ops`); this module is the
one place that imports TensorFlow, and only when the TensorFlow backend is
active.

PAPER.md section 5: experts must be balanced over the *combined* batch of all
data-parallel replicas, so `Importance` and `Load` are summed across replicas
before CV^2 is taken (`global_batch_sum`).
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
    tf = _tensorflow()
    if tf is None:
        return value
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return value
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)
