"""Dropless dispatch on the JAX backend: a grouped matmul.

JAX traces with static shapes, so the dropless buffer of
`keras_moe.dispatch` (whose capacity is the busiest expert's load) cannot be
built under `jit`. Here the `N*k` assignments are sorted by expert and the
experts run as grouped matmuls (`jax.lax.ragged_dot`) over the sorted rows.
JAX only (it imports `jax`); `keras_moe.layers` uses it when JAX is the
Keras backend.
"""

import jax
from keras import ops

from keras_moe import dispatch


def ragged_mixture(
    inputs, expert_weights, expert_indices, weights, kind, activation,
    mask=None,
):
    """Dropless mixture with static shapes, for the JAX backend.

    JAX traces with static shapes, so the dropless buffer (whose capacity is
    the busiest expert's load) cannot be built under `jit`. Instead the
    `N*k` assignments are sorted by expert and the experts run as grouped
    matmuls (`jax.lax.ragged_dot`) over the sorted rows. That is a true
    grouped GEMM on GPU/TPU; XLA:CPU lowers it to a dense loop over the
    groups, so on CPU prefer a `capacity_factor` with JAX.

    Args:
        inputs: `[N, d]`; expert_weights: `[N, k]` (zero where masked);
        expert_indices: int `[N, k]`; weights: the stacked expert weights
        of `kind` (`dispatch.EXPERT_KINDS`: "mlp" or "gated");
        activation: callable; mask: optional bool `[N]`.

    Returns:
        tensor `[N, d_out]`.
    """
    weights = [ops.convert_to_tensor(weight) for weight in weights]
    num_tokens = inputs.shape[0]
    num_experts = weights[0].shape[0]
    order, sorted_experts, counts = dispatch.sort_assignments(
        expert_indices, num_experts, mask
    )
    group_sizes = counts[:num_experts]
    sorted_positions = order % num_tokens
    rows = ops.take(inputs, sorted_positions, axis=0)
    if kind == "gated":
        gate_kernel, up_kernel, down_kernel = weights
        hidden = activation(
            jax.lax.ragged_dot(rows, gate_kernel, group_sizes)
        ) * jax.lax.ragged_dot(rows, up_kernel, group_sizes)
        outputs = jax.lax.ragged_dot(hidden, down_kernel, group_sizes)
    else:
        hidden_kernel, hidden_bias, output_kernel, output_bias = weights
        bias_rows = ops.minimum(sorted_experts, num_experts - 1)
        hidden = jax.lax.ragged_dot(rows, hidden_kernel, group_sizes)
        hidden = activation(hidden + ops.take(hidden_bias, bias_rows, axis=0))
        outputs = jax.lax.ragged_dot(hidden, output_kernel, group_sizes)
        outputs = outputs + ops.take(output_bias, bias_rows, axis=0)
    gate_values = ops.take(
        ops.reshape(ops.transpose(expert_weights), (-1,)), order
    )
    gate_values = ops.where(sorted_experts < num_experts, gate_values, 0.0)
    contributions = ops.where(
        (sorted_experts < num_experts)[:, None],
        outputs * ops.cast(gate_values, outputs.dtype)[:, None],
        0.0,
    )
    return ops.segment_sum(
        contributions, sorted_positions, num_segments=num_tokens
    )
