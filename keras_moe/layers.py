"""The Mixture-of-Experts layers (Shazeer et al. 2017, Sections 2 and B).

`y = sum_i G(x)_i * E_i(x)`: a gate picks k experts per position and only
those k experts run on it (`keras_moe.dispatch`). Experts are one-hidden-
layer MLPs whose weights are stacked with the expert axis first, so that
distribution code can shard them along it.
"""

import keras
from keras import ops

from keras_moe import dispatch
from keras_moe import distribution
from keras_moe import expert_parallel
from keras_moe import gating as gating_lib


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


def _check_positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(
            f"`{name}` must be an integer >= 1. Received: {name}={value}"
        )


class _ExpertLayerBase(keras.layers.Layer):
    """Experts, dispatch and combine; subclasses choose the gate."""

    def __init__(
        self,
        hidden_units,
        k=2,
        output_units=None,
        activation="relu",
        noisy_gating=True,
        noise_epsilon=1e-2,
        importance_weight=0.1,
        load_weight=0.1,
        capacity_factor=None,
        seed=None,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.k = k
        self.noisy_gating = bool(noisy_gating)
        self.noise_epsilon = noise_epsilon
        self.importance_weight = importance_weight
        self.load_weight = load_weight
        self.seed = seed
        _check_positive_int("hidden_units", hidden_units)
        if output_units is not None:
            _check_positive_int("output_units", output_units)
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(
                f"`capacity_factor` must be > 0 (or None for dropless). "
                f"Received: capacity_factor={capacity_factor}"
            )
        self.hidden_units = hidden_units
        self.output_units = output_units
        self.activation = keras.activations.get(activation)
        self.capacity_factor = capacity_factor
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.supports_masking = True
        # Dropless capacity depends on the routing of each batch, a shape
        # XLA cannot compile; `jit_compile="auto"` reads this. On JAX the
        # dropless path is a grouped matmul with static shapes instead.
        self.supports_jit = (
            capacity_factor is not None
            or keras.backend.backend() == "jax"
        )

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
        return self.gating.num_routed_experts

    def build(self, input_shape):
        gating_lib.check_feature_input(self, input_shape)
        input_dim = input_shape[-1]
        output_dim = self.output_units or input_dim
        self.gating = self._make_gating()
        self.gating.build(input_shape)
        experts = self.num_experts
        kernel_initializer = _per_expert_initializer(
            self.kernel_initializer, experts
        )
        weights = {
            "expert_hidden_kernel": (experts, input_dim, self.hidden_units),
            "expert_hidden_bias": (experts, self.hidden_units),
            "expert_output_kernel": (experts, self.hidden_units, output_dim),
            "expert_output_bias": (experts, output_dim),
        }
        for name, shape in weights.items():
            is_kernel = name.endswith("kernel")
            setattr(
                self,
                name,
                self.add_weight(
                    name=name,
                    shape=shape,
                    initializer=(
                        kernel_initializer
                        if is_kernel
                        else self.bias_initializer
                    ),
                    regularizer=(
                        self.kernel_regularizer
                        if is_kernel
                        else self.bias_regularizer
                    ),
                    dtype=self.variable_dtype,
                ),
            )
        self.dropped_assignments_total = gating_lib.add_accumulator(
            self, "dropped_assignments_total", ()
        )
        self.input_spec = keras.layers.InputSpec(
            min_ndim=2, axes={-1: input_dim}
        )

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
        counts = ops.convert_to_numpy(gating.tokens_per_expert_total)
        assignments = float(counts.sum())
        mean = counts.mean()

        def cv2(value):
            return float(ops.convert_to_numpy(gating_lib.cv_squared(value)))

        dropped = float(ops.convert_to_numpy(self.dropped_assignments_total))
        return {
            "fraction_per_expert": counts / max(assignments, 1.0),
            "importance_cv2": cv2(gating.importance_total),
            "load_cv2": cv2(gating.load_total),
            "max_mean_load": float(counts.max() / mean) if mean > 0 else 0.0,
            "unused_experts": int((counts == 0).sum()),
            "dropped_fraction": dropped / max(assignments, 1.0),
            "positions": float(ops.convert_to_numpy(gating.positions_total)),
        }

    def reset_routing_statistics(self):
        self.gating.reset_statistics()
        self.dropped_assignments_total.assign(0.0)

    def call(self, inputs, training=None, mask=None):
        gating_lib.check_feature_input(self, inputs.shape, inputs.dtype)
        leading_shape = ops.shape(inputs)[:-1]
        features = ops.reshape(inputs, (-1, inputs.shape[-1]))
        flat_mask = None if mask is None else ops.reshape(mask, (-1,))
        expert_weights, expert_indices = self.gating(
            features, training=training, mask=flat_mask
        )
        if self.capacity_factor is None and keras.backend.backend() == "jax":
            outputs = dispatch.ragged_mixture(
                features,
                expert_weights,
                expert_indices,
                self.expert_hidden_kernel,
                self.expert_hidden_bias,
                self.expert_output_kernel,
                self.expert_output_bias,
                self.activation,
                mask=flat_mask,
            )
        else:
            outputs = self._sparse_mixture(
                features, expert_weights, expert_indices, flat_mask, training
            )
        return ops.reshape(outputs, leading_shape + (outputs.shape[-1],))

    def _sparse_mixture(
        self, features, expert_weights, expert_indices, flat_mask, training
    ):
        """Plan, dispatch, run the experts and combine: `[N, d_out]`."""
        capacity = None
        if self.capacity_factor is not None:
            capacity = dispatch.capacity_for(
                features.shape[0] or ops.shape(features)[0],
                self.gating.experts_per_position,
                self.num_experts,
                self.capacity_factor,
            )
        plan = dispatch.plan_dispatch(
            expert_indices, self.num_experts, capacity=capacity, mask=flat_mask
        )
        # Under ExpertParallel the buffer moves to the device of its expert
        # and the outputs come back (no-ops otherwise).
        expert_outputs = dispatch.expert_feedforward(
            expert_parallel.to_expert_layout(
                self, dispatch.dispatch(features, plan)
            ),
            self.expert_hidden_kernel,
            self.expert_hidden_bias,
            self.expert_output_kernel,
            self.expert_output_bias,
            self.activation,
        )
        expert_outputs = expert_parallel.to_token_layout(self, expert_outputs)
        outputs = dispatch.combine(expert_outputs, expert_weights, plan)
        if training and self.capacity_factor is not None:
            self.dropped_assignments_total.assign_add(
                distribution.global_batch_sum(
                    ops.cast(plan.num_dropped, "float32")
                )
            )
        return outputs

    def compute_output_shape(self, input_shape):
        gating_lib.check_feature_input(self, input_shape)
        output_dim = self.output_units or input_shape[-1]
        return tuple(input_shape)[:-1] + (output_dim,)

    def compute_output_spec(self, inputs, training=None, mask=None):
        gating_lib.check_feature_input(self, inputs.shape, inputs.dtype)
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
            "capacity_factor": self.capacity_factor,
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


_GATING_ARGS = """
        k: int. Experts chosen per position. Defaults to 2.
        output_units: int or None. Output features `d_out`. Defaults to
            None, the input's feature size.
        activation: activation of the experts' hidden layer. Defaults to
            `"relu"` (the paper's experts).
        noisy_gating: bool. Noisy top-k gating while training. Defaults to
            True.
        noise_epsilon: float. Added to the noise standard deviation.
            Defaults to 1e-2.
        importance_weight: float. `w_importance` of the balancing loss.
            Defaults to 0.1.
        load_weight: float. `w_load` of the balancing loss. Defaults to 0.1.
        capacity_factor: float or None. None (default) is dropless: every
            chosen (position, expert) pair is computed. A float `c` gives
            each expert `ceil(c * N * k / E)` slots for `N` positions and
            drops what does not fit (static shapes: XLA-compilable).
        seed: int or None. Seed of the gating noise. Defaults to None.
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
            one batch.
        training: bool. Gating noise and balancing losses only when True.
        mask: optional bool tensor `[...]` (Keras masks are picked up
            automatically). Masked positions are not routed, do not count
            in the balancing losses, and output zeros; the mask is passed
            on.

    Returns:
        tensor `[..., d_out]` in the layer's compute dtype.
"""


@keras.saving.register_keras_serializable(package="keras_moe")
class MixtureOfExperts(_ExpertLayerBase):
    __doc__ = """Sparsely-gated Mixture-of-Experts layer (Shazeer et al. 2017).

    `y = sum_i G(x)_i * E_i(x)` with `G` a `NoisyTopKGating` over
    `num_experts` experts `E_i(x) = act(x W1_i + b1_i) W2_i + b2_i`. Only
    the `k` chosen experts are computed for each position. Expert weights
    are stored stacked, expert axis first: `expert_hidden_kernel`
    `[E, d, h]`, `expert_hidden_bias` `[E, h]`, `expert_output_kernel`
    `[E, h, d_out]`, `expert_output_bias` `[E, d_out]`. `layer.gating` is
    the gate.

    Args:
        num_experts: int. Number of experts `E`.
        hidden_units: int. Hidden size `h` of each expert.
    """ + _GATING_ARGS + """
    Example:

    >>> layer = MixtureOfExperts(num_experts=8, hidden_units=32, k=2)
    >>> layer(np.ones((2, 5, 16), "float32")).shape
    (2, 5, 16)
    """

    def __init__(
        self,
        num_experts,
        hidden_units,
        k=2,
        output_units=None,
        activation="relu",
        noisy_gating=True,
        noise_epsilon=1e-2,
        importance_weight=0.1,
        load_weight=0.1,
        capacity_factor=None,
        seed=None,
        **kwargs,
    ):
        gating_lib._validate_gating_args(num_experts, k, noise_epsilon)
        super().__init__(
            hidden_units,
            k=k,
            output_units=output_units,
            activation=activation,
            noisy_gating=noisy_gating,
            noise_epsilon=noise_epsilon,
            importance_weight=importance_weight,
            load_weight=load_weight,
            capacity_factor=capacity_factor,
            seed=seed,
            **kwargs,
        )
        self._num_experts = num_experts

    @property
    def num_experts(self):
        return self._num_experts

    def _make_gating(self):
        return gating_lib.NoisyTopKGating(
            self._num_experts, **self._gating_kwargs()
        )

    def get_config(self):
        return {**super().get_config(), "num_experts": self._num_experts}


@keras.saving.register_keras_serializable(package="keras_moe")
class HierarchicalMixtureOfExperts(_ExpertLayerBase):
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
        num_groups: int. Number of groups `a`.
        experts_per_group: int. Experts per group `b`.
        hidden_units: int. Hidden size `h` of each expert.
    """ + _GATING_ARGS.replace(
        "Experts chosen per position.",
        "Groups chosen per position, and experts chosen per chosen group.",
    ) + """
    Example:

    >>> layer = HierarchicalMixtureOfExperts(4, 4, hidden_units=32, k=2)
    >>> layer(np.ones((2, 5, 16), "float32")).shape
    (2, 5, 16)
    """

    def __init__(
        self,
        num_groups,
        experts_per_group,
        hidden_units,
        k=2,
        output_units=None,
        activation="relu",
        noisy_gating=True,
        noise_epsilon=1e-2,
        importance_weight=0.1,
        load_weight=0.1,
        capacity_factor=None,
        seed=None,
        **kwargs,
    ):
        gating_lib._validate_hierarchical_args(
            num_groups, experts_per_group, k, noise_epsilon
        )
        super().__init__(
            hidden_units,
            k=k,
            output_units=output_units,
            activation=activation,
            noisy_gating=noisy_gating,
            noise_epsilon=noise_epsilon,
            importance_weight=importance_weight,
            load_weight=load_weight,
            capacity_factor=capacity_factor,
            seed=seed,
            **kwargs,
        )
        self.num_groups = num_groups
        self.experts_per_group = experts_per_group

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
