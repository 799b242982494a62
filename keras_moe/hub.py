"""Sparse compute for keras-hub's MoE blocks, on the same weights.

keras-hub's `MixtralSparseMoeBlock` and `QwenSparseMoeBlock` (Qwen-MoE) run
every expert on every token and mask the result (`E / k` times the expert
FLOPs, and `[E, N, h]` activations). `sparsify(model)` makes each such
block of a model run only
the chosen experts, through this package's dispatch (`keras_moe.dispatch`:
one capacity or capacity classes on TensorFlow, `jax.lax.ragged_dot` on
JAX), with the block's own router and expert weights: the same outputs,
router logits, auxiliary loss and gradients, at the cost of the experts
actually chosen.

```python
backbone = keras_hub.models.MixtralBackbone.from_preset(...)  # or from config
keras_moe.hub.sparsify(backbone)   # returns the names of the blocks changed
```

The change is to the blocks' `call`, not to the model's configuration or
weights: a model saved and loaded again is keras-hub's (dense) one, with
the same weights; call `sparsify` again after loading.
"""

import keras
from keras import ops

from keras_moe import compat
from keras_moe import dispatch

if keras.backend.backend() == "jax":
    from keras_moe import jax_dispatch
else:
    jax_dispatch = None


def _block_patches():
    """{keras-hub block class: the function making its sparse `call`}."""
    try:
        from keras_hub.src.models.mixtral.mixtral_decoder import (
            MixtralSparseMoeBlock,
        )
        from keras_hub.src.models.qwen_moe.qwen_moe_decoder import (
            QwenSparseMoeBlock,
        )
    except ImportError as error:
        raise ImportError(
            "keras_moe.hub needs keras-hub (pip install keras-hub)."
        ) from error
    return {
        MixtralSparseMoeBlock: _sparse_mixtral_call,
        QwenSparseMoeBlock: _sparse_qwen_call,
    }


def sparsify(model):
    """Makes every keras-hub Mixtral and Qwen-MoE block of `model` sparse.

    Args:
        model: a Keras model or layer containing `MixtralSparseMoeBlock`s
            or `QwenSparseMoeBlock`s (e.g. a `MixtralBackbone` or
            `QwenMoeBackbone`), built.

    Returns:
        list of the names of the blocks changed (empty if none).
    """
    patches = _block_patches()
    changed = []
    for layer in [model] + compat.flatten_layers(model):
        patch = patches.get(type(layer))
        if patch is not None and not getattr(
            layer, "_keras_moe_sparse", False
        ):
            layer.call = patch(layer)
            layer._keras_moe_sparse = True
            changed.append(layer.name)
    return changed


def _gated_experts_float32_gate(activation, compute_dtype):
    """keras-hub's Mixtral expert: the gate branch activated in float32."""

    def experts(buffer, weights):
        gate_kernel, up_kernel, down_kernel = weights
        gate = ops.cast(ops.matmul(buffer, gate_kernel), "float32")
        gate = ops.cast(activation(gate), compute_dtype)
        return ops.matmul(gate * ops.matmul(buffer, up_kernel), down_kernel)

    return experts


def sparse_mixture(features, gate_values, expert_indices, weights, experts,
                   ragged):
    """Only the chosen experts on `features [N, d]`, dropless: `[N, d_out]`.

    Args:
        features: `[N, d]`; gate_values: `[N, k]`; expert_indices: int
            `[N, k]`.
        weights: the block's stacked expert weights, expert axis first.
        experts: callable `(buffer [E, C, d], weights) -> [E, C, d_out]`.
        ragged: a thunk giving `(kind, weights, activation)` for the JAX
            static-shape path (`jax_dispatch.dropless_mixture`), called on
            JAX only.
    """
    if jax_dispatch is not None:
        kind, ragged_weights, activation = ragged()
        return jax_dispatch.dropless_mixture(
            features, gate_values, expert_indices, ragged_weights, kind,
            activation,
        )
    return dispatch.dropless_mixture(
        features, gate_values, expert_indices, weights, experts
    )


def _top_k_routing(block, router_inputs, normalize):
    """The router of both families: logits, then top-k probabilities."""
    router_logits = block._sparse_feedforward_gate_dense(router_inputs)
    probabilities = ops.softmax(router_logits, axis=-1)
    top_values, top_indices = ops.top_k(probabilities, k=block.top_k)
    if normalize:
        top_values = top_values / ops.sum(top_values, axis=-1, keepdims=True)
    return router_logits, top_values, ops.cast(top_indices, "int32")


def _add_auxiliary_loss(block, weight, loss_function, router_logits,
                        attention_mask):
    """The block's own balancing loss, as keras-hub adds it."""
    block.add_loss(weight * loss_function(
        router_logits=router_logits, num_experts=block.num_experts,
        top_k=block.top_k, attention_mask=attention_mask,
    ))


def _sparse_mixtral_call(block):
    """The sparse `call` of one `MixtralSparseMoeBlock` (same contract:
    `(hidden_states, attention_mask=None, training=False) -> (outputs,
    router_logits)`)."""
    from keras_hub.src.models.mixtral.mixtral_decoder import (
        compute_load_balancing_loss,
    )

    def call(hidden_states, attention_mask=None, training=False):
        leading_shape = ops.shape(hidden_states)[:-1]
        features = ops.reshape(hidden_states, (-1, block.hidden_dim))
        router_inputs = features
        if training and block.router_jitter_noise > 0:
            router_inputs = features * keras.random.uniform(
                ops.shape(features),
                minval=1.0 - block.router_jitter_noise,
                maxval=1.0 + block.router_jitter_noise,
                dtype=features.dtype,
            )
        router_logits, top_values, top_indices = _top_k_routing(
            block, router_inputs, normalize=True
        )
        bank = block.expert_bank
        weights = (
            bank._expert_feedforward_gate_dense,
            bank._expert_feedforward_intermediate_dense,
            bank._expert_feedforward_output_dense,
        )
        outputs = sparse_mixture(
            features,
            ops.cast(top_values, features.dtype),
            top_indices,
            weights,
            _gated_experts_float32_gate(bank.activation, bank.compute_dtype),
            lambda: ("gated", weights, bank.activation),
        )
        outputs = ops.reshape(outputs, leading_shape + (block.hidden_dim,))
        if training:
            _add_auxiliary_loss(
                block, block.router_aux_loss_coef, compute_load_balancing_loss,
                router_logits, attention_mask,
            )
        return outputs, router_logits

    return call


def _sparse_qwen_call(block):
    """The sparse `call` of one `QwenSparseMoeBlock` (Qwen-MoE): routed
    experts whose gate and up kernels are one `[E, d, 2h]` weight, plus the
    block's dense shared expert scaled by its sigmoid gate."""
    from keras_hub.src.models.qwen_moe.qwen_moe_decoder import (
        compute_load_balancing_loss,
    )

    bank = block.expert_bank

    def experts(buffer, weights):
        gate_up_kernel, down_kernel = weights
        gate, up = ops.split(ops.matmul(buffer, gate_up_kernel), 2, axis=-1)
        return ops.matmul(up * bank.activation(gate), down_kernel)

    def call(hidden_states, attention_mask=None, training=None):
        leading_shape = ops.shape(hidden_states)[:-1]
        features = ops.reshape(hidden_states, (-1, block.hidden_dim))
        router_logits, top_values, top_indices = _top_k_routing(
            block, features, normalize=block.norm_top_k_prob
        )
        weights = (
            bank._expert_feedforward_gate_dense,
            bank._expert_feedforward_output_dense,
        )

        def ragged():
            # Two [E, d, h] halves (a copy per step) for the grouped matmul.
            gate_up = ops.convert_to_tensor(weights[0])
            half = bank.intermediate_dim
            return (
                "gated",
                (gate_up[..., :half], gate_up[..., half:], weights[1]),
                bank.activation,
            )

        outputs = sparse_mixture(
            features, ops.cast(top_values, features.dtype), top_indices,
            weights, experts, ragged,
        )
        shared = block.shared_expert_dense(features) * ops.sigmoid(
            block.shared_expert_gate_dense(features)
        )
        outputs = ops.reshape(
            outputs + shared, leading_shape + (block.hidden_dim,)
        )
        if training:
            _add_auxiliary_loss(
                block, block.router_aux_loss_coefficient,
                compute_load_balancing_loss, router_logits, attention_mask,
            )
        return outputs, router_logits

    return call
