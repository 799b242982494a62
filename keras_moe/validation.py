"""Checks of constructor arguments, inputs and masks, shared by every layer.

Each check raises a `ValueError` (a `TypeError` for a value of the wrong
kind) that names the argument and the value received, and returns the
value normalised (NumPy integers become Python ints, so configs stay
JSON-serialisable). Nothing here imports the rest of the package, and Keras
only inside the input checks: the layers, the gates and the command line
(before it imports the backend) all use these.
"""

import math
import numbers

import numpy as np


def integer(name, value, minimum=1):
    """An integer argument (Python or NumPy int, not bool) `>= minimum`.

    Returns:
        int.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (numbers.Integral, np.integer)
    ):
        raise TypeError(
            f"`{name}` must be an integer >= {minimum}, not "
            f"{type(value).__name__}. Received: {name}={value!r}"
        )
    value = int(value)
    if value < minimum:
        raise ValueError(
            f"`{name}` must be an integer >= {minimum}. Received: "
            f"{name}={value}"
        )
    return value


def number(name, value, minimum=None, exclusive=False, below=None):
    """A finite real argument (int or float, not bool or str).

    Args:
        name: str, the argument's name for the message.
        value: the value received.
        minimum: optional lower bound.
        exclusive: bool. The bound itself is not allowed.
        below: optional exclusive upper bound.

    Returns:
        float.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (numbers.Real, np.integer, np.floating)
    ):
        raise TypeError(
            f"`{name}` must be a number, not {type(value).__name__}. "
            f"Received: {name}={value!r}"
        )
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(
            f"`{name}` must be finite. Received: {name}={value}"
        )
    if minimum is not None and (
        value < minimum or (exclusive and value == minimum)
    ):
        relation = ">" if exclusive else ">="
        raise ValueError(
            f"`{name}` must be {relation} {minimum}. Received: "
            f"{name}={value}"
        )
    if below is not None and value >= below:
        raise ValueError(
            f"`{name}` must be < {below}. Received: {name}={value}"
        )
    return value


def optional_number(name, value, minimum=None, exclusive=False):
    """`number`, or None."""
    if value is None:
        return None
    return number(name, value, minimum=minimum, exclusive=exclusive)


def boolean(name, value):
    """A bool argument (Python or NumPy bool)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"`{name}` must be True or False. Received: {name}={value!r}"
        )
    return bool(value)


def random_seed(value):
    """A seed: None or an integer >= 0."""
    if value is None:
        return None
    return integer("seed", value, minimum=0)


def experts_and_k(num_experts, k, experts_name="num_experts"):
    """`num_experts >= 1` and `1 <= k <= num_experts`; returns both as ints.

    Args:
        experts_name: what the experts' argument is called where the check
            is made (e.g. `num_groups` for a hierarchical gate's first
            level), for the message.
    """
    num_experts = integer(experts_name, num_experts)
    k = integer("k", k)
    if k > num_experts:
        raise ValueError(
            f"`k` must be <= `{experts_name}`: a position cannot take more "
            f"of them than there are. Received: k={k}, "
            f"{experts_name}={num_experts}"
        )
    return num_experts, k


def hierarchy(num_groups, experts_per_group, k):
    """The two levels of a hierarchical gate; returns the three as ints."""
    num_groups, k = experts_and_k(num_groups, k, experts_name="num_groups")
    experts_per_group, k = experts_and_k(
        experts_per_group, k, experts_name="experts_per_group"
    )
    return num_groups, experts_per_group, k


def gate_arguments(k, noisy, noise_epsilon, importance_weight, load_weight,
                   seed, noisy_name="noisy"):
    """The gate arguments every gate and MoE layer takes, checked.

    `k >= 1`, `noisy` a bool, `noise_epsilon > 0`, the loss weights `>= 0`,
    `seed` None or an integer `>= 0`.

    Returns:
        dict argument name -> normalised value (`noisy` under
        `noisy_name`), to set on the layer.
    """
    return {
        "k": integer("k", k),
        noisy_name: boolean(noisy_name, noisy),
        "noise_epsilon": number(
            "noise_epsilon", noise_epsilon, minimum=0.0, exclusive=True
        ),
        "importance_weight": number(
            "importance_weight", importance_weight, minimum=0.0
        ),
        "load_weight": number("load_weight", load_weight, minimum=0.0),
        "seed": random_seed(seed),
    }


def feature_input(layer, input_shape, input_dtype=None):
    """Raises a ValueError naming what is wrong with a layer's input.

    Features on the last axis (known), at least one position axis,
    floating point.
    """
    input_shape = tuple(input_shape)
    if len(input_shape) < 2:
        raise ValueError(
            f"{layer.__class__.__name__} expects inputs of rank >= 2 "
            f"(positions..., features); received input shape {input_shape}"
        )
    if input_shape[-1] is None:
        raise ValueError(
            f"{layer.__class__.__name__} needs the last (feature) dimension "
            f"of its inputs to be known; received input shape {input_shape}"
        )
    import keras

    if input_dtype is not None and not keras.backend.is_float_dtype(
        input_dtype
    ):
        raise ValueError(
            f"{layer.__class__.__name__} expects floating-point inputs "
            f"(embed integer ids first); received dtype {input_dtype}"
        )


def mask(layer, mask_value, inputs):
    """Raises a ValueError unless `mask` is `[...]` for inputs `[..., d]`.

    Checks the rank and every dimension that is known on both sides (in
    eager calls, all of them). A mask laid out differently from the
    positions would silently mask the wrong ones.
    """
    if mask_value is None:
        return
    mask_shape = tuple(mask_value.shape)
    leading = tuple(inputs.shape)[:-1]
    matches = len(mask_shape) == len(leading) and all(
        a is None or b is None or a == b for a, b in zip(mask_shape, leading)
    )
    if not matches:
        raise ValueError(
            f"{layer.__class__.__name__} '{layer.name}': `mask` must have "
            f"the shape of the inputs without their feature axis, "
            f"{leading}. Received: mask of shape {mask_shape} for inputs of "
            f"shape {tuple(inputs.shape)}"
        )
