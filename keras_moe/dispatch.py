"""Sparse dispatch and combine: send each position to its k experts only.

Every chosen (position, expert) pair is called an *assignment*. The plan
sorts the `N*k` assignments by expert id (a stable sort, so earlier choices
and earlier positions come first), and lays them out in a `[E, C, d]` buffer:
row `c` of expert `e` holds the `c`-th position routed to `e`. The experts
then run as two batched matmuls over that buffer, and `combine` gathers each
assignment's output back and sums it, weighted by its gate value, into its
position.

Two ways to choose the capacity `C` (slots per expert):

- dropless (`capacity=None`): `C` is the busiest expert's load in this
  batch, so nothing is dropped and the buffer holds about
  `max_load / mean_load` times the `N*k` rows actually needed (about 1.1x
  with balanced routing). `C` depends on the data: not XLA-compilable.
- fixed capacity: `C = ceil(capacity_factor * N * k / E)`, a static shape
  when `N` is; assignments beyond an expert's `C` slots are dropped (their
  position keeps the gate-weighted outputs of the experts that took it)
  and counted.

Nothing of size `N*E*C` or `N*E*hidden` is ever built, and there is no loop
over experts. Pure functions over `keras.ops`, so every backend runs them.
"""

import collections
import math

from keras import ops

DispatchPlan = collections.namedtuple(
    "DispatchPlan",
    [
        "slot_positions",
        "assignment_slots",
        "tokens_per_expert",
        "num_dropped",
        "capacity",
    ],
)
DispatchPlan.__doc__ = """Where every assignment goes.

Attributes:
    slot_positions: int32 `[E, C]`: the position held by each slot, or `N`
        (a zero row) for an empty slot.
    assignment_slots: int32 `[N, k]`: the flat slot `e * C + c` each
        assignment took, or `E * C` when it was dropped or masked.
    tokens_per_expert: int32 `[E]`: assignments routed to each expert
        before capacity is applied (masked positions excluded).
    num_dropped: int32 scalar: assignments dropped for lack of capacity.
    capacity: int or int32 scalar `C`.
"""


def capacity_for(num_tokens, experts_per_token, num_experts, capacity_factor):
    """`C = ceil(capacity_factor * N * k / E)`, at least 1.

    A Python int when `num_tokens` is one (static shapes), else a scalar
    tensor.
    """
    if isinstance(num_tokens, int):
        return max(
            1,
            math.ceil(
                capacity_factor * num_tokens * experts_per_token / num_experts
            ),
        )
    capacity = ops.ceil(
        capacity_factor
        * ops.cast(num_tokens * experts_per_token, "float32")
        / num_experts
    )
    return ops.maximum(ops.cast(capacity, "int32"), 1)


def sort_assignments(expert_indices, num_experts, mask=None):
    """Orders the `N*k` assignments by expert, stably.

    Assignments are laid out choice-major (every position's first choice
    before any second choice), so that under a capacity limit first
    choices win; masked ones go to a virtual expert `E` that owns no slot.

    Returns:
        `(order, sorted_experts, counts)`: int32 `[N*k]` permutation, the
        expert of each sorted assignment, and int32 `[E + 1]` assignments
        per expert (the last entry counts masked ones).
    """
    experts_per_token = expert_indices.shape[1]
    assignment_experts = ops.reshape(
        ops.transpose(ops.cast(expert_indices, "int32")), (-1,)
    )
    if mask is not None:
        assignment_mask = ops.tile(ops.cast(mask, "bool"), (experts_per_token,))
        assignment_experts = ops.where(
            assignment_mask, assignment_experts, num_experts
        )
    order = ops.cast(ops.argsort(assignment_experts), "int32")
    sorted_experts = ops.take(assignment_experts, order)
    counts = ops.cast(
        ops.segment_sum(
            ops.ones_like(assignment_experts),
            assignment_experts,
            num_segments=num_experts + 1,
        ),
        "int32",
    )
    return order, sorted_experts, counts


def plan_dispatch(expert_indices, num_experts, capacity=None, mask=None):
    """Assigns every (position, expert) pair a slot in the expert buffer.

    Args:
        expert_indices: int tensor `[N, k]`, the experts each position
            chose (distinct within a row).
        num_experts: int `E`.
        capacity: None for dropless (the busiest expert's load), or an int
            (or int32 scalar tensor) `C >= 1` of slots per expert.
        mask: optional bool tensor `[N]`; masked positions take no slot.

    Returns:
        `DispatchPlan`.
    """
    num_tokens = ops.shape(expert_indices)[0]
    experts_per_token = expert_indices.shape[1]
    num_assignments = num_tokens * experts_per_token
    order, sorted_experts, counts = sort_assignments(
        expert_indices, num_experts, mask
    )
    tokens_per_expert = counts[:num_experts]
    starts = ops.cumsum(counts) - counts
    rank_in_expert = ops.arange(num_assignments, dtype="int32") - ops.take(
        starts, sorted_experts
    )
    if capacity is None:
        capacity = ops.maximum(ops.max(tokens_per_expert), 1)
    kept = ops.logical_and(
        ops.less(rank_in_expert, capacity),
        ops.less(sorted_experts, num_experts),
    )
    num_slots = num_experts * capacity
    sorted_slots = ops.where(
        kept, sorted_experts * capacity + rank_in_expert, num_slots
    )
    # Undo the sort (order is a permutation, so the scatter is exact).
    assignment_slots = ops.scatter(
        order[:, None], sorted_slots, (num_assignments,)
    )
    assignment_slots = ops.transpose(
        ops.reshape(assignment_slots, (experts_per_token, num_tokens))
    )

    # Slot (e, c) holds sorted assignment starts[e] + c, if it exists.
    slot_rank = ops.arange(capacity, dtype="int32")
    filled = ops.minimum(tokens_per_expert, capacity)
    slot_sources = starts[:num_experts, None] + slot_rank[None, :]
    # One entry past the end, so that the clipped gather below is valid
    # even when there are no assignments at all (no positions).
    sorted_positions = ops.concatenate(
        [order % ops.maximum(num_tokens, 1),
         ops.reshape(ops.cast(num_tokens, "int32"), (1,))],
        axis=0,
    )
    slot_positions = ops.where(
        slot_rank[None, :] < filled[:, None],
        ops.take(sorted_positions, ops.minimum(slot_sources, num_assignments)),
        num_tokens,
    )
    num_dropped = ops.sum(tokens_per_expert) - ops.sum(filled)
    return DispatchPlan(
        slot_positions, assignment_slots, tokens_per_expert, num_dropped,
        capacity,
    )


def dispatch(inputs, plan):
    """Gathers each expert's positions into its rows of the buffer.

    Args:
        inputs: tensor `[N, d]`.
        plan: `DispatchPlan`.

    Returns:
        tensor `[E, C, d]`; empty slots are zero.
    """
    num_tokens = inputs.shape[0]
    if num_tokens is None or num_tokens == 0:
        # The number of positions is not known when traced, and may be 0:
        # gather from `inputs` with a zero row appended (row N, where the
        # empty slots point).
        padded = ops.concatenate(
            [inputs, ops.zeros((1, inputs.shape[1]), inputs.dtype)], axis=0
        )
        return ops.take(padded, plan.slot_positions, axis=0)
    # A static, non-zero number of positions (always under JAX, XLA and
    # DTensor): gather a clipped row for empty slots and zero it. Not the
    # zero row of above: the gradient of that concatenate slices
    # IndexedSlices with data-dependent shapes, which DTensor
    # mis-partitions.
    filled = ops.less(plan.slot_positions, num_tokens)[..., None]
    rows = ops.take(
        inputs, ops.minimum(plan.slot_positions, num_tokens - 1), axis=0
    )
    return ops.where(filled, rows, ops.zeros((), inputs.dtype))


def combine(expert_outputs, expert_weights, plan):
    """Sums each position's expert outputs, weighted by its gate values.

    Args:
        expert_outputs: tensor `[E, C, d_out]`.
        expert_weights: tensor `[N, k]`, gate values (zero where masked).
        plan: `DispatchPlan`.

    Returns:
        tensor `[N, d_out]`. A position whose assignments were all dropped
        (or that is masked) gets zeros.
    """
    output_dim = expert_outputs.shape[-1]
    flat_outputs = ops.reshape(expert_outputs, (-1, output_dim))
    num_slots = ops.shape(flat_outputs)[0]
    kept = ops.less(plan.assignment_slots, num_slots)
    weights = ops.where(
        kept, ops.cast(expert_weights, expert_outputs.dtype), 0.0
    )
    slots = ops.minimum(plan.assignment_slots, num_slots - 1)
    gathered = ops.take(flat_outputs, slots, axis=0)  # [N, k, d_out]
    # Not einsum: "nk,nko->no" becomes N tiny matmuls.
    return ops.sum(gathered * weights[..., None], axis=1)


def expert_feedforward(
    dispatched, hidden_kernel, hidden_bias, output_kernel, output_bias,
    activation,
):
    """Runs every expert's MLP on its own rows, as two batched matmuls.

    Args:
        dispatched: tensor `[E, C, d]`.
        hidden_kernel: `[E, d, h]`; hidden_bias: `[E, h]`.
        output_kernel: `[E, h, d_out]`; output_bias: `[E, d_out]`.
        activation: callable applied to the hidden layer.

    Returns:
        tensor `[E, C, d_out]`.
    """
    # Batched matmuls rather than einsum: TensorFlow's einsum gradient
    # transposes its operands and cost 1.5x the batched matmul's here.
    hidden = ops.matmul(dispatched, hidden_kernel)
    hidden = activation(hidden + hidden_bias[:, None, :])
    outputs = ops.matmul(hidden, output_kernel)
    return outputs + output_bias[:, None, :]


def dense_mixture(
    inputs, expert_weights, expert_indices, hidden_kernel, hidden_bias,
    output_kernel, output_bias, activation,
):
    """Reference: run every expert on every position, then weight.

    `E/k` times the work of the sparse path and `[E, N, h]` memory: for
    tests and benchmarks only.

    Args:
        inputs: `[N, d]`; expert_weights: `[N, k]`; expert_indices: int
        `[N, k]`; kernels and biases as in `expert_feedforward`.

    Returns:
        tensor `[N, d_out]`.
    """
    num_experts = hidden_kernel.shape[0]
    gates = ops.sum(
        ops.one_hot(expert_indices, num_experts, dtype=inputs.dtype)
        * ops.cast(expert_weights, inputs.dtype)[..., None],
        axis=-2,
    )
    hidden = ops.einsum("nd,edh->enh", inputs, hidden_kernel)
    hidden = activation(hidden + hidden_bias[:, None, :])
    outputs = ops.einsum("enh,eho->eno", hidden, output_kernel)
    outputs = outputs + output_bias[:, None, :]
    return ops.einsum("ne,eno->no", gates, outputs)
