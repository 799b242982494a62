"""Routing statistics: what the gates record while training, and summaries.

Keras 3 layers cannot add metrics, so each gate sums the training-time
routing of the global batch into non-trainable float32 variables (the
*accumulators*), which `keras_moe.callbacks.RoutingStatistics` reads once
an epoch. NumPy summaries are computed on the host. Imports nothing of the
package.
"""

import numpy as np
from keras import ops

# Added to Mean(x)^2 in CV^2, as in the gating maths.
CV_EPSILON = 1e-10


def add_accumulator(layer, name, shape):
    """A zero-initialised, non-trainable float32 sum of global statistics.

    Every replica adds the same (all-reduced) values, so the first
    replica's update is the one kept.
    """
    return layer.add_weight(
        name=name,
        shape=shape,
        initializer="zeros",
        dtype="float32",
        trainable=False,
        aggregation="only_first_replica",
    )


def reset(variables):
    """Sets every variable to zeros (on every backend, and keeping the
    layout of a variable placed on a DTensor mesh)."""
    for variable in variables:
        variable.assign(ops.zeros_like(variable.value))


def summarise(tokens_per_expert, importance, load, positions, dropped):
    """The routing of the training positions since the last reset.

    Args:
        tokens_per_expert: `[E]` assignments per expert (accumulated).
        importance, load: `[E]` accumulated Importance and Load.
        positions: scalar, unmasked positions seen.
        dropped: scalar, assignments dropped for capacity.

    Returns:
        dict: `fraction_per_expert` (float array `[E]`, share of the routed
        assignments each expert received), `importance_cv2` and `load_cv2`
        (CV^2 of the summed Importance and Load), `max_mean_load` (busiest
        expert's assignments over the mean), `unused_experts` (experts that
        received nothing), `dropped_fraction` (assignments dropped for
        capacity) and `positions` (unmasked positions seen).
    """
    counts = np.asarray(ops.convert_to_numpy(tokens_per_expert), np.float64)
    assignments = float(counts.sum())
    mean = counts.mean()

    def cv2(value):
        value = np.asarray(ops.convert_to_numpy(value), np.float64)
        return float(value.var() / (value.mean() ** 2 + CV_EPSILON))

    dropped = float(ops.convert_to_numpy(dropped))
    return {
        "fraction_per_expert": counts / max(assignments, 1.0),
        "importance_cv2": cv2(importance),
        "load_cv2": cv2(load),
        "max_mean_load": float(counts.max() / mean) if mean > 0 else 0.0,
        "unused_experts": int((counts == 0).sum()),
        "dropped_fraction": dropped / max(assignments, 1.0),
        "positions": float(ops.convert_to_numpy(positions)),
    }


def is_reporting(layer):
    """True for a layer that reports routing (`routing_statistics()`)."""
    return callable(getattr(layer, "routing_statistics", None))

