"""Noisy top-k gating (Shazeer et al. 2017, Section 2.1 and Appendix A).

The maths lives in small functions over `keras.ops`, so that tests can call
them directly and they run on every Keras backend. The gating layers compose
them, own the gate weights and add the balancing losses.

Shapes use `n` for the number of experts, `k` for how many of them each
position takes, and `...` for any leading (position) axes.
"""

import collections
import math
import threading

import keras
from keras import ops

from keras_moe import distribution

# Added to Mean(x)^2 in cv_squared, as in the authors' code.
CV_EPSILON = 1e-10

Routing = collections.namedtuple(
    "Routing",
    ["expert_weights", "expert_indices", "importance", "load",
     "tokens_per_expert", "num_positions"],
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
    is_in = ops.greater(noisy_logits, threshold_if_in)
    prob_if_in = normal_cdf((clean_logits - threshold_if_in) / noise_stddev)
    prob_if_out = normal_cdf((clean_logits - threshold_if_out) / noise_stddev)
    return ops.where(is_in, prob_if_in, prob_if_out)


# Tied logits differ by at most TIE_BREAK * n after the offset: far below
# float32 resolution of any non-zero logit, so only exact ties are decided.
TIE_BREAK = 1e-30


def _tie_break(logits):
    """Offsets `[..., n]` that rotate the preferred expert from row to row.

    `KeepTopK` is not defined for tied logits, and zero-initialised gate
    kernels tie every expert at inference. `top_k` would then send every
    position to experts 0..k-1 (and a dropless buffer would grow to
    `E * N` rows); row `r` instead prefers experts `r, r+1, ...` (mod n),
    which spreads tied positions evenly.
    """
    num_experts = logits.shape[-1]
    flat_rows = ops.reshape(logits, (-1, num_experts))
    rows = ops.arange(ops.shape(flat_rows)[0], dtype="int32")[:, None]
    experts = ops.arange(num_experts, dtype="int32")[None, :]
    rank = ops.mod(experts - rows, num_experts)
    offsets = ops.cast(num_experts - 1 - rank, "float32") * TIE_BREAK
    return ops.reshape(offsets, ops.shape(logits))


def top_k_gates(logits, k, extra=0, break_ties=True):
    """`Softmax(KeepTopK(logits, k))`, kept sparse.

    Args:
        logits: float tensor `[..., n]`.
        k: int, 1 <= k <= n.
        extra: int. Also return the `k + extra` largest logits (at most
            n), so that `prob_in_top_k` need not sort again.
        break_ties: bool. Spread exactly tied logits round-robin over the
            rows (`_tie_break`). Needless for noisy logits, which do not
            tie; it costs a few passes over `[..., n]`.

    Returns:
        `(expert_weights, expert_indices)`: float32 `[..., k]` summing to 1
        over the last axis, and int32 `[..., k]`, largest logit first;
        with `extra`, also the top `k + extra` logits `[..., k + extra]`.
    """
    logits = ops.cast(logits, "float32")
    num_experts = logits.shape[-1]
    width = min(k + extra, num_experts)
    selection = logits + _tie_break(logits) if break_ties else logits
    _, top_indices = ops.top_k(selection, k=width)
    top_values = ops.take_along_axis(logits, top_indices, axis=-1)
    top_logits, expert_indices = top_values[..., :k], top_indices[..., :k]
    if k == 1:
        # A softmax over one logit is 1 (and has no gradient).
        expert_weights = ops.ones_like(top_logits)
    else:
        expert_weights = ops.softmax(top_logits, axis=-1)
    expert_indices = ops.cast(expert_indices, "int32")
    if extra:
        return expert_weights, expert_indices, top_values
    return expert_weights, expert_indices


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


def _position_mask(mask, like):
    """Float32 `[..., 1]` mask (ones when `mask` is None) for `like[..., k]`."""
    if mask is None:
        return ops.ones(ops.shape(like)[:-1] + (1,), "float32")
    return ops.cast(mask, "float32")[..., None]


def _validate_gating_args(num_experts, k, noise_epsilon):
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(
            f"`num_experts` must be an integer >= 1. Received: "
            f"num_experts={num_experts}"
        )
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be an integer >= 1. Received: k={k}")
    if k > num_experts:
        raise ValueError(
            f"`k` must be <= `num_experts`: a position cannot take more "
            f"experts than there are. Received: k={k}, "
            f"num_experts={num_experts}"
        )
    if noise_epsilon < 0:
        raise ValueError(
            f"`noise_epsilon` must be >= 0. Received: "
            f"noise_epsilon={noise_epsilon}"
        )


def _validate_hierarchical_args(num_groups, experts_per_group, k,
                                noise_epsilon):
    if not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(
            f"`num_groups` must be an integer >= 1. Received: "
            f"num_groups={num_groups}"
        )
    if not isinstance(experts_per_group, int) or experts_per_group < 1:
        raise ValueError(
            f"`experts_per_group` must be an integer >= 1. Received: "
            f"experts_per_group={experts_per_group}"
        )
    _validate_gating_args(num_groups, k, noise_epsilon)
    if k > experts_per_group:
        raise ValueError(
            f"`k` must be <= `experts_per_group` (k experts are chosen "
            f"within each group). Received: k={k}, "
            f"experts_per_group={experts_per_group}"
        )


def check_feature_input(layer, input_shape, input_dtype=None):
    """Raises a ValueError naming what is wrong with a layer's input.

    Shared by the gating and MoE layers: features on the last axis, at
    least one position axis, floating point.
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
    if input_dtype is not None and not keras.backend.is_float_dtype(
        input_dtype
    ):
        raise ValueError(
            f"{layer.__class__.__name__} expects floating-point inputs "
            f"(embed integer ids first); received dtype {input_dtype}"
        )


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


class _GatingBase(keras.layers.Layer):
    """What the flat and hierarchical gates share: config, the loss, specs.

    Gates compute in float32 whatever the dtype policy (routing decisions
    and the balancing losses are fragile in float16), so they never
    autocast their variables.
    """

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
        kwargs["autocast"] = False
        super().__init__(**kwargs)
        self.k = k
        self.noisy = bool(noisy)
        self.noise_epsilon = float(noise_epsilon)
        self.importance_weight = float(importance_weight)
        self.load_weight = float(load_weight)
        self.seed = seed
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True

    # Under a tf.distribute mirrored strategy every replica runs the model
    # in a thread of its own, and the cross-replica sum in `route` hands
    # control to the other replicas in the middle of the forward pass. Keras
    # keeps a layer's losses in one list, cleared when a call starts: the
    # replicas would then see each other's losses. One list per thread gives
    # every replica its own.
    def _per_thread(self):
        if "_losses_per_thread" not in self.__dict__:
            object.__setattr__(self, "_losses_per_thread", threading.local())
        return self.__dict__["_losses_per_thread"]

    @property
    def _losses(self):
        per_thread = self._per_thread()
        if not hasattr(per_thread, "losses"):
            per_thread.losses = []
        return per_thread.losses

    @_losses.setter
    def _losses(self, value):
        self._per_thread().losses = list(value)

    @property
    def num_routed_experts(self):
        """Number of distinct experts the returned indices range over."""
        raise NotImplementedError

    @property
    def experts_per_position(self):
        """Number of (expert, weight) pairs returned per position."""
        raise NotImplementedError

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

    def _noise_stddev(self, noise_logits):
        return ops.softplus(noise_logits) + self.noise_epsilon

    def _standard_normal(self, shape):
        return keras.random.normal(shape, seed=self.seed_generator)

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
            setattr(self, name, add_accumulator(self, name, shape))

    def _record_statistics(self, routing):
        self.tokens_per_expert_total.assign_add(routing.tokens_per_expert)
        self.importance_total.assign_add(routing.importance)
        self.load_total.assign_add(routing.load)
        self.positions_total.assign_add(routing.num_positions)

    def reset_statistics(self):
        for variable in self.non_trainable_weights:
            variable.assign(ops.zeros_like(variable))

    def call(self, inputs, training=None, mask=None):
        distribution.check_jit_compile(self)
        routing = self.route(inputs, training=training, mask=mask)
        if training:
            self._record_statistics(routing)
        if training and (self.importance_weight or self.load_weight):
            loss = balancing_loss(
                routing.importance,
                routing.load,
                self.importance_weight,
                self.load_weight,
            )
            self.add_loss(loss)
        return routing.expert_weights, routing.expert_indices

    def _flat_inputs(self, inputs, mask):
        check_feature_input(self, inputs.shape, inputs.dtype)
        features = ops.cast(inputs, "float32")
        if mask is not None:
            mask = ops.cast(mask, "bool")
        return features, mask

    def compute_output_shape(self, input_shape):
        shape = tuple(input_shape)[:-1] + (self.experts_per_position,)
        return shape, shape

    def compute_output_spec(self, inputs, training=None, mask=None):
        check_feature_input(self, inputs.shape, inputs.dtype)
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
            "k": self.k,
            "noisy": self.noisy,
            "noise_epsilon": self.noise_epsilon,
            "importance_weight": self.importance_weight,
            "load_weight": self.load_weight,
            "seed": self.seed,
            "kernel_initializer": keras.initializers.serialize(
                self.kernel_initializer
            ),
        }


@keras.saving.register_keras_serializable(package="keras_moe")
class NoisyTopKGating(_GatingBase):
    """Noisy top-k gating network (Shazeer et al. 2017, Section 2.1).

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
        num_experts: int. Number of experts `n` to choose from.
        k: int. Experts chosen per position, `1 <= k <= num_experts`.
            Defaults to 2.
        noisy: bool. Add tunable Gaussian noise while training. Defaults to
            True.
        noise_epsilon: float. Added to the noise standard deviation.
            Defaults to 1e-2.
        importance_weight: float. `w_importance`. Defaults to 0.1.
        load_weight: float. `w_load`. Defaults to 0.1.
        seed: int or None. Seed of the gating noise. Defaults to None.
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

    def __init__(self, num_experts, k=2, noisy=True, noise_epsilon=1e-2,
                 importance_weight=0.1, load_weight=0.1, seed=None,
                 kernel_initializer="zeros", **kwargs):
        _validate_gating_args(num_experts, k, noise_epsilon)
        super().__init__(
            k=k,
            noisy=noisy,
            noise_epsilon=noise_epsilon,
            importance_weight=importance_weight,
            load_weight=load_weight,
            seed=seed,
            kernel_initializer=kernel_initializer,
            **kwargs,
        )
        self.num_experts = num_experts

    @property
    def num_routed_experts(self):
        return self.num_experts

    @property
    def experts_per_position(self):
        return self.k

    def build(self, input_shape):
        check_feature_input(self, input_shape)
        input_dim = input_shape[-1]
        self.gate_kernel = self.add_weight(
            name="gate_kernel",
            shape=(input_dim, self.num_experts),
            initializer=self.kernel_initializer,
            dtype="float32",
        )
        if self.noisy:
            self.noise_kernel = self.add_weight(
                name="noise_kernel",
                shape=(input_dim, self.num_experts),
                initializer=self.kernel_initializer,
                dtype="float32",
            )
        self._build_statistics()
        self.input_spec = keras.layers.InputSpec(
            min_ndim=2, axes={-1: input_dim}
        )

    def route(self, inputs, training=None, mask=None):
        """Routes a batch; returns a `Routing` (no loss is added).

        Args:
            inputs: float tensor `[..., d]`.
            training: bool.
            mask: optional bool tensor `[...]`.

        Returns:
            `Routing` with `[..., k]` weights/indices and `[n]` importance
            and load.
        """
        features, mask = self._flat_inputs(inputs, mask)
        add_noise = bool(training) and self.noisy
        if add_noise:
            # One matmul for both kernels: the gate costs grow with n.
            both = ops.matmul(
                features,
                ops.concatenate([self.gate_kernel, self.noise_kernel], -1),
            )
            # split, not slicing: its gradient is a concat, not zero-fills.
            clean_logits, noise_logits = ops.split(both, 2, axis=-1)
            noise_stddev = self._noise_stddev(noise_logits)
            logits = clean_logits + noise_stddev * self._standard_normal(
                ops.shape(clean_logits)
            )
            expert_weights, expert_indices, top_values = top_k_gates(
                logits, self.k, extra=1, break_ties=False
            )
        else:
            logits = ops.matmul(features, self.gate_kernel)
            expert_weights, expert_indices = top_k_gates(logits, self.k)
        position_mask = _position_mask(mask, expert_weights)
        expert_weights = expert_weights * position_mask

        importance = expert_totals(
            expert_weights, expert_indices, self.num_experts
        )
        if add_noise:
            probs = prob_in_top_k(
                clean_logits, logits, noise_stddev, self.k,
                top_values=top_values,
            )
            load = ops.sum(
                ops.reshape(probs * position_mask, (-1, self.num_experts)),
                axis=0,
            )
        tokens_per_expert = assignments_per_expert(
            position_mask, expert_indices, self.num_experts
        )
        if not add_noise:
            load = tokens_per_expert
        return Routing(
            expert_weights,
            expert_indices,
            *distribution.global_batch_sums(
                [importance, load, tokens_per_expert, ops.sum(position_mask)]
            ),
        )

    def get_config(self):
        return {**super().get_config(), "num_experts": self.num_experts}


@keras.saving.register_keras_serializable(package="keras_moe")
class HierarchicalNoisyTopKGating(_GatingBase):
    """Two-level noisy top-k gating (Shazeer et al. 2017, Appendix B).

    A primary gate picks `k` of `num_groups` groups; each group `i` has its
    own noisy top-k gate over its `experts_per_group` experts and picks `k`
    of them. Expert `j` of group `i` has the flat id
    `i * experts_per_group + j` and the gate value
    `G_primary(x)_i * G_i(x)_j`, so each position gets `k * k` experts.

    The balancing loss uses the hierarchical Importance and Load over all
    `num_groups * experts_per_group` experts:

    - `Importance_H(X)_ij = sum_x G_primary(x)_i * G_i(x)_j`
    - `Load_H(X)_ij = Load_primary(X)_i * Load_i(X^(i))_j / |X^(i)|`, with
      `X^(i)` the positions routed to group `i`.

    The group gates' logits are computed for all groups with one matmul
    (the same cost as a flat gate over all experts) and gathered for the
    chosen groups.

    Args:
        num_groups: int. Number of groups `a`.
        experts_per_group: int. Experts per group `b`.
        k: int. Groups chosen per position, and experts chosen within each
            chosen group. Defaults to 2.
        noisy, noise_epsilon, importance_weight, load_weight, seed,
        kernel_initializer: as in `NoisyTopKGating`, for both levels.

    Call arguments:
        inputs: float tensor `[..., d]`.
        training: bool.
        mask: optional bool tensor `[...]`.

    Returns:
        `(expert_weights, expert_indices)`: float32 `[..., k*k]` and int32
        `[..., k*k]` flat expert ids.
    """

    def __init__(self, num_groups, experts_per_group, k=2, noisy=True,
                 noise_epsilon=1e-2, importance_weight=0.1, load_weight=0.1,
                 seed=None, kernel_initializer="zeros", **kwargs):
        _validate_hierarchical_args(
            num_groups, experts_per_group, k, noise_epsilon
        )
        super().__init__(
            k=k,
            noisy=noisy,
            noise_epsilon=noise_epsilon,
            importance_weight=importance_weight,
            load_weight=load_weight,
            seed=seed,
            kernel_initializer=kernel_initializer,
            **kwargs,
        )
        self.num_groups = num_groups
        self.experts_per_group = experts_per_group

    @property
    def num_routed_experts(self):
        return self.num_groups * self.experts_per_group

    @property
    def experts_per_position(self):
        return self.k * self.k

    def build(self, input_shape):
        check_feature_input(self, input_shape)
        input_dim = input_shape[-1]
        names = ["gate_kernel", "group_gate_kernel"]
        if self.noisy:
            names += ["noise_kernel", "group_noise_kernel"]
        for name in names:
            width = (
                self.num_groups
                if name in ("gate_kernel", "noise_kernel")
                else self.num_routed_experts
            )
            setattr(
                self,
                name,
                self.add_weight(
                    name=name,
                    shape=(input_dim, width),
                    initializer=self.kernel_initializer,
                    dtype="float32",
                ),
            )
        self._build_statistics()
        self.input_spec = keras.layers.InputSpec(
            min_ndim=2, axes={-1: input_dim}
        )

    def route(self, inputs, training=None, mask=None):
        """Routes a batch; returns a `Routing` over the flat expert ids.

        `importance` and `load` are `Importance_H` and `Load_H` flattened
        to `[num_groups * experts_per_group]`.
        """
        features, mask = self._flat_inputs(inputs, mask)
        features = ops.reshape(features, (-1, features.shape[-1]))
        num_groups, group_size, k = (
            self.num_groups,
            self.experts_per_group,
            self.k,
        )
        add_noise = bool(training) and self.noisy
        kernels = [self.gate_kernel, self.group_gate_kernel]
        if add_noise:
            kernels += [self.noise_kernel, self.group_noise_kernel]
        logits = ops.matmul(features, ops.concatenate(kernels, axis=-1))
        widths = [num_groups, num_groups * group_size] * (2 if add_noise else 1)
        splits = list(_cumulative(widths))[:-1]
        parts = ops.split(logits, splits, axis=-1)
        clean_primary = parts[0]
        clean_groups = ops.reshape(parts[1], (-1, num_groups, group_size))
        if add_noise:
            stddev_primary = self._noise_stddev(parts[2])
            stddev_groups = ops.reshape(
                self._noise_stddev(parts[3]), (-1, num_groups, group_size)
            )
            noisy_primary = clean_primary + stddev_primary * (
                self._standard_normal(ops.shape(clean_primary))
            )
        else:
            noisy_primary = clean_primary

        # Level 1: k of the groups.
        group_weights, group_indices = top_k_gates(
            noisy_primary, k, break_ties=not add_noise
        )
        position_mask = _position_mask(
            None if mask is None else ops.reshape(mask, (-1,)), group_weights
        )
        group_weights = group_weights * position_mask

        # Level 2: within each chosen group, [N, k, b] logits.
        def chosen(per_group):
            return ops.take_along_axis(
                per_group, group_indices[..., None], axis=1
            )

        clean_chosen = chosen(clean_groups)
        if add_noise:
            stddev_chosen = chosen(stddev_groups)
            noisy_chosen = clean_chosen + stddev_chosen * (
                self._standard_normal(ops.shape(clean_chosen))
            )
        else:
            noisy_chosen = clean_chosen
        inner_weights, inner_indices = top_k_gates(
            noisy_chosen, k, break_ties=not add_noise
        )

        expert_weights = ops.reshape(
            group_weights[..., None] * inner_weights, (-1, k * k)
        )
        expert_indices = ops.reshape(
            group_indices[..., None] * group_size + inner_indices, (-1, k * k)
        )

        importance = expert_totals(
            expert_weights, expert_indices, self.num_routed_experts
        )
        # Load_primary [a]; Load_i(X^(i)) [a, b]; |X^(i)| [a].
        pair_mask = ops.broadcast_to(position_mask, ops.shape(group_indices))
        routed_to_group = expert_totals(pair_mask, group_indices, num_groups)
        if add_noise:
            primary_probs = prob_in_top_k(
                clean_primary, noisy_primary, stddev_primary, k
            )
            primary_load = ops.sum(primary_probs * position_mask, axis=0)
            inner_probs = prob_in_top_k(
                clean_chosen, noisy_chosen, stddev_chosen, k
            ) * pair_mask[..., None]
            inner_load = ops.segment_sum(
                ops.reshape(inner_probs, (-1, group_size)),
                ops.reshape(group_indices, (-1,)),
                num_segments=num_groups,
            )
        tokens_per_expert = assignments_per_expert(
            position_mask, expert_indices, self.num_routed_experts
        )
        if not add_noise:
            primary_load = routed_to_group
            inner_load = ops.reshape(
                tokens_per_expert, (num_groups, group_size)
            )
        (
            primary_load,
            inner_load,
            routed_to_group,
            importance,
            tokens_per_expert,
            num_positions,
        ) = distribution.global_batch_sums(
            [
                primary_load,
                inner_load,
                routed_to_group,
                importance,
                tokens_per_expert,
                ops.sum(position_mask),
            ]
        )
        load = (
            primary_load[:, None]
            * inner_load
            / ops.maximum(routed_to_group, 1.0)[:, None]
        )

        leading = ops.shape(inputs)[:-1]
        return Routing(
            ops.reshape(expert_weights, leading + (k * k,)),
            ops.reshape(expert_indices, leading + (k * k,)),
            importance,
            ops.reshape(load, (-1,)),
            tokens_per_expert,
            num_positions,
        )

    def get_config(self):
        return {
            **super().get_config(),
            "num_groups": self.num_groups,
            "experts_per_group": self.experts_per_group,
        }


def _cumulative(widths):
    total = 0
    for width in widths:
        total += width
        yield total
