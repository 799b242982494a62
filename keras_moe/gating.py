"""Noisy top-k gating (Shazeer et al. 2017, Section 2.1 and Appendix A).

The maths lives in small functions over `keras.ops`, so that tests can call
them directly and they run on every Keras backend. The gating layers compose
them, own the gate weights and add the balancing losses.

Shapes use `n` for the number of experts, `k` for how many of them each
position takes, `N` for positions and `...` for any leading (position)
axes. The functions take the noise as an argument (standard-normal
samples), so a test can give them the draws it checks against.
"""

import collections
import math

import keras
from keras import ops

from keras_moe import compat
from keras_moe import replicas
from keras_moe import statistics
from keras_moe import validation

# Added to Mean(x)^2 in cv_squared, as in the authors' code.
CV_EPSILON = 1e-10

Routing = collections.namedtuple(
    "Routing",
    ["expert_weights", "expert_indices", "importance", "load",
     "tokens_per_expert", "num_positions", "z_loss"],
    defaults=(None,),
)
Routing.__doc__ = """What a gate decided for a batch.

Attributes:
    expert_weights: float32 tensor `[..., k]`, the gate values of the chosen
        experts; they sum to 1 over `k` (to 0 at masked positions).
    expert_indices: int32 tensor `[..., k]`, the ids of the chosen experts,
        distinct within a position.
    importance: float32 tensor `[n]`, `Importance(X) = sum_x G(x)` over the
        unmasked positions of the (global) batch.
    load: float32 tensor `[n]`, `Load(X)`: the smooth estimator
        `sum_x P(x, i)` when training with noise, else the number of
        positions routed to each expert.
    tokens_per_expert: float32 tensor `[n]`, unmasked positions routed to
        each expert (global batch).
    num_positions: float32 scalar, unmasked positions (global batch).
    z_loss: float32 scalar or None: the router z-loss of a softmax router,
        `mean(logsumexp(logits)^2)` over the unmasked positions.
"""


def cv_squared(x, epsilon=CV_EPSILON):
    """Squared coefficient of variation over the last axis.

    `CV(x)^2 = Var(x) / (Mean(x)^2 + epsilon)`, population variance. A
    vector with one element has CV^2 = 0.

    Args:
        x: float tensor `[..., n]`.
        epsilon: float. Keeps an all-zero vector finite.

    Returns:
        float tensor `[...]`.
    """
    x = ops.cast(x, "float32")
    mean = ops.mean(x, axis=-1)
    variance = ops.mean(ops.square(x - mean[..., None]), axis=-1)
    return variance / (ops.square(mean) + epsilon)


def normal_cdf(x):
    """Standard normal CDF `Phi(x) = (1 + erf(x / sqrt 2)) / 2`."""
    return 0.5 * (1.0 + ops.erf(x / math.sqrt(2.0)))


def prob_in_top_k(clean_logits, noisy_logits, noise_stddev, k,
                  top_values=None):
    """Probability that each expert is in the top k under fresh noise.

    Appendix A: `P(x, i) = Phi((clean_i - kth_excluding(H, k, i)) /
    stddev_i)`. The k-th largest of `H` leaving out component `i` is the
    (k+1)-th largest of `H` when `i` is itself in the top k, else the k-th
    largest.

    Args:
        clean_logits: float tensor `[..., n]`, `x . W_g`.
        noisy_logits: float tensor `[..., n]`, `H = clean + noise * stddev`.
        noise_stddev: float tensor `[..., n]`, positive.
        k: int, 1 <= k <= n.
        top_values: optional `[..., k+1]`, the k+1 largest noisy logits in
            descending order, when the caller has them already.

    Returns:
        float32 tensor `[..., n]` of probabilities. All ones when `k == n`
        (every expert is always chosen).
    """
    clean_logits = ops.cast(clean_logits, "float32")
    noisy_logits = ops.cast(noisy_logits, "float32")
    noise_stddev = ops.cast(noise_stddev, "float32")
    num_experts = noisy_logits.shape[-1]
    if num_experts is not None and k >= num_experts:
        return ops.ones_like(clean_logits)
    if top_values is None:
        top_values, _ = ops.top_k(noisy_logits, k=k + 1)
    threshold_if_in = top_values[..., k : k + 1]
    threshold_if_out = top_values[..., k - 1 : k]
    # One threshold per component, then one CDF: the gate's costs grow
    # with n, and two CDFs (and their gradients) over `[..., n]` cost
    # twice the passes for the same numbers.
    threshold = ops.where(
        ops.greater(noisy_logits, threshold_if_in),
        threshold_if_in,
        threshold_if_out,
    )
    return normal_cdf((clean_logits - threshold) / noise_stddev)


# Tied logits differ by at most TIE_BREAK * n after the offset: far below
# float32 resolution of any non-zero logit, so only exact ties are decided.
TIE_BREAK = 1e-30


def tie_break_offsets(logits, rotation=None):
    """Offsets `[..., n]` that rotate the preferred expert from row to row.

    `KeepTopK` is not defined for tied logits, and zero-initialised gate
    kernels tie every expert at inference. `top_k` would then send every
    position to experts 0..k-1 (and a dropless buffer would grow to
    `E * N` rows); row `r` instead prefers experts `r, r+1, ...` (mod n),
    which spreads tied positions evenly.

    Args:
        logits: float tensor `[..., n]`.
        rotation: optional int tensor with one entry per row of
            `logits` (flattened to `[-1, n]`): the expert that row prefers
            first. Defaults to the row number.

    Returns:
        float32 tensor `[..., n]`, at most `TIE_BREAK * (n - 1)`.
    """
    num_experts = logits.shape[-1]
    flat_rows = ops.reshape(logits, (-1, num_experts))
    if rotation is None:
        rotation = ops.arange(ops.shape(flat_rows)[0], dtype="int32")
    rows = ops.reshape(ops.cast(rotation, "int32"), (-1, 1))
    experts = ops.arange(num_experts, dtype="int32")[None, :]
    rank = ops.mod(experts - rows, num_experts)
    offsets = ops.cast(num_experts - 1 - rank, "float32") * TIE_BREAK
    return ops.reshape(offsets, ops.shape(logits))


def top_k_gates(logits, k, extra=0, break_ties=True, tie_rotation=None):
    """`Softmax(KeepTopK(logits, k))`, kept sparse.

    Args:
        logits: float tensor `[..., n]`.
        k: int, 1 <= k <= n.
        extra: int. Also return the `k + extra` largest logits (at most
            n), so that `prob_in_top_k` need not sort again.
        break_ties: bool. Spread exactly tied logits round-robin over the
            rows (`tie_break_offsets`). Needless for noisy logits, which do
            not tie; it costs a few passes over `[..., n]`.
        tie_rotation: optional per-row rotation for `tie_break_offsets`.

    Returns:
        `(expert_weights, expert_indices)`: float32 `[..., k]` summing to 1
        over the last axis, and int32 `[..., k]`, largest logit first;
        with `extra`, also the top `k + extra` logits `[..., k + extra]`.
    """
    logits = ops.cast(logits, "float32")
    num_experts = logits.shape[-1]
    width = min(k + extra, num_experts)
    selection = (
        logits + tie_break_offsets(logits, tie_rotation)
        if break_ties else logits
    )
    # The values by `take_along_axis`, not `top_k`'s own: the gradient of
    # `top_k` (2x faster at n = 1,024) fails under DTensor with the
    # positions sharded.
    _, top_indices = ops.top_k(selection, k=width)
    top_values = compat.take_along_last_axis(logits, top_indices)
    top_logits, expert_indices = top_values[..., :k], top_indices[..., :k]
    if width > k and compat.in_tensorflow_xla_context():
        # XLA:CPU (TensorFlow 2.21) sorts whole rows when the indices of a
        # `top_k` are sliced and routed: 600 ms against 15 for a second
        # `top_k` at N=4,096, n=1,024. TensorFlow without XLA and JAX keep
        # the one pass.
        _, expert_indices = ops.top_k(selection, k=k)
        top_logits = compat.take_along_last_axis(logits, expert_indices)
    if k == 1:
        # A softmax over one logit is 1 (and has no gradient).
        expert_weights = ops.ones_like(top_logits)
    else:
        expert_weights = ops.softmax(top_logits, axis=-1)
    expert_indices = ops.cast(expert_indices, "int32")
    if extra:
        return expert_weights, expert_indices, top_values
    return expert_weights, expert_indices


def noise_stddev(noise_logits, noise_epsilon):
    """`softplus(x . W_noise) + noise_epsilon` (Section 2.1)."""
    return ops.softplus(noise_logits) + noise_epsilon


def expert_totals(values, expert_indices, num_experts):
    """Sums `values` into the experts named by `expert_indices`.

    Args:
        values: float tensor `[..., k]` (e.g. gate values or a 0/1 mask).
        expert_indices: int tensor `[..., k]` of ids in `[0, num_experts)`.
        num_experts: int.

    Returns:
        float32 tensor `[num_experts]`.
    """
    return ops.segment_sum(
        ops.reshape(ops.cast(values, "float32"), (-1,)),
        ops.reshape(expert_indices, (-1,)),
        num_segments=num_experts,
    )


def assignments_per_expert(position_mask, expert_indices, num_experts):
    """Unmasked (position, expert) assignments per expert.

    Args:
        position_mask: float `[..., 1]`, 1 for unmasked positions.
        expert_indices: int `[..., k]`.
        num_experts: int.

    Returns:
        float32 tensor `[num_experts]`.
    """
    return expert_totals(
        ops.broadcast_to(position_mask, ops.shape(expert_indices)),
        expert_indices,
        num_experts,
    )


def balancing_loss(importance, load, importance_weight, load_weight):
    """`w_importance * CV(Importance)^2 + w_load * CV(Load)^2` (Section 4).

    Args:
        importance: float tensor `[n]` (or `[..., n]`, CV over the last axis).
        load: float tensor `[n]`.
        importance_weight: float.
        load_weight: float.

    Returns:
        float32 scalar (or `[...]`).
    """
    loss = 0.0
    if importance_weight:
        loss += importance_weight * cv_squared(importance)
    if load_weight:
        loss += load_weight * cv_squared(load)
    return ops.cast(loss, "float32")


def position_mask(mask, leading_shape):
    """Float32 `[..., 1]`: 1 for unmasked positions (all when `mask` is None).

    Args:
        mask: optional bool tensor `[...]`.
        leading_shape: the positions' shape `[...]`.
    """
    if mask is None:
        return ops.ones(tuple(leading_shape) + (1,), "float32")
    return ops.cast(mask, "float32")[..., None]


def noisy_top_k_gating(clean_logits, k, stddev=None, noise=None,
                       positions=None):
    """The flat gate on one batch: gates, Importance and Load.

    Section 2.1 and Appendix A. With `stddev` and `noise`,
    `H = clean + noise * stddev` and Load is the smooth estimator
    `sum_x P(x, i)`; without them `H = clean` (exact ties broken
    round-robin) and Load is the number of positions per expert.

    Args:
        clean_logits: float32 `[N, n]`, `x . W_g`.
        k: int.
        stddev: optional float32 `[N, n]`, the noise standard deviation.
        noise: optional float32 `[N, n]` standard-normal samples.
        positions: float32 `[N, 1]`, 1 for unmasked positions
            (`position_mask`).

    Returns:
        `(expert_weights [N, k], expert_indices [N, k], importance [n],
        load [n], tokens_per_expert [n])`, the last three summed over this
        batch's unmasked positions.
    """
    num_experts = clean_logits.shape[-1]
    if positions is None:
        positions = position_mask(None, ops.shape(clean_logits)[:-1])
    add_noise = stddev is not None
    if add_noise:
        logits = clean_logits + stddev * noise
        expert_weights, expert_indices, top_values = top_k_gates(
            logits, k, extra=1, break_ties=False
        )
    else:
        expert_weights, expert_indices = top_k_gates(clean_logits, k)
    expert_weights = expert_weights * positions
    importance = expert_totals(expert_weights, expert_indices, num_experts)
    tokens_per_expert = assignments_per_expert(
        positions, expert_indices, num_experts
    )
    if add_noise:
        probabilities = prob_in_top_k(
            clean_logits, logits, stddev, k, top_values=top_values
        )
        load = ops.sum(probabilities * positions, axis=0)
    else:
        load = tokens_per_expert
    return (expert_weights, expert_indices, importance, load,
            tokens_per_expert)


def softmax_top_k_gating(logits, k, normalize=True, positions=None,
                         selection_bias=None):
    """A softmax router on one batch (Switch / Mixtral / Qwen style).

    `P(x) = softmax(logits)` over all `n` experts; each position takes its
    `k` most probable experts, with their probabilities as gate values,
    renormalised to sum to 1 over the `k` when `normalize`. Exact ties are
    broken round-robin (`tie_break_offsets`).

    Args:
        logits: float32 `[N, n]`, `x . W`.
        k: int.
        normalize: bool.
        positions: float32 `[N, 1]` (`position_mask`).
        selection_bias: optional float32 `[n]`, added to the logits to
            choose the experts only (loss-free balancing); the gate values
            and the statistics use the unbiased probabilities.

    Returns:
        `(expert_weights [N, k], expert_indices [N, k],
        probability_sums [n], tokens_per_expert [n], z_sum)`: the sums of
        `P(x)` and the numbers of positions that chose each expert, and
        the sum of `logsumexp(logits)^2`, over the unmasked positions.
    """
    num_experts = logits.shape[-1]
    if positions is None:
        positions = position_mask(None, ops.shape(logits)[:-1])
    logits = ops.cast(logits, "float32")
    probabilities = ops.softmax(logits, axis=-1)
    # Selected on the logits (softmax keeps their order): an offset below
    # float32 resolution breaks only exact ties there.
    scores = logits + tie_break_offsets(logits)
    if selection_bias is not None:
        scores = scores + selection_bias
    _, expert_indices = ops.top_k(scores, k=k)
    expert_indices = ops.cast(expert_indices, "int32")
    expert_weights = compat.take_along_last_axis(probabilities, expert_indices)
    if normalize:
        expert_weights = expert_weights / ops.sum(
            expert_weights, axis=-1, keepdims=True
        )
    expert_weights = expert_weights * positions
    probability_sums = ops.sum(probabilities * positions, axis=0)
    tokens_per_expert = assignments_per_expert(
        positions, expert_indices, num_experts
    )
    z_sum = ops.sum(
        ops.square(ops.logsumexp(logits, axis=-1)) * positions[:, 0]
    )
    return (expert_weights, expert_indices, probability_sums,
            tokens_per_expert, z_sum)


def load_balancing_loss(tokens_per_expert, probability_sums, num_positions):
    """`E * sum_i (c_i / N) * P_i`, the softmax router's balancing loss.

    `c_i` positions chose expert `i` among their k, `P_i` is the mean
    router probability of expert `i`, over `N` positions. It equals `k` at
    perfect balance (as keras-hub's and the common Mixtral loss do) and
    grows as the routing concentrates.

    Args:
        tokens_per_expert: float32 `[n]`, `c`.
        probability_sums: float32 `[n]`, `N * P`.
        num_positions: float32 scalar `N` (0 gives 0).

    Returns:
        float32 scalar.
    """
    num_experts = tokens_per_expert.shape[-1]
    positions = ops.maximum(num_positions, 1.0)
    return num_experts * ops.sum(
        tokens_per_expert * probability_sums
    ) / ops.square(positions)


def hierarchical_top_k_gating(clean_primary, clean_groups, k,
                              stddev_primary=None, stddev_groups=None,
                              noise_primary=None, noise_inner=None,
                              positions=None):
    """The two-level gate on one batch (Appendix B), before global sums.

    Level 1 picks `k` of the `a` groups from `H_primary`; level 2 picks
    `k` of the `b` experts of each chosen group from that group's logits.
    Expert `j` of group `i` has the flat id `i * b + j` and the gate value
    `G_primary(x)_i * G_i(x)_j`. Without noise, exact ties are broken
    round-robin at both levels, rotating the inner level by `position //
    a` so that the positions sent to one group spread over its experts.

    Args:
        clean_primary: float32 `[N, a]`; clean_groups: float32 `[N, a, b]`.
        k: int.
        stddev_primary, stddev_groups: optional noise standard deviations,
            shaped like the logits.
        noise_primary: optional `[N, a]`; noise_inner: optional `[N, k, b]`
            standard-normal samples (for the chosen groups' logits).
        positions: float32 `[N, 1]` (`position_mask`).

    Returns:
        `(expert_weights [N, k*k], expert_indices [N, k*k],
        importance [a*b], primary_load [a], group_load [a, b],
        positions_per_group [a], tokens_per_expert [a*b])`: the inputs of
        `hierarchical_load`, which must be summed over the global batch
        first.
    """
    num_groups, group_size = clean_groups.shape[-2], clean_groups.shape[-1]
    num_experts = num_groups * group_size
    if positions is None:
        positions = position_mask(None, ops.shape(clean_primary)[:-1])
    add_noise = stddev_primary is not None
    noisy_primary = (
        clean_primary + stddev_primary * noise_primary
        if add_noise else clean_primary
    )
    group_weights, group_indices = top_k_gates(
        noisy_primary, k, break_ties=not add_noise
    )
    group_weights = group_weights * positions

    # Level 2: the chosen groups' logits, [N, k, b].
    def chosen(per_group):
        return compat.take_per_row(per_group, group_indices)

    clean_chosen = chosen(clean_groups)
    if add_noise:
        stddev_chosen = chosen(stddev_groups)
        noisy_chosen = clean_chosen + stddev_chosen * noise_inner
        inner_weights, inner_indices = top_k_gates(
            noisy_chosen, k, break_ties=False
        )
    else:
        noisy_chosen = clean_chosen
        position_ids = ops.arange(ops.shape(clean_primary)[0], dtype="int32")
        rotation = (
            (position_ids // num_groups)[:, None] * k
            + ops.arange(k, dtype="int32")[None, :]
        )
        inner_weights, inner_indices = top_k_gates(
            noisy_chosen, k, tie_rotation=rotation
        )
    expert_weights = ops.reshape(
        group_weights[..., None] * inner_weights, (-1, k * k)
    )
    expert_indices = ops.reshape(
        group_indices[..., None] * group_size + inner_indices, (-1, k * k)
    )
    importance = expert_totals(expert_weights, expert_indices, num_experts)
    pair_mask = ops.broadcast_to(positions, ops.shape(group_indices))
    positions_per_group = expert_totals(pair_mask, group_indices, num_groups)
    tokens_per_expert = assignments_per_expert(
        positions, expert_indices, num_experts
    )
    if add_noise:
        primary_probabilities = prob_in_top_k(
            clean_primary, noisy_primary, stddev_primary, k
        )
        primary_load = ops.sum(primary_probabilities * positions, axis=0)
        inner_probabilities = prob_in_top_k(
            clean_chosen, noisy_chosen, stddev_chosen, k
        ) * pair_mask[..., None]
        group_load = ops.segment_sum(
            ops.reshape(inner_probabilities, (-1, group_size)),
            ops.reshape(group_indices, (-1,)),
            num_segments=num_groups,
        )
    else:
        primary_load = positions_per_group
        group_load = ops.reshape(tokens_per_expert, (num_groups, group_size))
    return (expert_weights, expert_indices, importance, primary_load,
            group_load, positions_per_group, tokens_per_expert)


def hierarchical_load(primary_load, group_load, positions_per_group):
    """`Load_H(X)_ij = Load_primary(X)_i * Load_i(X^(i))_j / |X^(i)|`.

    Appendix B, with `X^(i)` the positions routed to group `i` (a group
    that received none contributes 0).

    Args:
        primary_load: float32 `[a]`; group_load: float32 `[a, b]`;
        positions_per_group: float32 `[a]`, `|X^(i)|`.

    Returns:
        float32 `[a * b]`, flat expert ids.
    """
    load = (
        primary_load[:, None]
        * group_load
        / ops.maximum(positions_per_group, 1.0)[:, None]
    )
    return ops.reshape(load, (-1,))


def gate_arguments_doc(noisy_name="noisy", indent=8):
    """The shared gate arguments' `Args:` entries (one text for every layer
    that takes them)."""
    text = f"""\
{noisy_name}: bool. Add tunable Gaussian noise to the gate logits while
    training. Defaults to True.
noise_epsilon: float > 0. Added to the noise standard deviation.
    Defaults to 1e-2.
importance_weight: float >= 0. `w_importance` of the balancing loss.
    Defaults to 0.1.
load_weight: float >= 0. `w_load` of the balancing loss. Defaults to 0.1.
seed: int >= 0 or None. Seed of the gating noise. Defaults to None."""
    pad = " " * indent
    return "\n".join(pad + line for line in text.splitlines())


class _RouterBase(compat.PerThreadLosses, keras.layers.Layer):
    """What every gate shares: state, statistics, the call, the specs.

    Gates compute in float32 whatever the dtype policy (routing decisions
    and the balancing losses are fragile in float16), so they never
    autocast their variables. Each replica of a mirrored strategy keeps
    its own losses (`compat.PerThreadLosses`): the cross-replica sum in
    `route` hands control to the other replicas mid-call. Subclasses set
    `k` and `seed`, implement `route` and `_balancing_loss`.
    """

    def __init__(self, seed=None, kernel_initializer="zeros", **kwargs):
        kwargs["autocast"] = False
        super().__init__(**kwargs)
        self.seed = validation.random_seed(seed)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.seed_generator = keras.random.SeedGenerator(self.seed)
        self.supports_masking = True

    @property
    def num_routed_experts(self):
        """Number of distinct experts the returned indices range over
        (`num_experts` for a flat router)."""
        return self.num_experts

    @property
    def experts_per_position(self):
        """Number of (expert, weight) pairs returned per position (`k`
        for a flat router)."""
        return self.k

    # Keras saves a layer's weights but not its seed generators' states, so
    # a job restored from a checkpoint (BackupAndRestore, load_weights)
    # would draw the gating noise of its first steps again. The state is
    # saved with the weights under its own key (older checkpoints without
    # it still load).
    _SEED_STATE_KEY = "noise_seed_state"

    def save_own_variables(self, store):
        super().save_own_variables(store)
        store[self._SEED_STATE_KEY] = self.seed_generator.state

    def load_own_variables(self, store):
        keys = list(store.keys())
        if self._SEED_STATE_KEY in keys:
            self.seed_generator.state.assign(store[self._SEED_STATE_KEY])
        super().load_own_variables(
            {key: store[key] for key in keys if key != self._SEED_STATE_KEY}
        )

    def _standard_normal(self, shape):
        return compat.standard_normal(shape, self.seed_generator)

    def _add_kernel(self, name, input_dim, width):
        return self.add_weight(
            name=name,
            shape=(input_dim, width),
            initializer=self.kernel_initializer,
            dtype="float32",
        )

    def _build_statistics(self):
        """Accumulators read by `keras_moe.callbacks.RoutingStatistics`.

        Keras 3 layers cannot add metrics, so the training-time routing of
        the global batch is summed into non-trainable variables.
        """
        experts = self.num_routed_experts
        for name, shape in (
            ("tokens_per_expert_total", (experts,)),
            ("importance_total", (experts,)),
            ("load_total", (experts,)),
            ("positions_total", ()),
        ):
            setattr(self, name, statistics.add_accumulator(self, name, shape))

    def _record_statistics(self, routing):
        self.tokens_per_expert_total.assign_add(routing.tokens_per_expert)
        self.importance_total.assign_add(routing.importance)
        self.load_total.assign_add(routing.load)
        self.positions_total.assign_add(routing.num_positions)

    def _update_state(self, routing):
        """Router state that moves with training (none by default)."""

    def build(self, input_shape):
        """A flat router's weights: `gate_kernel [d, E]`, the router's own
        (`_build_own_weights`), then the statistics."""
        validation.feature_input(self, input_shape)
        input_dim = input_shape[-1]
        self.gate_kernel = self._add_kernel(
            "gate_kernel", input_dim, self.num_experts
        )
        self._build_own_weights(input_dim)
        self._build_statistics()
        self.input_spec = keras.layers.InputSpec(
            min_ndim=2, axes={-1: input_dim}
        )

    def _build_own_weights(self, input_dim):
        """Weights beyond the gate kernel (none by default)."""

    def reset_statistics(self):
        """Zeroes the routing-statistics accumulators."""
        statistics.reset([
            self.tokens_per_expert_total, self.importance_total,
            self.load_total, self.positions_total,
        ])

    def _gate_inputs(self, inputs, mask):
        """Checked float32 features `[N, d]`, the `[N, 1]` position mask and
        the leading shape of `inputs`."""
        validation.feature_input(self, inputs.shape, inputs.dtype)
        validation.mask(self, mask, inputs)
        leading_shape = ops.shape(inputs)[:-1]
        features = ops.reshape(
            ops.cast(inputs, "float32"), (-1, inputs.shape[-1])
        )
        flat_mask = None if mask is None else ops.reshape(mask, (-1,))
        positions = position_mask(
            None if flat_mask is None else ops.cast(flat_mask, "bool"),
            ops.shape(features)[:1],
        )
        return features, positions, leading_shape

    def call(self, inputs, training=None, mask=None):
        if replicas.num_replicas_in_sync() > 1 and compat.in_xla_context():
            raise ValueError(
                f"{self.__class__.__name__} '{self.name}' is being compiled "
                f"with XLA (jit_compile=True) under "
                f"{replicas.strategy_name()}; TensorFlow 2.21 cannot run "
                "XLA-compiled steps under tf.distribute mirrored strategies "
                "(even Embedding -> Dense fails). "
                "Compile the model with jit_compile=False or "
                "jit_compile='auto' (which turns XLA off under strategies)."
            )
        routing = self.route(inputs, training=training, mask=mask)
        if training:
            self._record_statistics(routing)
            self._update_state(routing)
            loss = self._balancing_loss(routing)
            if loss is not None:
                self.add_loss(loss)
        return routing.expert_weights, routing.expert_indices

    def _balancing_loss(self, routing):
        """The loss to add while training (a float32 scalar), or None."""
        raise NotImplementedError

    def compute_output_shape(self, input_shape):
        shape = tuple(input_shape)[:-1] + (self.experts_per_position,)
        return shape, shape

    def compute_output_spec(self, inputs, training=None, mask=None):
        validation.feature_input(self, inputs.shape, inputs.dtype)
        shape = tuple(inputs.shape)[:-1] + (self.experts_per_position,)
        return (
            keras.KerasTensor(shape, dtype="float32"),
            keras.KerasTensor(shape, dtype="int32"),
        )

    def compute_mask(self, inputs, mask=None):
        return None

    def get_config(self):
        return {
            **super().get_config(),
            "seed": self.seed,
            "kernel_initializer": keras.initializers.serialize(
                self.kernel_initializer
            ),
        }


class _GatingBase(_RouterBase):
    """The paper's gates (flat and hierarchical): noisy top-k arguments and
    the `w_importance CV(Importance)^2 + w_load CV(Load)^2` loss."""

    def __init__(
        self,
        k=2,
        noisy=True,
        noise_epsilon=1e-2,
        importance_weight=0.1,
        load_weight=0.1,
        seed=None,
        kernel_initializer="zeros",
        **kwargs,
    ):
        super().__init__(
            seed=seed, kernel_initializer=kernel_initializer, **kwargs
        )
        arguments = validation.gate_arguments(
            k, noisy, noise_epsilon, importance_weight, load_weight, seed
        )
        for name, value in arguments.items():
            setattr(self, name, value)

    def _balancing_loss(self, routing):
        if not (self.importance_weight or self.load_weight):
            return None
        return balancing_loss(
            routing.importance,
            routing.load,
            self.importance_weight,
            self.load_weight,
        )

    def get_config(self):
        return {
            **super().get_config(),
            "k": self.k,
            "noisy": self.noisy,
            "noise_epsilon": self.noise_epsilon,
            "importance_weight": self.importance_weight,
            "load_weight": self.load_weight,
        }


@keras.saving.register_keras_serializable(package="keras_moe")
class NoisyTopKGating(_GatingBase):
    __doc__ = """Noisy top-k gating network (Shazeer et al. 2017, Section 2.1).

    For each position `x` (a row of the last axis):

    - `clean = x . gate_kernel`
    - while training with `noisy=True`:
      `H = clean + StandardNormal() * (softplus(x . noise_kernel) +
      noise_epsilon)`; otherwise `H = clean`
    - `G(x) = Softmax(KeepTopK(H, k))`, returned sparsely as the k gate
      values and the k expert ids.

    While training it adds the balancing loss
    `importance_weight * CV(Importance)^2 + load_weight * CV(Load)^2`
    over all unmasked positions of the batch (summed over data-parallel
    replicas under a `tf.distribute` strategy). `Load` is the smooth
    estimator of Appendix A with noise, and a count of positions per expert
    without it (then it carries no gradient, as in the paper).

    Both kernels start at zero, so routing starts random and balanced.
    Computation is float32 whatever the dtype policy.

    Args:
        num_experts: int >= 1. Number of experts `n` to choose from.
        k: int. Experts chosen per position, `1 <= k <= num_experts`.
            Defaults to 2.
""" + gate_arguments_doc() + """
        kernel_initializer: initializer of both kernels. Defaults to
            `"zeros"` (the paper's choice).
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        inputs: float tensor `[..., d]`, rank >= 2.
        training: bool. Noise and the balancing loss only when True.
        mask: optional bool tensor `[...]`. Masked positions get all-zero
            gate values and do not count in the balancing loss.

    Returns:
        `(expert_weights, expert_indices)`: float32 `[..., k]` and int32
        `[..., k]`.

    Example:

    >>> gating = NoisyTopKGating(num_experts=8, k=2)
    >>> weights, indices = gating(np.ones((4, 16), "float32"))
    >>> tuple(weights.shape), tuple(indices.shape)
    ((4, 2), (4, 2))
    """

    def __init__(self, num_experts, k=2, **kwargs):
        super().__init__(k=k, **kwargs)
        self.num_experts, self.k = validation.experts_and_k(num_experts, k)

    def _build_own_weights(self, input_dim):
        if self.noisy:
            self.noise_kernel = self._add_kernel(
                "noise_kernel", input_dim, self.num_experts
            )

    def route(self, inputs, training=None, mask=None):
        """Routes a batch; returns a `Routing` (no loss is added).

        Args:
            inputs: float tensor `[..., d]`.
            training: bool.
            mask: optional bool tensor `[...]`.

        Returns:
            `Routing` with `[..., k]` weights/indices and `[n]` importance
            and load over the global batch.
        """
        features, positions, leading_shape = self._gate_inputs(inputs, mask)
        if bool(training) and self.noisy:
            # One matmul for both kernels: the gate costs grow with n.
            # split, not slicing: its gradient is a concat, not zero-fills.
            clean_logits, noise_logits = ops.split(
                ops.matmul(
                    features,
                    ops.concatenate(
                        [self.gate_kernel, self.noise_kernel], axis=-1
                    ),
                ),
                2,
                axis=-1,
            )
            stddev = noise_stddev(noise_logits, self.noise_epsilon)
            noise = ops.reshape(
                self._standard_normal(leading_shape + (self.num_experts,)),
                (-1, self.num_experts),
            )
        else:
            clean_logits = ops.matmul(features, self.gate_kernel)
            stddev = noise = None
        (expert_weights, expert_indices, importance, load,
         tokens_per_expert) = noisy_top_k_gating(
            clean_logits, self.k, stddev, noise, positions
        )
        return Routing(
            ops.reshape(expert_weights, leading_shape + (self.k,)),
            ops.reshape(expert_indices, leading_shape + (self.k,)),
            *replicas.global_batch_sums(
                [importance, load, tokens_per_expert, ops.sum(positions)]
            ),
        )

    def get_config(self):
        return {**super().get_config(), "num_experts": self.num_experts}


@keras.saving.register_keras_serializable(package="keras_moe")
class SoftmaxTopKGating(_RouterBase):
    """Softmax top-k router (Switch Transformer, Mixtral, Qwen-MoE).

    For each position `x`: probabilities `P(x) = softmax(x . gate_kernel)`
    over all experts; the `k` most probable experts are chosen, with their
    probabilities as gate values, renormalised over the `k` when
    `normalize`. While training it adds

    - `load_balance_weight * E * sum_i (c_i / N) * P_i`, with `c_i` the
      unmasked positions that chose expert `i` among their `k`, `N` the
      unmasked positions and `P_i` the mean probability of expert `i`
      (`load_balancing_loss`; `k` at perfect balance), and
    - `z_loss_weight * mean(logsumexp(x . gate_kernel)^2)` (the ST-MoE
      router z-loss, which keeps the logits small),

    both over the global batch under a `tf.distribute` strategy. With
    `jitter > 0` the inputs are multiplied by `U(1 - jitter, 1 + jitter)`
    noise while training (Switch); at inference nothing is random, so an
    export holds no random op. Float32 whatever the dtype policy. The
    kernel starts at zero, so the untrained router spreads tied positions
    round-robin.

    Args:
        num_experts: int >= 1. Number of experts `E`.
        k: int, `1 <= k <= num_experts`. Experts per position. Defaults
            to 2.
        normalize: bool. Renormalise the `k` gate values to sum to 1.
            Defaults to True (Mixtral; Switch with `k=1` and Qwen use
            False).
        load_balance_weight: float >= 0. Defaults to 0.01.
        z_loss_weight: float >= 0. Defaults to 0.
        jitter: float in [0, 1). Input jitter while training. Defaults to
            0.
        bias_update_rate: float >= 0. Loss-free balancing (DeepSeek-V3)
            when > 0: a non-trainable per-expert `expert_bias [E]` is added
            to the logits to choose the experts (never to the gate
            values), and after each training batch every bias moves by
            `bias_update_rate * sign(mean_load - load_i)`, with the loads
            of the global batch; it is saved with the weights. Usually
            combined with `load_balance_weight=0`. Defaults to 0 (off).
        seed: int >= 0 or None. Seed of the jitter. Defaults to None.
        kernel_initializer: initializer of `gate_kernel [d, E]`. Defaults
            to `"zeros"`.
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        inputs: float tensor `[..., d]`, rank >= 2.
        training: bool. Jitter, the losses and the bias updates only when
            True.
        mask: optional bool tensor `[...]`. Masked positions get zero gate
            values and count nowhere.

    Returns:
        `(expert_weights, expert_indices)`: float32 `[..., k]` and int32
        `[..., k]`.
    """

    def __init__(self, num_experts, k=2, normalize=True,
                 load_balance_weight=0.01, z_loss_weight=0.0, jitter=0.0,
                 bias_update_rate=0.0, seed=None,
                 kernel_initializer="zeros", **kwargs):
        super().__init__(
            seed=seed, kernel_initializer=kernel_initializer, **kwargs
        )
        self.num_experts, self.k = validation.experts_and_k(num_experts, k)
        self.normalize = validation.boolean("normalize", normalize)
        self.load_balance_weight = validation.number(
            "load_balance_weight", load_balance_weight, minimum=0.0
        )
        self.z_loss_weight = validation.number(
            "z_loss_weight", z_loss_weight, minimum=0.0
        )
        self.jitter = validation.number("jitter", jitter, 0.0, below=1.0)
        self.bias_update_rate = validation.number(
            "bias_update_rate", bias_update_rate, minimum=0.0
        )

    def _build_own_weights(self, input_dim):
        if self.bias_update_rate:
            # Every replica applies the same (global) update; the first
            # replica's is kept, as for the statistics.
            self.expert_bias = self.add_weight(
                name="expert_bias", shape=(self.num_experts,),
                initializer="zeros", dtype="float32", trainable=False,
                aggregation="only_first_replica",
            )

    def route(self, inputs, training=None, mask=None):
        """Routes a batch; returns a `Routing`.

        `importance` holds the summed router probabilities `N * P`,
        `load` and `tokens_per_expert` the positions per expert `c`, and
        `z_loss` the router z-loss, all over the global batch.
        """
        features, positions, leading_shape = self._gate_inputs(inputs, mask)
        if training and self.jitter:
            features = features * keras.random.uniform(
                ops.shape(features), 1.0 - self.jitter, 1.0 + self.jitter,
                seed=self.seed_generator,
            )
        (expert_weights, expert_indices, probability_sums, tokens_per_expert,
         z_sum) = softmax_top_k_gating(
            ops.matmul(features, self.gate_kernel), self.k, self.normalize,
            positions,
            selection_bias=(
                self.expert_bias if self.bias_update_rate else None
            ),
        )
        probability_sums, tokens_per_expert, z_sum, num_positions = (
            replicas.global_batch_sums(
                [probability_sums, tokens_per_expert, z_sum,
                 ops.sum(positions)]
            )
        )
        return Routing(
            ops.reshape(expert_weights, leading_shape + (self.k,)),
            ops.reshape(expert_indices, leading_shape + (self.k,)),
            probability_sums,
            tokens_per_expert,
            tokens_per_expert,
            num_positions,
            z_sum / ops.maximum(num_positions, 1.0),
        )

    def _update_state(self, routing):
        if self.bias_update_rate:
            loads = routing.tokens_per_expert
            self.expert_bias.assign_add(
                self.bias_update_rate * ops.sign(ops.mean(loads) - loads)
            )

    def _balancing_loss(self, routing):
        if not (self.load_balance_weight or self.z_loss_weight):
            return None
        loss = self.load_balance_weight * load_balancing_loss(
            routing.tokens_per_expert, routing.importance,
            routing.num_positions,
        )
        return ops.cast(loss + self.z_loss_weight * routing.z_loss, "float32")

    def get_config(self):
        return {
            **super().get_config(),
            "num_experts": self.num_experts,
            "k": self.k,
            "normalize": self.normalize,
            "load_balance_weight": self.load_balance_weight,
            "z_loss_weight": self.z_loss_weight,
            "jitter": self.jitter,
            "bias_update_rate": self.bias_update_rate,
        }


def expert_choice_gating(logits, capacity, positions=None):
    """Expert choice (Zhou et al. 2022) on one batch: experts pick positions.

    `P(x) = softmax(logits)` over the `n` experts; expert `i` takes the
    `capacity` unmasked positions with the largest `P(x)_i`, with `P(x)_i`
    as gate value. A position may be taken by 0 to `n` experts. Exact ties
    are spread round-robin (expert `i` prefers positions from
    `i * capacity` on), so an untrained router still covers every
    position.

    Args:
        logits: float32 `[N, n]`.
        capacity: int `C`, `1 <= C <= N`.
        positions: float32 `[N, 1]` (`position_mask`).

    Returns:
        `(gate_values [n, C], slot_positions [n, C], importance [n],
        tokens_per_expert [n])`: the positions each expert took (`N` for a
        slot left empty because too few positions are unmasked), their
        gate values (0 there), and per expert the sum of its gate values
        and the number of positions it took.
    """
    num_experts = logits.shape[-1]
    num_tokens = ops.shape(logits)[0]
    if positions is None:
        positions = position_mask(None, ops.shape(logits)[:-1])
    probabilities = ops.softmax(ops.cast(logits, "float32"), axis=-1)
    keep = ops.transpose(positions) > 0  # [1, N]
    scores = ops.where(keep, ops.transpose(probabilities), -1.0)  # [n, N]
    # Exact ties go to the lowest index under `top_k`: expert i sees the
    # positions rotated to start at `i * capacity`, so that tied experts
    # take consecutive blocks round-robin instead of the same positions.
    rotated = ops.mod(
        ops.arange(num_tokens, dtype="int32")[None, :]
        + capacity * ops.arange(num_experts, dtype="int32")[:, None],
        ops.maximum(num_tokens, 1),
    )
    _, picks = ops.top_k(ops.take_along_axis(scores, rotated, axis=-1),
                         k=capacity)
    slot_positions = ops.take_along_axis(
        rotated, ops.cast(picks, "int32"), axis=-1
    )
    gate_values = compat.take_along_last_axis(
        ops.transpose(probabilities), slot_positions
    )
    taken = ops.take_along_axis(
        ops.broadcast_to(keep, ops.shape(scores)), slot_positions, axis=-1
    )
    gate_values = ops.where(taken, gate_values, 0.0)
    slot_positions = ops.where(taken, slot_positions, num_tokens)
    importance = ops.sum(gate_values, axis=-1)
    tokens_per_expert = ops.sum(ops.cast(taken, "float32"), axis=-1)
    return gate_values, slot_positions, importance, tokens_per_expert


@keras.saving.register_keras_serializable(package="keras_moe")
class ExpertChoiceGating(_RouterBase):
    """Expert-choice router (Zhou et al. 2022): each expert picks positions.

    Probabilities `P(x) = softmax(x . gate_kernel)` over the experts; each
    expert takes the `C = ceil(capacity_factor * N * k / E)` positions of
    the batch (at most `N`) with the largest probability for it, with that
    probability as gate value (`expert_choice_gating`). Every expert is
    exactly full, so no balancing loss is needed; a position may get 0 to
    `E` experts (`k` on average).

    **It looks across the batch**: which experts a position gets depends on
    the other positions of the batch, including later time steps. It does
    not suit autoregressive decoding (one position at a time), and a
    position's output changes with the batch it is served in.

    Used through `MixtureOfExperts(..., router="expert_choice")` or as a
    `router` instance; on its own, `call` returns
    `(gate_values [E, C], slot_positions [E, C])`. Float32 whatever the
    dtype policy.

    Args:
        num_experts: int >= 1. Number of experts `E`.
        k: int >= 1. Experts per position on average. Defaults to 2.
        capacity_factor: float > 0. Defaults to 1.0.
        seed: int >= 0 or None. Unused (no noise); kept for the common
            router arguments. Defaults to None.
        kernel_initializer: initializer of `gate_kernel [d, E]`. Defaults
            to `"zeros"` (ties: positions are spread round-robin).
        **kwargs: base `keras.layers.Layer` arguments.
    """

    def __init__(self, num_experts, k=2, capacity_factor=1.0, seed=None,
                 kernel_initializer="zeros", **kwargs):
        super().__init__(
            seed=seed, kernel_initializer=kernel_initializer, **kwargs
        )
        self.num_experts = validation.integer("num_experts", num_experts)
        self.k = validation.integer("k", k)
        self.capacity_factor = validation.number(
            "capacity_factor", capacity_factor, minimum=0.0, exclusive=True
        )

    def capacity(self, num_tokens):
        """`C` for `num_tokens` positions (a Python int: expert choice
        needs the number of positions when traced)."""
        if isinstance(num_tokens, int):
            return max(1, min(num_tokens, math.ceil(
                self.capacity_factor * num_tokens * self.k / self.num_experts
            )))
        raise ValueError(
            "Expert choice needs the number of positions when traced "
            "(a static batch and sequence length)."
        )

    def route(self, inputs, training=None, mask=None):
        """Routes a batch; returns a `Routing` whose `expert_weights` and
        `expert_indices` are the `[E, C]` gate values and positions."""
        features, positions, _ = self._gate_inputs(inputs, mask)
        capacity = self.capacity(features.shape[0])
        gate_values, slot_positions, importance, tokens_per_expert = (
            expert_choice_gating(
                ops.matmul(features, self.gate_kernel), capacity, positions
            )
        )
        importance, tokens_per_expert, num_positions = (
            replicas.global_batch_sums(
                [importance, tokens_per_expert, ops.sum(positions)]
            )
        )
        return Routing(
            gate_values, slot_positions, importance, tokens_per_expert,
            tokens_per_expert, num_positions,
        )

    def _balancing_loss(self, routing):
        return None

    def compute_output_shape(self, input_shape):
        num_tokens = 1
        for size in tuple(input_shape)[:-1]:
            num_tokens = None if size is None or num_tokens is None else (
                num_tokens * size
            )
        capacity = None if num_tokens is None else self.capacity(num_tokens)
        shape = (self.num_experts, capacity)
        return shape, shape

    def compute_output_spec(self, inputs, training=None, mask=None):
        validation.feature_input(self, inputs.shape, inputs.dtype)
        shape, _ = self.compute_output_shape(inputs.shape)
        return (
            keras.KerasTensor(shape, dtype="float32"),
            keras.KerasTensor(shape, dtype="int32"),
        )

    def get_config(self):
        return {
            **super().get_config(),
            "num_experts": self.num_experts,
            "k": self.k,
            "capacity_factor": self.capacity_factor,
        }


@keras.saving.register_keras_serializable(package="keras_moe")
class HierarchicalNoisyTopKGating(_GatingBase):
    __doc__ = """Two-level noisy top-k gating (Shazeer et al. 2017, Appendix B).

    A primary gate picks `k` of `num_groups` groups; each group `i` has its
    own noisy top-k gate over its `experts_per_group` experts and picks `k`
    of them. Expert `j` of group `i` has the flat id
    `i * experts_per_group + j` and the gate value
    `G_primary(x)_i * G_i(x)_j`, so each position gets `k * k` experts.

    The balancing loss uses the hierarchical Importance and Load over all
    `num_groups * experts_per_group` experts:

    - `Importance_H(X)_ij = sum_x G_primary(x)_i * G_i(x)_j`
    - `Load_H(X)_ij = Load_primary(X)_i * Load_i(X^(i))_j / |X^(i)|`, with
      `X^(i)` the positions routed to group `i` (`hierarchical_load`).

    The group gates' logits are computed for all groups with one matmul
    (the same cost as a flat gate over all experts) and gathered for the
    chosen groups.

    Args:
        num_groups: int >= 1. Number of groups `a`.
        experts_per_group: int >= 1. Experts per group `b`.
        k: int. Groups chosen per position, and experts chosen within each
            chosen group; at most `num_groups` and `experts_per_group`.
            Defaults to 2.
""" + gate_arguments_doc() + """
        kernel_initializer: initializer of the four kernels. Defaults to
            `"zeros"`.
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        inputs: float tensor `[..., d]`.
        training: bool.
        mask: optional bool tensor `[...]`.

    Returns:
        `(expert_weights, expert_indices)`: float32 `[..., k*k]` and int32
        `[..., k*k]` flat expert ids.
    """

    def __init__(self, num_groups, experts_per_group, k=2, **kwargs):
        super().__init__(k=k, **kwargs)
        self.num_groups, self.experts_per_group, self.k = validation.hierarchy(
            num_groups, experts_per_group, k
        )

    @property
    def num_routed_experts(self):
        return self.num_groups * self.experts_per_group

    @property
    def experts_per_position(self):
        return self.k * self.k

    def build(self, input_shape):
        validation.feature_input(self, input_shape)
        input_dim = input_shape[-1]
        widths = {
            "gate_kernel": self.num_groups,
            "group_gate_kernel": self.num_routed_experts,
        }
        if self.noisy:
            widths.update(
                noise_kernel=self.num_groups,
                group_noise_kernel=self.num_routed_experts,
            )
        for name, width in widths.items():
            setattr(self, name, self._add_kernel(name, input_dim, width))
        self._build_statistics()
        self.input_spec = keras.layers.InputSpec(
            min_ndim=2, axes={-1: input_dim}
        )

    def route(self, inputs, training=None, mask=None):
        """Routes a batch; returns a `Routing` over the flat expert ids.

        `importance` and `load` are `Importance_H` and `Load_H` flattened
        to `[num_groups * experts_per_group]`.
        """
        features, positions, leading_shape = self._gate_inputs(inputs, mask)
        num_groups, group_size, k = (
            self.num_groups, self.experts_per_group, self.k,
        )
        add_noise = bool(training) and self.noisy
        kernels = [self.gate_kernel, self.group_gate_kernel]
        if add_noise:
            kernels += [self.noise_kernel, self.group_noise_kernel]
        widths = [num_groups, num_groups * group_size] * (2 if add_noise else 1)
        parts = ops.split(
            ops.matmul(features, ops.concatenate(kernels, axis=-1)),
            [sum(widths[: i + 1]) for i in range(len(widths) - 1)],
            axis=-1,
        )

        def per_group(logits):
            return ops.reshape(logits, (-1, num_groups, group_size))

        noisy_kwargs = {}
        if add_noise:
            num_positions = ops.shape(features)[0]
            noisy_kwargs = dict(
                stddev_primary=noise_stddev(parts[2], self.noise_epsilon),
                stddev_groups=per_group(
                    noise_stddev(parts[3], self.noise_epsilon)
                ),
                noise_primary=self._standard_normal(ops.shape(parts[0])),
                noise_inner=self._standard_normal(
                    (num_positions, k, group_size)
                ),
            )
        (expert_weights, expert_indices, importance, primary_load, group_load,
         positions_per_group, tokens_per_expert) = hierarchical_top_k_gating(
            parts[0], per_group(parts[1]), k, positions=positions,
            **noisy_kwargs,
        )
        (primary_load, group_load, positions_per_group, importance,
         tokens_per_expert, num_positions) = replicas.global_batch_sums(
            [primary_load, group_load, positions_per_group, importance,
             tokens_per_expert, ops.sum(positions)]
        )
        return Routing(
            ops.reshape(expert_weights, leading_shape + (k * k,)),
            ops.reshape(expert_indices, leading_shape + (k * k,)),
            importance,
            hierarchical_load(primary_load, group_load, positions_per_group),
            tokens_per_expert,
            num_positions,
        )

    def get_config(self):
        return {
            **super().get_config(),
            "num_groups": self.num_groups,
            "experts_per_group": self.experts_per_group,
        }
