"""The Mixture-of-Experts layers (Shazeer et al. 2017, Sections 2 and B).

`y = sum_i G(x)_i * E_i(x)`: a gate picks k experts per position and only
those k experts run on it (`keras_moe.dispatch`). Experts are one-hidden-
layer MLPs whose weights are stacked with the expert axis first, so that
distribution code can shard them along it: `expert_variables` lists them,
and `set_expert_relayout` lets such code move the dispatched buffer to the
experts' devices and back (`keras_moe.expert_parallel` does both).
"""

import keras
from keras import ops

from keras_moe import dispatch
from keras_moe import gating as gating_lib
from keras_moe import replicas
from keras_moe import statistics
from keras_moe import validation

if keras.backend.backend() == "jax":
    from keras_moe import jax_dispatch
else:
    jax_dispatch = None

# The stacked per-expert weights of every MoE layer (each expert kind's),
# with their ranks; the first axis of each is the expert axis:
# `expert_hidden_kernel [E, d, h]`, `expert_hidden_bias [E, h]`,
# `expert_output_kernel [E, h, d_out]`, `expert_output_bias [E, d_out]`
# ("mlp"); `expert_gate_kernel`, `expert_up_kernel [E, d, h]`,
# `expert_down_kernel [E, h, d_out]` ("gated").
EXPERT_WEIGHT_RANKS = {
    f"expert_{name}": 1 + len(axes)
    for names, _ in dispatch.EXPERT_KINDS.values()
    for name, axes in names
}


def _per_expert_initializer(initializer, num_experts):
    """Initialises `[E, fan_in, fan_out]` as E independent `[fan_in, fan_out]`.

    Keras counts every leading axis of a kernel into its fans, which would
    shrink a stacked expert kernel's scale by `sqrt(E)`; a variance-scaling
    initializer is rescaled so that each expert gets the statistics of a
    kernel of its own.
    """
    if not isinstance(initializer, keras.initializers.VarianceScaling):
        return initializer
    return keras.initializers.VarianceScaling(
        scale=initializer.scale * num_experts,
        mode=initializer.mode,
        distribution=initializer.distribution,
        seed=initializer.seed,
    )


class MixtureOfExpertsBase(keras.layers.Layer):
    """Experts, dispatch and combine; subclasses choose the gate.

    Subclasses set their expert count and implement `_make_gating()`.
    """

    def __init__(
        self,
        hidden_units,
        k=2,
        output_units=None,
        activation=None,
        experts="mlp",
        noisy_gating=True,
        noise_epsilon=1e-2,
        importance_weight=0.1,
        load_weight=0.1,
        capacity_factor=None,
        eval_capacity_factor="same",
        shared_experts=0,
        shared_expert_gate=False,
        seed=None,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_units = validation.integer("hidden_units", hidden_units)
        arguments = validation.gate_arguments(
            k, noisy_gating, noise_epsilon, importance_weight, load_weight,
            seed, noisy_name="noisy_gating",
        )
        for name, value in arguments.items():
            setattr(self, name, value)
        self.output_units = (
            None if output_units is None
            else validation.integer("output_units", output_units)
        )
        self.capacity_factor = validation.optional_number(
            "capacity_factor", capacity_factor, minimum=0.0, exclusive=True
        )
        self.shared_experts = validation.integer(
            "shared_experts", shared_experts, minimum=0
        )
        self.shared_expert_gate = validation.boolean(
            "shared_expert_gate", shared_expert_gate
        )
        if isinstance(eval_capacity_factor, str) and (
            eval_capacity_factor == "same"
        ):
            eval_capacity_factor = self.capacity_factor
        self.eval_capacity_factor = validation.optional_number(
            "eval_capacity_factor", eval_capacity_factor, minimum=0.0,
            exclusive=True,
        )
        if experts not in dispatch.EXPERT_KINDS:
            raise ValueError(
                f"`experts` must be one of {tuple(dispatch.EXPERT_KINDS)}. "
                f"Received: experts={experts!r}"
            )
        self.experts = experts
        if activation is None:
            activation = "silu" if experts == "gated" else "relu"
        self.activation = keras.activations.get(activation)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.supports_masking = True
        # Dropless capacity depends on the routing of each batch, a shape
        # XLA cannot compile; `jit_compile="auto"` reads this. On JAX the
        # dropless path is a grouped matmul with static shapes instead.
        self.supports_jit = (
            self.capacity_factor is not None
            and self.eval_capacity_factor is not None
        ) or keras.backend.backend() == "jax"
        self._to_expert_layout = None
        self._to_token_layout = None

    def _make_gating(self):
        raise NotImplementedError

    def _gating_kwargs(self):
        return dict(
            k=self.k,
            noisy=self.noisy_gating,
            noise_epsilon=self.noise_epsilon,
            importance_weight=self.importance_weight,
            load_weight=self.load_weight,
            seed=self.seed,
            dtype=self.dtype_policy,
            name="gating",
        )

    @property
    def num_experts(self):
        raise NotImplementedError

    @property
    def expert_variables(self):
        """The stacked expert weights, expert axis first (after `build`).

        Returns:
            dict name -> variable, in the order the experts take them:
            `expert_hidden_kernel [E, d, h]`, `expert_hidden_bias [E, h]`,
            `expert_output_kernel [E, h, d_out]`, `expert_output_bias
            [E, d_out]` (`experts="mlp"`), or `expert_gate_kernel`,
            `expert_up_kernel [E, d, h]`, `expert_down_kernel [E, h, d_out]`
            (`experts="gated"`).
        """
        return {
            f"expert_{name}": getattr(self, f"expert_{name}")
            for name, _ in dispatch.EXPERT_KINDS[self.experts][0]
        }

    def _expert_weights(self):
        return tuple(self.expert_variables.values())

    def _run_experts(self, buffer, weights):
        """The experts of this layer's kind on `buffer [E, C, d]`."""
        return dispatch.EXPERT_KINDS[self.experts][1](
            buffer, weights, self.activation
        )

    def _experts_on_buffer(self, buffer):
        """The experts on a dispatched `[E, C, d]` buffer, on the devices
        `set_expert_relayout` names: `[E, C, d_out]`, laid out for combine."""
        if self._to_expert_layout is not None:
            buffer = self._to_expert_layout(buffer)
        outputs = self._run_experts(buffer, self._expert_weights())
        if self._to_token_layout is not None:
            outputs = self._to_token_layout(outputs)
        return outputs

    def set_expert_relayout(self, to_expert_layout, to_token_layout):
        """Hooks for distribution code: where the experts' rows are computed.

        Args:
            to_expert_layout: callable `[E, C, d] -> [E, C, d]`, applied to
                the dispatched buffer before the experts run (e.g. moved to
                the devices that hold each expert), or None.
            to_token_layout: callable `[E, C, d_out] -> [E, C, d_out]`,
                applied to the experts' outputs before `combine`, or None.
        """
        self._to_expert_layout = to_expert_layout
        self._to_token_layout = to_token_layout

    def build(self, input_shape):
        validation.feature_input(self, input_shape)
        input_dim = input_shape[-1]
        output_dim = self.output_units or input_dim
        self.gating = self._make_gating()
        if not self.gating.built:
            # A router given as an instance may come built (deserialised
            # from a `.keras` file, or built by its user).
            self.gating.build(input_shape)
        self._output_dim = output_dim
        self._add_stacked_experts("expert", self.num_experts, input_dim)
        if self.shared_experts:
            self._add_stacked_experts(
                "shared", self.shared_experts, input_dim
            )
            if self.shared_expert_gate:
                self.shared_expert_gate_kernel = self.add_weight(
                    name="shared_expert_gate_kernel", shape=(input_dim, 1),
                    initializer=self.kernel_initializer,
                    dtype=self.variable_dtype,
                )
        self.dropped_assignments_total = statistics.add_accumulator(
            self, "dropped_assignments_total", ()
        )
        self.input_spec = keras.layers.InputSpec(
            min_ndim=2, axes={-1: input_dim}
        )

    def _add_stacked_experts(self, prefix, count, input_dim):
        """Adds `count` experts of this layer's kind, stacked (expert axis
        first), as `{prefix}_{name}` (`dispatch.EXPERT_KINDS`)."""
        kernel_initializer = _per_expert_initializer(
            self.kernel_initializer, count
        )
        sizes = {"d": input_dim, "h": self.hidden_units, "o": self._output_dim}
        for name, axes in dispatch.EXPERT_KINDS[self.experts][0]:
            is_kernel = name.endswith("kernel")
            setattr(self, f"{prefix}_{name}", self.add_weight(
                name=f"{prefix}_{name}",
                shape=(count,) + tuple(sizes[axis] for axis in axes),
                initializer=(
                    kernel_initializer if is_kernel else self.bias_initializer
                ),
                regularizer=(
                    self.kernel_regularizer if is_kernel
                    else self.bias_regularizer
                ),
                dtype=self.variable_dtype,
            ))

    def _shared_output(self, features, flat_mask):
        """The shared experts' sum on every position: `[N, d_out]`."""
        weights = tuple(
            getattr(self, f"shared_{name}")
            for name, _ in dispatch.EXPERT_KINDS[self.experts][0]
        )
        buffer = ops.broadcast_to(
            features[None], (self.shared_experts,) + tuple(ops.shape(features))
        )
        outputs = ops.sum(self._run_experts(buffer, weights), axis=0)
        if self.shared_expert_gate:
            outputs = outputs * ops.sigmoid(
                ops.matmul(features, self.shared_expert_gate_kernel)
            )
        if flat_mask is not None:
            outputs = ops.where(
                ops.cast(flat_mask, "bool")[:, None], outputs, 0.0
            )
        return outputs

    def routing_statistics(self):
        """How training positions were routed since the last reset.

        Sums over every training batch (the global batch under a
        `tf.distribute` strategy) since `reset_routing_statistics()`.

        Returns:
            dict: `fraction_per_expert` (float array `[E]`, share of the
            routed assignments each expert received), `importance_cv2` and
            `load_cv2` (CV^2 of the summed Importance and Load),
            `max_mean_load` (busiest expert's assignments over the mean),
            `unused_experts` (experts that received nothing),
            `dropped_fraction` (assignments dropped for capacity) and
            `positions` (unmasked positions seen).
        """
        gating = self.gating
        return statistics.summarise(
            gating.tokens_per_expert_total,
            gating.importance_total,
            gating.load_total,
            gating.positions_total,
            self.dropped_assignments_total,
        )

    def reset_routing_statistics(self):
        """Zeroes the routing statistics (the gate's and the drop count)."""
        self.gating.reset_statistics()
        statistics.reset([self.dropped_assignments_total])

    def call(self, inputs, training=None, mask=None):
        validation.feature_input(self, inputs.shape, inputs.dtype)
        validation.mask(self, mask, inputs)
        leading_shape = ops.shape(inputs)[:-1]
        features = ops.reshape(inputs, (-1, inputs.shape[-1]))
        flat_mask = None if mask is None else ops.reshape(mask, (-1,))
        expert_weights, expert_indices = self.gating(
            features, training=training, mask=flat_mask
        )
        output_dim = self._output_dim
        if features.shape[0] == 0:
            # No positions (an empty batch or sequence): nothing to route.
            outputs = ops.zeros((0, output_dim), self.compute_dtype)
        elif isinstance(self.gating, gating_lib.ExpertChoiceGating):
            # expert_weights, expert_indices: [E, C] gate values, positions.
            expert_outputs = self._experts_on_buffer(
                dispatch.gather_rows(features, expert_indices)
            )
            outputs = dispatch.expert_choice_combine(
                expert_outputs, expert_weights, expert_indices,
                features.shape[0],
            )
        elif (
            self._capacity_factor(training) is None
            and jax_dispatch is not None
        ):
            outputs = jax_dispatch.dropless_mixture(
                features, expert_weights, expert_indices,
                self._expert_weights(), self.experts, self.activation,
                mask=flat_mask,
            )
        else:
            outputs = self._sparse_mixture(
                features, expert_weights, expert_indices, flat_mask, training
            )
        if self.shared_experts and features.shape[0] != 0:
            outputs = outputs + self._shared_output(features, flat_mask)
        return ops.reshape(outputs, leading_shape + (output_dim,))

    def _capacity_factor(self, training):
        """The capacity factor of this call: training's or inference's."""
        return self.capacity_factor if training else self.eval_capacity_factor

    def _sparse_mixture(
        self, features, expert_weights, expert_indices, flat_mask, training
    ):
        """Plan, dispatch, run the experts and combine: `[N, d_out]`."""
        num_tokens = features.shape[0]
        capacity_factor = self._capacity_factor(training)
        if capacity_factor is None and self._to_expert_layout is None:
            return dispatch.dropless_mixture(
                features, expert_weights, expert_indices,
                self._expert_weights(), self._run_experts, mask=flat_mask,
            )
        capacity = None
        if capacity_factor is not None:
            capacity = dispatch.capacity_for(
                ops.shape(features)[0] if num_tokens is None else num_tokens,
                self.gating.experts_per_position,
                self.num_experts,
                capacity_factor,
            )
        plan = dispatch.plan_dispatch(
            expert_indices, self.num_experts, capacity=capacity, mask=flat_mask
        )
        # Relaid-out buffers keep autodiff's gradients (`dispatch.dispatch`).
        local = self._to_expert_layout is None
        expert_outputs = self._experts_on_buffer(
            dispatch.dispatch(features, plan, gather_gradient=local)
        )
        outputs = dispatch.combine(
            expert_outputs, expert_weights, plan, gather_gradient=local
        )
        if training and capacity_factor is not None:
            self.dropped_assignments_total.assign_add(
                replicas.global_batch_sum(
                    ops.cast(plan.num_dropped, "float32")
                )
            )
        return outputs

    def compute_output_shape(self, input_shape):
        validation.feature_input(self, input_shape)
        output_dim = self.output_units or input_shape[-1]
        return tuple(input_shape)[:-1] + (output_dim,)

    def compute_output_spec(self, inputs, training=None, mask=None):
        validation.feature_input(self, inputs.shape, inputs.dtype)
        return keras.KerasTensor(
            self.compute_output_shape(inputs.shape), dtype=self.compute_dtype
        )

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_units": self.hidden_units,
            "k": self.k,
            "output_units": self.output_units,
            "noisy_gating": self.noisy_gating,
            "noise_epsilon": self.noise_epsilon,
            "importance_weight": self.importance_weight,
            "load_weight": self.load_weight,
            "seed": self.seed,
            "activation": keras.activations.serialize(self.activation),
            "experts": self.experts,
            "capacity_factor": self.capacity_factor,
            "eval_capacity_factor": self.eval_capacity_factor,
            "shared_experts": self.shared_experts,
            "shared_expert_gate": self.shared_expert_gate,
            "kernel_initializer": keras.initializers.serialize(
                self.kernel_initializer
            ),
            "bias_initializer": keras.initializers.serialize(
                self.bias_initializer
            ),
            "kernel_regularizer": keras.regularizers.serialize(
                self.kernel_regularizer
            ),
            "bias_regularizer": keras.regularizers.serialize(
                self.bias_regularizer
            ),
        }


def _arguments_doc(k_meaning):
    """The MoE layers' shared `Args:` entries, after their own."""
    return f"""\
        k: int. {k_meaning} Defaults to 2.
        output_units: int >= 1 or None. Output features `d_out`. Defaults
            to None, the input's feature size.
        activation: activation of the experts' hidden layer (of the gate
            branch for gated experts). Defaults to `"relu"` (the paper's
            experts), `"silu"` with `experts="gated"` (SwiGLU).
        experts: `"mlp"` (default): `act(x W1 + b1) W2 + b2`, weights
            `expert_hidden_kernel [E, d, h]`, `expert_hidden_bias [E, h]`,
            `expert_output_kernel [E, h, d_out]`, `expert_output_bias
            [E, d_out]`; or `"gated"` (Mixtral / Qwen / DeepSeek experts,
            no biases): `(act(x Wg) * (x Wu)) Wd`, weights
            `expert_gate_kernel`, `expert_up_kernel [E, d, h]`,
            `expert_down_kernel [E, h, d_out]`. Both run through the same
            dispatch (dropless and capacity, TensorFlow and JAX, expert
            parallelism).
{gating_lib.gate_arguments_doc(noisy_name="noisy_gating")}
        capacity_factor: float > 0 or None. None (default) is dropless:
            every chosen (position, expert) pair is computed. A float `c`
            gives each expert `ceil(c * N * k / E)` slots for `N` positions
            and drops what does not fit (static shapes: XLA-compilable).
            Positions with non-finite features take slots like any other.
            Applies while training.
        eval_capacity_factor: float > 0, None or `"same"` (default: the
            `capacity_factor`). The capacity at inference (`training` not
            True): e.g. a roomier factor, or None to drop nothing when
            serving a model trained with a capacity.
        shared_experts: int >= 0. Always-on experts of the same shape as
            the routed ones, run on every position and added to its output
            (DeepSeek-MoE / Qwen-MoE shared experts; not sharded by expert
            parallelism). Defaults to 0.
        shared_expert_gate: bool. Scales the shared experts' sum by
            `sigmoid(x . w)` per position (Qwen-MoE), with a weight
            `shared_expert_gate_kernel [d, 1]`. Defaults to False.
        kernel_initializer: initializer of each expert's kernels, applied
            per expert. Defaults to `"glorot_uniform"`.
        bias_initializer: initializer of the experts' biases. Defaults to
            `"zeros"`.
        kernel_regularizer, bias_regularizer: optional regularizers of the
            expert weights.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`...).

    Call arguments:
        inputs: float tensor `[..., d]`, rank >= 2. All leading positions
            (e.g. every time step of every sequence) are routed together as
            one batch; there may be none (an empty batch or sequence gives
            an empty output).
        training: bool. Gating noise and balancing losses only when True.
        mask: optional bool tensor `[...]`, shaped like the inputs without
            their last axis (Keras masks are picked up automatically).
            Masked positions are not routed, do not count in the balancing
            losses, and output zeros; the mask is passed on.

    Returns:
        tensor `[..., d_out]` in the layer's compute dtype.
"""


@keras.saving.register_keras_serializable(package="keras_moe")
class MixtureOfExperts(MixtureOfExpertsBase):
    __doc__ = """Sparsely-gated Mixture-of-Experts layer (Shazeer et al. 2017).

    `y = sum_i G(x)_i * E_i(x)` with `G` a `NoisyTopKGating` over
    `num_experts` experts `E_i(x) = act(x W1_i + b1_i) W2_i + b2_i` (or
    gated experts, `experts="gated"`). Only the `k` chosen experts are
    computed for each position. Expert weights are stored stacked, expert
    axis first (`expert_variables`): `expert_hidden_kernel` `[E, d, h]`,
    `expert_hidden_bias` `[E, h]`, `expert_output_kernel` `[E, h, d_out]`,
    `expert_output_bias` `[E, d_out]`. `layer.gating` is the gate,
    whichever router it is.

    Args:
        num_experts: int >= 1. Number of experts `E`.
        hidden_units: int >= 1. Hidden size `h` of each expert.
        router: `"noisy_top_k"` (default: the paper's `NoisyTopKGating`,
            configured by the gate arguments below), `"softmax_top_k"` (a
            `SoftmaxTopKGating` with its defaults and this layer's `k` and
            `seed`; the noisy-gate arguments are then unused),
            `"expert_choice"` (an `ExpertChoiceGating`: each expert takes
            its top `k * N / E` positions of the batch; it looks across the
            batch, so it does not suit autoregressive decoding, and the
            capacity arguments do not apply), or a gating
            layer instance over `num_experts` experts (e.g.
            `SoftmaxTopKGating(E, k=1, normalize=False)`), whose own `k`
            then counts.
""" + _arguments_doc(
        "Experts chosen per position, `1 <= k <= num_experts`."
    ) + """
    Example:

    >>> layer = MixtureOfExperts(num_experts=8, hidden_units=32, k=2)
    >>> layer(np.ones((2, 5, 16), "float32")).shape
    (2, 5, 16)
    """

    ROUTERS = ("noisy_top_k", "softmax_top_k", "expert_choice")

    def __init__(self, num_experts, hidden_units, k=2, router="noisy_top_k",
                 **kwargs):
        super().__init__(hidden_units, k=k, **kwargs)
        self._num_experts, self.k = validation.experts_and_k(num_experts, k)
        if isinstance(router, dict):
            router = keras.saving.deserialize_keras_object(router)
        if isinstance(router, str):
            if router not in self.ROUTERS:
                raise ValueError(
                    f"`router` must be one of {self.ROUTERS} or a gating "
                    f"layer. Received: router={router!r}"
                )
        elif not all(
            hasattr(router, name)
            for name in ("route", "num_routed_experts", "experts_per_position")
        ):
            raise TypeError(
                "`router` must be one of "
                f"{self.ROUTERS} or a gating layer (e.g. "
                "keras_moe.SoftmaxTopKGating). Received: "
                f"router={router!r}"
            )
        elif router.num_routed_experts != self._num_experts:
            raise ValueError(
                f"`router` routes over {router.num_routed_experts} experts "
                f"but num_experts={self._num_experts}."
            )
        self.router = router

    @property
    def num_experts(self):
        return self._num_experts

    def _make_gating(self):
        if not isinstance(self.router, str):
            return self.router
        if self.router == "softmax_top_k":
            return gating_lib.SoftmaxTopKGating(
                self._num_experts, k=self.k, seed=self.seed,
                dtype=self.dtype_policy, name="gating",
            )
        if self.router == "expert_choice":
            return gating_lib.ExpertChoiceGating(
                self._num_experts, k=self.k, seed=self.seed,
                dtype=self.dtype_policy, name="gating",
            )
        return gating_lib.NoisyTopKGating(
            self._num_experts, **self._gating_kwargs()
        )

    def get_config(self):
        router = self.router
        if not isinstance(router, str):
            router = keras.saving.serialize_keras_object(router)
        return {
            **super().get_config(),
            "num_experts": self._num_experts,
            "router": router,
        }


@keras.saving.register_keras_serializable(package="keras_moe")
class HierarchicalMixtureOfExperts(MixtureOfExpertsBase):
    __doc__ = """Hierarchical Mixture-of-Experts layer (Shazeer et al. 2017, App. B).

    A primary gate picks `k` of `num_groups` groups, and each chosen
    group's own gate picks `k` of its `experts_per_group` experts:
    `y = sum_i sum_j G_primary(x)_i * G_i(x)_j * E_ij(x)`, `k*k` experts per
    position, each computed only where chosen. The balancing loss uses the
    hierarchical Importance and Load (`HierarchicalNoisyTopKGating`).
    Experts are stored stacked like `MixtureOfExperts`', with
    `E = num_groups * experts_per_group` and expert `j` of group `i` at
    index `i * experts_per_group + j`, so sharding the expert axis over
    `num_groups` devices puts each group on one device.

    Args:
        num_groups: int >= 1. Number of groups `a`.
        experts_per_group: int >= 1. Experts per group `b`.
        hidden_units: int >= 1. Hidden size `h` of each expert.
""" + _arguments_doc(
        "Groups chosen per position, and experts chosen per chosen group; "
        "at most `num_groups` and `experts_per_group`."
    ) + """
    Example:

    >>> layer = HierarchicalMixtureOfExperts(4, 4, hidden_units=32, k=2)
    >>> layer(np.ones((2, 5, 16), "float32")).shape
    (2, 5, 16)
    """

    def __init__(self, num_groups, experts_per_group, hidden_units, k=2,
                 **kwargs):
        super().__init__(hidden_units, k=k, **kwargs)
        self.num_groups, self.experts_per_group, self.k = validation.hierarchy(
            num_groups, experts_per_group, k
        )

    @property
    def num_experts(self):
        return self.num_groups * self.experts_per_group

    def _make_gating(self):
        return gating_lib.HierarchicalNoisyTopKGating(
            self.num_groups, self.experts_per_group, **self._gating_kwargs()
        )

    def get_config(self):
        return {
            **super().get_config(),
            "num_groups": self.num_groups,
            "experts_per_group": self.experts_per_group,
        }
