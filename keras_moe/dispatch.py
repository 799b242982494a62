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

One capacity pads every expert to the busiest one: `E * max_load` rows
where `N*k` are needed (1.5x to 3x measured with a random gate). The
dropless path with busy experts therefore uses *capacity classes*
(`plan_classes`): the experts, ranked by load, are cut into a few classes
that each pad only to their own busiest expert, at most
`N*k + (E / classes) * max_load` rows in all, for the price of one copy of
the expert weights in load order (`classes_pay_off` says when).

Dispatch and combine are each other's transposes, and their gradients say
so: the gradient of `dispatch` is an unweighted `combine` (each position
sums the rows its assignments took) and that of `combine` a weighted
`dispatch`, gathers both, where autodiff would scatter every row back
(`unsorted_segment_sum`).

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
    sorted_ = _SortedAssignments(expert_indices, num_experts, mask)
    tokens_per_expert = sorted_.loads
    if capacity is None:
        capacity = ops.maximum(ops.max(tokens_per_expert), 1)
    kept = ops.logical_and(
        ops.less(sorted_.rank, capacity),
        ops.less(sorted_.experts, num_experts),
    )
    num_slots = num_experts * capacity
    sorted_slots = ops.where(
        kept, sorted_.experts * capacity + sorted_.rank, num_slots
    )
    slot_positions = sorted_.slot_positions(
        ops.arange(num_experts, dtype="int32"), capacity
    )
    filled = ops.minimum(tokens_per_expert, capacity)
    num_dropped = ops.sum(tokens_per_expert) - ops.sum(filled)
    return DispatchPlan(
        slot_positions, sorted_.unsort(sorted_slots), tokens_per_expert,
        num_dropped, capacity,
    )


class _SortedAssignments:
    """The assignments sorted by expert, and what both plans read of them."""

    def __init__(self, expert_indices, num_experts, mask):
        self.num_tokens = ops.shape(expert_indices)[0]
        self.experts_per_token = expert_indices.shape[1]
        self.num_assignments = self.num_tokens * self.experts_per_token
        self.order, self.experts, counts = sort_assignments(
            expert_indices, num_experts, mask
        )
        self.loads = counts[:num_experts]
        self.starts = ops.cumsum(counts) - counts
        # Rank of each sorted assignment among its expert's.
        self.rank = ops.arange(self.num_assignments, dtype="int32") - ops.take(
            self.starts, self.experts
        )
        # One entry past the end, so that clipped gathers are valid even
        # when there are no assignments at all (no positions).
        self.positions = ops.concatenate(
            [self.order % ops.maximum(self.num_tokens, 1),
             ops.reshape(ops.cast(self.num_tokens, "int32"), (1,))],
            axis=0,
        )

    def unsort(self, sorted_slots):
        """Slot of each sorted assignment -> int32 `[N, k]` by position."""
        # `order` is a permutation, so the scatter is exact.
        slots = ops.scatter(
            self.order[:, None], sorted_slots, (self.num_assignments,)
        )
        return ops.transpose(
            ops.reshape(slots, (self.experts_per_token, self.num_tokens))
        )

    def slot_positions(self, experts, capacity):
        """int32 `[len(experts), capacity]`: slot `c` of `experts[i]` holds
        that expert's `c`-th assignment's position, or `N` if none."""
        slot_rank = ops.arange(capacity, dtype="int32")
        filled = ops.minimum(ops.take(self.loads, experts), capacity)
        sources = ops.take(self.starts, experts)[:, None] + slot_rank[None, :]
        return ops.where(
            slot_rank[None, :] < filled[:, None],
            ops.take(
                self.positions, ops.minimum(sources, self.num_assignments)
            ),
            self.num_tokens,
        )


ClassPlan = collections.namedtuple(
    "ClassPlan",
    [
        "expert_order",
        "class_sizes",
        "slot_positions",
        "assignment_slots",
        "tokens_per_expert",
        "num_rows",
    ],
)
ClassPlan.__doc__ = """Where every assignment goes, by capacity class.

Attributes:
    expert_order: int32 `[E]`, the experts from the busiest to the least
        busy; class `g` holds `class_sizes[g]` consecutive experts of it.
    class_sizes: tuple of Python ints, the experts in each class.
    slot_positions: tuple of int32 `[class_sizes[g], C_g]`, the position
        held by each slot of class `g` (`N` for an empty slot), where
        `C_g` is the load of the class's busiest expert.
    assignment_slots: int32 `[N, k]`: the row each assignment took in the
        classes' buffers laid end to end, or `num_rows` when masked.
    tokens_per_expert: int32 `[E]`.
    num_rows: int32 scalar, `sum_g class_sizes[g] * C_g`: at most
        `N*k + class_sizes[0] * max_load` (every class is bounded by the
        loads of the class before it).
"""


def class_sizes(num_experts, num_classes):
    """Splits `E` experts into at most `num_classes` near-equal classes."""
    size = -(-num_experts // max(1, min(num_classes, num_experts)))
    return tuple(
        min(size, num_experts - first) for first in range(0, num_experts, size)
    )


# Capacity classes (`plan_classes`) pay for their copy of the expert weights
# only when the experts are busy: measured here (d=256, h=1024, k=2, train
# step, 8 classes against one capacity), 0.83x the time at E=16 and
# 0.89x at E=64 with N=4096, 0.69x at E=256 with N=16384 (128 rows per
# expert), but 1.1x to 1.5x with 32 or fewer rows per expert (E=256 and
# 1,024 at N=4096), 1.2x on small batches (E=16, N=1024), and nothing
# gained with classes of one expert (E=4: every expert is about as busy).
NUM_CLASSES = 8
CLASSES_MIN_ROWS_PER_EXPERT = 128
CLASSES_MIN_ROWS = 32768


def classes_pay_off(num_tokens, experts_per_token, num_experts):
    """Whether a dropless batch of `num_tokens` (None: unknown when traced)
    should use capacity classes rather than one capacity."""
    if num_tokens is None or num_experts < 2 * NUM_CLASSES:
        return False
    rows = num_tokens * experts_per_token
    return (
        rows >= CLASSES_MIN_ROWS
        and rows >= CLASSES_MIN_ROWS_PER_EXPERT * num_experts
    )


def plan_classes(expert_indices, num_experts, num_classes, mask=None):
    """A dropless plan with a few capacities instead of one.

    The experts are ranked by load and cut into `num_classes` classes of
    consecutive ranks; each class's capacity is the load of its busiest
    expert, so an expert pads only to the busiest of its class, not of
    the whole layer. The rows computed are at most
    `N*k + (E / num_classes) * max_load`, against `E * max_load` for one
    capacity. The price: the classes need the expert weights in load
    order (`permute_experts`), one copy of them per step.

    Args:
        expert_indices: int tensor `[N, k]`.
        num_experts: int `E`.
        num_classes: int >= 1.
        mask: optional bool tensor `[N]`; masked positions take no row.

    Returns:
        `ClassPlan`.
    """
    sorted_ = _SortedAssignments(expert_indices, num_experts, mask)
    loads = sorted_.loads
    # Busiest first; ties by expert id (argsort is stable).
    expert_order = ops.cast(ops.argsort(-loads), "int32")
    sizes = class_sizes(num_experts, num_classes)
    firsts = [sum(sizes[:g]) for g in range(len(sizes))]
    ordered_loads = ops.take(loads, expert_order)
    capacities = [ops.maximum(ordered_loads[first], 1) for first in firsts]
    rows = [size * capacity for size, capacity in zip(sizes, capacities)]
    offsets = [ops.zeros((), "int32")]
    for class_rows in rows[:-1]:
        offsets.append(offsets[-1] + class_rows)
    num_rows = offsets[-1] + rows[-1]
    # The first row of each expert, by its rank in load order.
    class_of_rank = ops.convert_to_tensor(
        [g for g, size in enumerate(sizes) for _ in range(size)], "int32"
    )
    rank_in_class = ops.convert_to_tensor(
        [i for size in sizes for i in range(size)], "int32"
    )
    first_rows = ops.take(ops.stack(offsets), class_of_rank) + (
        rank_in_class * ops.take(ops.stack(capacities), class_of_rank)
    )
    first_row_of_expert = ops.scatter(
        expert_order[:, None], first_rows, (num_experts,)
    )
    known = ops.less(sorted_.experts, num_experts)
    sorted_rows = ops.where(
        known,
        ops.take(
            first_row_of_expert,
            ops.minimum(sorted_.experts, num_experts - 1),
        ) + sorted_.rank,
        num_rows,
    )
    slot_positions = tuple(
        sorted_.slot_positions(
            expert_order[first:first + size], capacity
        )
        for first, size, capacity in zip(firsts, sizes, capacities)
    )
    return ClassPlan(
        expert_order, sizes, slot_positions, sorted_.unsort(sorted_rows),
        loads, num_rows,
    )


BlockPlan = collections.namedtuple(
    "BlockPlan",
    ["block_experts", "slot_positions", "assignment_slots", "block_size"],
)
BlockPlan.__doc__ = """Where every assignment goes, in blocks of one expert.

Attributes:
    block_experts: int32 `[num_blocks]`, the expert of each block (blocks
        past the used rows hold no position).
    slot_positions: int32 `[num_blocks, B]`, the position of each row
        (`N` for padding).
    assignment_slots: int32 `[N, k]`, the row of each assignment, or
        `num_blocks * B` when masked.
    block_size: int `B`.
"""


def block_count(num_assignments, num_experts, block_size):
    """Blocks needed for any routing: `ceil((N*k + E*(B-1)) / B)`."""
    return -(-(num_assignments + num_experts * (block_size - 1)) // block_size)


def plan_blocks(expert_indices, num_experts, block_size, mask=None):
    """A dropless plan with static shapes: each expert's rows padded to a
    multiple of `block_size`, every block of rows one expert's.

    At most `N*k + E*(B-1)` rows, whatever the routing, so the shapes
    depend on `N`, `k`, `E` and `B` only (jit-compilable). The price: the
    experts run per block, with their weights gathered per block.

    Args:
        expert_indices: int tensor `[N, k]` (N static).
        num_experts: int `E`.
        block_size: int `B >= 1`.
        mask: optional bool tensor `[N]`.

    Returns:
        `BlockPlan`.
    """
    sorted_ = _SortedAssignments(expert_indices, num_experts, mask)
    num_blocks = block_count(
        sorted_.num_assignments, num_experts, block_size
    )
    num_rows = num_blocks * block_size
    padded = -(-sorted_.loads // block_size) * block_size
    ends = ops.cumsum(padded)
    first_rows = ends - padded
    known = ops.less(sorted_.experts, num_experts)
    sorted_rows = ops.where(
        known,
        ops.take(first_rows, ops.minimum(sorted_.experts, num_experts - 1))
        + sorted_.rank,
        num_rows,
    )
    # Row -> position: scatter the sorted positions (one spare row takes
    # the masked ones).
    slot_positions = ops.scatter_update(
        ops.full((num_rows + 1,), sorted_.num_tokens, "int32"),
        sorted_rows[:, None],
        sorted_.positions[:-1],
    )[:num_rows]
    block_starts = ops.arange(num_blocks, dtype="int32") * block_size
    block_experts = ops.minimum(
        ops.sum(
            ops.cast(ends[None, :] <= block_starts[:, None], "int32"), axis=1
        ),
        num_experts - 1,
    )
    return BlockPlan(
        block_experts,
        ops.reshape(slot_positions, (num_blocks, block_size)),
        sorted_.unsort(sorted_rows),
        block_size,
    )


def block_mixture(inputs, expert_weights, plan, weights, experts):
    """Dispatch, experts and combine over the blocks of a `BlockPlan`."""
    block_weights = tuple(
        ops.take(weight, plan.block_experts, axis=0) for weight in weights
    )
    outputs = experts(dispatch(inputs, plan), block_weights)
    return combine(
        ops.reshape(outputs, (-1, outputs.shape[-1])), expert_weights, plan
    )


def dropless_mixture(inputs, expert_weights, expert_indices, weights,
                     experts, mask=None):
    """Every chosen expert on its positions, nothing dropped: `[N, d_out]`.

    Capacity classes where they pay off (`classes_pay_off`), else one
    capacity, the busiest expert's load (data-dependent shapes: not for
    XLA or JAX).

    Args:
        inputs: `[N, d]`; expert_weights: `[N, k]` (zero where masked);
        expert_indices: int `[N, k]`; weights: the stacked expert weights;
        experts: callable `(buffer [E, C, d], weights) -> [E, C, d_out]`;
        mask: optional bool `[N]`.
    """
    num_experts = weights[0].shape[0]
    if classes_pay_off(inputs.shape[0], expert_indices.shape[1], num_experts):
        plan = plan_classes(
            expert_indices, num_experts, NUM_CLASSES, mask=mask
        )
        return class_mixture(inputs, expert_weights, plan, weights, experts)
    plan = plan_dispatch(expert_indices, num_experts, mask=mask)
    return combine(
        experts(dispatch(inputs, plan), weights), expert_weights, plan
    )


def permute_experts(weights, order):
    """`weights[order]` along the expert axis, for a permutation `order`.

    Its gradient is the upstream gradient gathered back by the inverse
    permutation: one dense copy, where the gradient of a plain gather
    would be `IndexedSlices` scattered into zeros.
    """
    inverse = ops.scatter(
        order[:, None], ops.arange(order.shape[0], dtype="int32"),
        (order.shape[0],),
    )

    @ops.custom_gradient
    def permute(values):
        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            return ops.take(upstream, inverse, axis=0)

        return ops.take(values, order, axis=0), grad

    # A tensor, not the variable (TensorFlow's custom gradients refuse
    # functions that read variables): the reshape reads it without a copy.
    return permute(ops.reshape(weights, tuple(weights.shape)))


def class_mixture(inputs, expert_weights, plan, weights, experts):
    """Dispatch, experts and combine over the classes of a `ClassPlan`.

    Args:
        inputs: `[N, d]`; expert_weights: `[N, k]` (zero where masked);
        plan: `ClassPlan`.
        weights: tuple of stacked expert weights, expert axis first.
        experts: callable `(buffer [e, C, d], weights) -> [e, C, d_out]`
            (`mlp_experts`, `gated_experts`).

    Returns:
        tensor `[N, d_out]`.
    """
    boundaries = [sum(plan.class_sizes[:g + 1])
                  for g in range(len(plan.class_sizes) - 1)]

    def by_class(weight):
        permuted = permute_experts(weight, plan.expert_order)
        if not boundaries:
            return [permuted]
        return ops.split(permuted, boundaries, axis=0)

    class_weights = zip(*[by_class(weight) for weight in weights])
    # One gather for every class (its gradient is `combine`'s gather), then
    # each class's rows.
    rows = dispatch(inputs, plan)
    row_counts = [ops.shape(slots)[0] * ops.shape(slots)[1]
                  for slots in plan.slot_positions]
    outputs = []
    first = 0
    for slots, count, own_weights in zip(
        plan.slot_positions, row_counts, class_weights
    ):
        buffer = ops.reshape(
            rows[first:first + count], ops.shape(slots) + (rows.shape[-1],)
        )
        first = first + count
        class_outputs = experts(buffer, own_weights)
        outputs.append(
            ops.reshape(class_outputs, (-1, class_outputs.shape[-1]))
        )
    return combine(ops.concatenate(outputs, axis=0), expert_weights, plan)


def expert_choice_combine(expert_outputs, gate_values, slot_positions,
                          num_tokens):
    """Sums the outputs of expert choice back into positions.

    Args:
        expert_outputs: `[E, C, d_out]`, expert `e`'s output for its `c`-th
            chosen position.
        gate_values: `[E, C]`; slot_positions: int32 `[E, C]` (`N` for an
            empty slot, whose gate value is 0).
        num_tokens: int `N`.

    Returns:
        `[N, d_out]`: `sum_e g[e, c] * out[e, c]` over the slots holding
        each position (zeros for a position no expert took).
    """
    output_dim = expert_outputs.shape[-1]
    weighted = expert_outputs * ops.cast(
        gate_values, expert_outputs.dtype
    )[..., None]
    sums = ops.segment_sum(
        ops.reshape(weighted, (-1, output_dim)),
        ops.reshape(slot_positions, (-1,)),
        num_segments=num_tokens + 1,
    )
    return sums[:num_tokens]


def flat_slot_positions(plan):
    """The position of every row of a plan's buffer, in the order of its
    `assignment_slots` (`N` for an empty row): int32 `[rows]`."""
    slot_positions = plan.slot_positions
    if isinstance(slot_positions, tuple):
        return ops.concatenate(
            [ops.reshape(slots, (-1,)) for slots in slot_positions], axis=0
        )
    return ops.reshape(slot_positions, (-1,))


def dispatch(inputs, plan, gather_gradient=True):
    """Gathers each expert's positions into its rows of the buffer.

    Its gradient is a gather too: each position sums the gradients of the
    (at most k) rows its assignments took, read through
    `plan.assignment_slots` (the autodiff gradient of a gather scatters
    every row back, `unsorted_segment_sum`, 2x to 3x slower here).

    Args:
        inputs: tensor `[N, d]`.
        plan: `DispatchPlan` (returns `[E, C, d]`), `BlockPlan` (`[blocks,
            B, d]`) or `ClassPlan` (`[rows, d]`, the classes end to end).
        gather_gradient: bool. False leaves the gradient to autodiff, for
            a buffer that is relaid out across devices before the experts
            (DTensor: the gradient's gather would index the rows of one
            device's shard with the whole buffer's slots).

    Returns:
        the buffer; empty slots are zero.
    """
    slot_positions = plan.slot_positions
    if isinstance(slot_positions, tuple):
        slot_positions = flat_slot_positions(plan)
    if not gather_gradient or inputs.shape[0] == 0:
        return gather_rows(inputs, slot_positions)

    @ops.custom_gradient
    def gather(values):
        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            flat = ops.reshape(upstream, (-1, upstream.shape[-1]))
            return _sum_rows(flat, plan.assignment_slots)[0]

        return gather_rows(values, slot_positions), grad

    return gather(inputs)


def _sum_rows(flat_rows, assignment_slots, weights=None):
    """`sum_j weights[n, j] * flat_rows[assignment_slots[n, j]]`.

    Slots past the last row (dropped or masked assignments) add nothing;
    `weights=None` weighs every kept row 1.

    Returns:
        `(sums [N, d], gathered rows [N, k, d], the weights used [N, k])`.
    """
    num_rows = ops.shape(flat_rows)[0]
    kept = ops.less(assignment_slots, num_rows)
    gathered = ops.take(
        flat_rows, ops.minimum(assignment_slots, num_rows - 1), axis=0
    )  # [N, k, d]
    if weights is None:
        weights = ops.cast(kept, flat_rows.dtype)
    else:
        weights = ops.where(kept, ops.cast(weights, flat_rows.dtype), 0.0)
    # Not einsum: "nk,nko->no" becomes N tiny matmuls.
    return ops.sum(gathered * weights[..., None], axis=1), gathered, weights


def gather_rows(inputs, slot_positions):
    """`inputs[slot_positions]`, with zeros where a slot holds `N` (empty).

    Args:
        inputs: tensor `[N, d]`.
        slot_positions: int32 tensor `[..., C]` of positions in `[0, N]`.

    Returns:
        tensor `[..., C, d]`.
    """
    num_tokens = inputs.shape[0]
    if num_tokens is None or num_tokens == 0:
        # The number of positions is not known when traced, and may be 0:
        # gather from `inputs` with a zero row appended (row N, where the
        # empty slots point).
        padded = ops.concatenate(
            [inputs, ops.zeros((1, inputs.shape[1]), inputs.dtype)], axis=0
        )
        return ops.take(padded, slot_positions, axis=0)
    # A static, non-zero number of positions (always under JAX, XLA and
    # DTensor): gather a clipped row for empty slots and zero it. Not the
    # zero row of above: the gradient of that concatenate slices
    # IndexedSlices with data-dependent shapes, which DTensor
    # mis-partitions.
    filled = ops.less(slot_positions, num_tokens)[..., None]
    rows = ops.take(inputs, ops.minimum(slot_positions, num_tokens - 1), axis=0)
    return ops.where(filled, rows, ops.zeros((), inputs.dtype))


def combine(expert_outputs, expert_weights, plan, gather_gradient=True):
    """Sums each position's expert outputs, weighted by its gate values.

    Its gradient with respect to the outputs is a gather (`dispatch`'s
    rows of the upstream gradient, scaled by each row's gate value), not
    the scatter autodiff gives a gather.

    Args:
        expert_outputs: tensor `[E, C, d_out]` (`DispatchPlan`), `[blocks,
            B, d_out]` or `[rows, d_out]`.
        expert_weights: tensor `[N, k]`, gate values (zero where masked).
        plan: `DispatchPlan`, `BlockPlan` or `ClassPlan` (its
            `assignment_slots` index the flattened outputs).
        gather_gradient: bool, as in `dispatch`.

    Returns:
        tensor `[N, d_out]`. A position whose assignments were all dropped
        (or that is masked) gets zeros.
    """
    output_shape = ops.shape(expert_outputs)
    output_dim = expert_outputs.shape[-1]
    if not gather_gradient:
        return _sum_rows(
            ops.reshape(expert_outputs, (-1, output_dim)),
            plan.assignment_slots, expert_weights,
        )[0]
    slot_positions = flat_slot_positions(plan)

    @ops.custom_gradient
    def weighted_sum(outputs, gate_values):
        flat = ops.reshape(outputs, (-1, output_dim))
        summed, gathered, kept_values = _sum_rows(
            flat, plan.assignment_slots, gate_values
        )

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            num_rows = ops.shape(flat)[0]
            # The gate value of the assignment in each row (0 if none).
            row_values = ops.scatter(
                ops.reshape(
                    ops.minimum(plan.assignment_slots, num_rows), (-1, 1)
                ),
                ops.reshape(kept_values, (-1,)),
                (num_rows + 1,),
            )[:num_rows]
            output_grad = gather_rows(upstream, slot_positions) * (
                row_values[:, None]
            )
            value_grad = ops.where(
                ops.less(plan.assignment_slots, num_rows),
                ops.sum(gathered * upstream[:, None, :], axis=-1),
                0.0,
            )
            return (
                ops.reshape(output_grad, output_shape),
                ops.cast(value_grad, gate_values.dtype),
            )

        return summed, grad

    return weighted_sum(expert_outputs, expert_weights)


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


def mlp_experts(buffer, weights, activation):
    """The paper's experts on a buffer: `act(x W1 + b1) W2 + b2`.

    Args:
        buffer: `[E, C, d]`.
        weights: `(hidden_kernel [E, d, h], hidden_bias [E, h],
            output_kernel [E, h, d_out], output_bias [E, d_out])`.
        activation: callable.

    Returns:
        `[E, C, d_out]`.
    """
    return expert_feedforward(buffer, *weights, activation)


def gated_experts(buffer, weights, activation):
    """Gated experts (SwiGLU with `silu`): `(act(x Wg) * (x Wu)) Wd`.

    Args:
        buffer: `[E, C, d]`.
        weights: `(gate_kernel [E, d, h], up_kernel [E, d, h],
            down_kernel [E, h, d_out])`; no biases.
        activation: callable applied to the gate branch.

    Returns:
        `[E, C, d_out]`.
    """
    gate_kernel, up_kernel, down_kernel = weights
    hidden = activation(ops.matmul(buffer, gate_kernel)) * ops.matmul(
        buffer, up_kernel
    )
    return ops.matmul(hidden, down_kernel)


# The expert kinds: their stacked weights (name, rank; expert axis first,
# "h" the hidden size) and the function that runs them on a buffer.
EXPERT_KINDS = {
    "mlp": (
        (("hidden_kernel", ("d", "h")), ("hidden_bias", ("h",)),
         ("output_kernel", ("h", "o")), ("output_bias", ("o",))),
        mlp_experts,
    ),
    "gated": (
        (("gate_kernel", ("d", "h")), ("up_kernel", ("d", "h")),
         ("down_kernel", ("h", "o"))),
        gated_experts,
    ),
}


def dense_mixture(
    inputs, expert_weights, expert_indices, hidden_kernel, hidden_bias,
    output_kernel, output_bias, activation,
):
    """Reference: run every (MLP) expert on every position, then weight.

    `E/k` times the work of the sparse path and `[E, N, h]` memory: for
    tests and benchmarks only.

    Args:
        inputs: `[N, d]`; expert_weights: `[N, k]`; expert_indices: int
        `[N, k]`; kernels and biases as in `expert_feedforward`.

    Returns:
        tensor `[N, d_out]`.
    """
    return dense_experts_mixture(
        inputs, expert_weights, expert_indices,
        (hidden_kernel, hidden_bias, output_kernel, output_bias),
        lambda buffer, weights: mlp_experts(buffer, weights, activation),
    )


def dense_experts_mixture(inputs, expert_weights, expert_indices, weights,
                          experts):
    """`dense_mixture` for any expert kind: `experts(buffer, weights)` runs
    on every position (`buffer [E, N, d]`)."""
    num_experts = weights[0].shape[0]
    gates = ops.sum(
        ops.one_hot(expert_indices, num_experts, dtype=inputs.dtype)
        * ops.cast(expert_weights, inputs.dtype)[..., None],
        axis=-2,
    )
    buffer = ops.broadcast_to(
        inputs[None], (num_experts,) + tuple(ops.shape(inputs))
    )
    outputs = experts(buffer, weights)
    return ops.einsum("ne,eno->no", gates, outputs)
