"""Sparse compute for keras-hub's MoE blocks, on the same weights.

keras-hub's MoE blocks run every expert on every token and mask the result
(`E / k` times the expert FLOPs, and `[E, N, h]` activations).
`sparsify(model)` makes each such block of a model run only the chosen
experts, through this package's dispatch (`keras_moe.dispatch`: one
capacity or capacity classes on TensorFlow, static-shape blocks on JAX),
with the block's own router and expert weights: the same outputs, router
outputs, auxiliary loss and gradients, at the cost of the experts actually
chosen.

| keras-hub model | block made sparse | expert maths |
|---|---|---|
| Mixtral | `MixtralSparseMoeBlock` | SwiGLU, gate activated in float32 |
| Qwen-MoE | `QwenSparseMoeBlock` | SwiGLU (fused gate-up), sigmoid-gated shared expert |
| Qwen3-MoE | `Qwen3SparseMoeBlock` | SwiGLU (fused gate-up) |
| Qwen3.5-MoE | `Qwen3_5MoeSparseMoeBlock` | SwiGLU (fused, float32 gate), sigmoid-gated shared expert |
| GPT-OSS | `GptOssSparseMoeBlock` | clamped GLU with biases, softmax over the top k logits |
| Gemma 4 | `Gemma4MoEBlock` (the expert bank) | GeGLU (float32 gate), per-expert output scale |

```python
backbone = keras_hub.models.MixtralBackbone.from_preset(...)  # or config
keras_moe.integrations.keras_hub.sparsify(backbone)  # names of the blocks
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


def _hub_module(path):
    import importlib

    try:
        return importlib.import_module("keras_hub.src.models." + path)
    except ImportError as error:
        raise ImportError(
            "keras_moe.integrations.keras_hub needs keras-hub "
            "(pip install keras-moe[keras-hub])."
        ) from error


def _block_patches():
    """{keras-hub layer class: the function that, given such a layer,
    returns `(layer to change, its sparse call)`, or None to skip it}."""
    mixtral = _hub_module("mixtral.mixtral_decoder")
    qwen = _hub_module("qwen_moe.qwen_moe_decoder")
    qwen3 = _hub_module("qwen3_moe.qwen3_moe_decoder")
    qwen3_5 = _hub_module("qwen3_5_moe.qwen3_5_moe_decoder")
    gpt_oss = _hub_module("gpt_oss.gpt_oss_decoder")
    gemma4 = _hub_module("gemma4.gemma4_decoder_block")
    return {
        mixtral.MixtralSparseMoeBlock: _sparse_mixtral_call,
        qwen.QwenSparseMoeBlock: _sparse_qwen_call(
            "qwen_moe.qwen_moe_decoder", _qwen_shared_expert
        ),
        qwen3.Qwen3SparseMoeBlock: _sparse_qwen_call(
            "qwen3_moe.qwen3_moe_decoder"
        ),
        qwen3_5.Qwen3_5MoeSparseMoeBlock: _sparse_qwen3_5_call,
        gpt_oss.GptOssSparseMoeBlock: _sparse_gpt_oss_call,
        gemma4.Gemma4TextDecoderBlock: _sparse_gemma4_call,
    }


def sparsify(model):
    """Makes every keras-hub MoE block of `model` compute sparsely.

    Args:
        model: a built Keras model or layer holding keras-hub MoE blocks
            (a backbone such as `MixtralBackbone`, `QwenMoeBackbone`,
            `Qwen3MoeBackbone`, `Qwen3_5MoeBackbone`, `GptOssBackbone` or
            `Gemma4Backbone` with `enable_moe_block=True`, or a task
            model holding one).

    Returns:
        list of the names of the layers changed (empty if none; a second
        call changes nothing).
    """
    patches = _block_patches()
    changed = []
    for layer in [model] + compat.flatten_layers(model):
        patch = patches.get(type(layer))
        if patch is None:
            continue
        target = patch(layer)
        if target is None or getattr(target[0], "_keras_moe_sparse", False):
            continue
        target[0].call = target[1]
        target[0]._keras_moe_sparse = True
        changed.append(target[0].name)
    return changed


def sparse_mixture(features, gate_values, expert_indices, weights, experts):
    """Only the chosen experts on `features [N, d]`, dropless: `[N, d_out]`.

    Args:
        features: `[N, d]`; gate_values: `[N, k]`; expert_indices: int
            `[N, k]`.
        weights: the block's stacked expert weights, expert axis first.
        experts: callable `(buffer [G, C, d], weights gathered or stacked
            to [G, ...]) -> [G, C, d_out]`, `G` experts (TensorFlow) or
            blocks of one expert's rows (JAX).
    """
    gate_values = ops.cast(gate_values, features.dtype)
    if jax_dispatch is not None:
        return jax_dispatch.blocks_mixture(
            features, gate_values, expert_indices, weights, experts
        )
    return dispatch.dropless_mixture(
        features, gate_values, expert_indices, weights, experts
    )


def _swiglu(activation, float32_gate=False, fused=False):
    """Gated experts on a buffer: `(act(x Wg) * (x Wu)) Wd`.

    `fused`: the gate and up kernels are one `[E, d, 2h]` weight (gate
    first); `float32_gate`: the gate branch activated in float32.
    """

    def experts(buffer, weights):
        if fused:
            gate, up = ops.split(ops.matmul(buffer, weights[0]), 2, axis=-1)
        else:
            gate = ops.matmul(buffer, weights[0])
            up = ops.matmul(buffer, weights[1])
        if float32_gate:
            gate = ops.cast(activation(ops.cast(gate, "float32")), up.dtype)
        else:
            gate = activation(gate)
        return ops.matmul(gate * up, weights[-1])

    return experts


def _top_k_softmax(router_logits, top_k, normalize):
    """Mixtral / Qwen routing: softmax over all experts, then the top k."""
    probabilities = ops.softmax(router_logits, axis=-1)
    top_values, top_indices = ops.top_k(probabilities, k=top_k)
    if normalize:
        top_values = top_values / ops.sum(top_values, axis=-1, keepdims=True)
    return top_values, ops.cast(top_indices, "int32")


def _softmax_router_call(block, router, weights, experts, normalize, loss,
                         shared=None, jitter=0.0):
    """The sparse `call` of a softmax-top-k block (Mixtral and the Qwens):
    `(hidden_states, attention_mask=None, training=None) -> (outputs,
    router_logits)`, as keras-hub's.

    Args:
        block: the keras-hub block; router: its router `Dense`;
        weights: its stacked expert weights; experts: the function running
            them on a buffer (see `sparse_mixture`); normalize: whether the
            top k probabilities are renormalised.
        loss: `(coefficient, load-balancing loss function)` of the block's
            keras-hub module.
        shared: optional callable `features -> [N, d]`, the shared expert.
        jitter: Mixtral's router input jitter while training.
    """
    coefficient, loss_function = loss

    def call(hidden_states, attention_mask=None, training=None):
        leading_shape = ops.shape(hidden_states)[:-1]
        features = ops.reshape(hidden_states, (-1, block.hidden_dim))
        router_inputs = features
        if training and jitter > 0:
            router_inputs = features * keras.random.uniform(
                ops.shape(features), minval=1.0 - jitter,
                maxval=1.0 + jitter, dtype=features.dtype,
            )
        router_logits = router(router_inputs)
        top_values, top_indices = _top_k_softmax(
            router_logits, block.top_k, normalize
        )
        outputs = sparse_mixture(
            features, top_values, top_indices, weights, experts
        )
        if shared is not None:
            outputs = outputs + shared(features)
        outputs = ops.reshape(outputs, leading_shape + (block.hidden_dim,))
        if training:
            block.add_loss(coefficient * loss_function(
                router_logits=router_logits, num_experts=block.num_experts,
                top_k=block.top_k, attention_mask=attention_mask,
            ))
        return outputs, router_logits

    return call


def _sparse_mixtral_call(block):
    module = _hub_module("mixtral.mixtral_decoder")
    bank = block.expert_bank
    return block, _softmax_router_call(
        block, block._sparse_feedforward_gate_dense,
        (bank._expert_feedforward_gate_dense,
         bank._expert_feedforward_intermediate_dense,
         bank._expert_feedforward_output_dense),
        _swiglu(bank.activation, float32_gate=True),
        normalize=True,
        loss=(block.router_aux_loss_coef, module.compute_load_balancing_loss),
        jitter=block.router_jitter_noise,
    )


def _fused_bank(bank):
    return (bank._expert_feedforward_gate_dense,
            bank._expert_feedforward_output_dense)


def _sparse_qwen_call(module_path, shared=None):
    """The patch of Qwen-MoE's and Qwen3-MoE's blocks (`module_path`: the
    block's keras-hub module): routed experts with a fused gate-up kernel,
    plus `shared(block)`'s shared expert when given (Qwen-MoE)."""

    def patch(block):
        module = _hub_module(module_path)
        return block, _softmax_router_call(
            block, block._sparse_feedforward_gate_dense,
            _fused_bank(block.expert_bank),
            _swiglu(block.expert_bank.activation, fused=True),
            normalize=block.norm_top_k_prob,
            loss=(block.router_aux_loss_coefficient,
                  module.compute_load_balancing_loss),
            shared=shared(block) if shared else None,
        )

    return patch


def _qwen_shared_expert(block):
    """Qwen-MoE's dense shared expert, scaled by its sigmoid gate."""
    return lambda features: block.shared_expert_dense(features) * ops.sigmoid(
        block.shared_expert_gate_dense(features)
    )


def _sparse_qwen3_5_call(block):
    module = _hub_module("qwen3_5_moe.qwen3_5_moe_decoder")
    return block, _softmax_router_call(
        block, block._router_gate, _fused_bank(block.expert_bank),
        _swiglu(ops.silu, float32_gate=True, fused=True),
        normalize=True,
        loss=(block.router_aux_loss_coefficient,
              module.compute_load_balancing_loss),
        shared=lambda features: ops.sigmoid(
            block._shared_expert_gate(features)
        ) * block.shared_expert(features),
    )


def _sparse_gpt_oss_call(block):
    """GPT-OSS: softmax over the top k router logits (the router has a
    bias); experts with biases, gate and up interleaved in one kernel, both
    clamped, `(up + 1) * gate * sigmoid(alpha * gate)`. Returns keras-hub's
    `[N, E]` router scores (the k weights scattered) beside the outputs."""
    bank = block.experts

    def experts(buffer, weights):
        kernel, bias, down_kernel, down_bias = weights
        gate_up = ops.matmul(buffer, kernel) + bias[:, None, :]
        gate = ops.minimum(gate_up[..., ::2], bank.limit)
        up = ops.clip(gate_up[..., 1::2], -bank.limit, bank.limit)
        hidden = (up + 1) * (gate * ops.sigmoid(gate * bank.alpha))
        return ops.matmul(hidden, down_kernel) + down_bias[:, None, :]

    weights = (bank.gate_up_proj, bank.gate_up_proj_bias, bank.down_proj,
               bank.down_proj_bias)

    def call(hidden_states):
        leading_shape = ops.shape(hidden_states)[:-1]
        features = ops.reshape(hidden_states, (-1, block.hidden_dim))
        router_logits = block.router.router_dense(features)
        top_logits, top_indices = ops.top_k(router_logits, k=block.top_k)
        top_values = ops.softmax(top_logits, axis=-1)
        router_scores = ops.sum(
            ops.one_hot(top_indices, block.num_experts,
                        dtype=top_values.dtype) * top_values[..., None],
            axis=1,
        )
        outputs = sparse_mixture(
            features, top_values, ops.cast(top_indices, "int32"), weights,
            experts,
        )
        return (ops.reshape(outputs, leading_shape + (block.hidden_dim,)),
                router_scores)

    return block, call


def _sparse_gemma4_call(decoder_block):
    """Gemma 4 (`enable_moe_block=True`): the expert bank takes the
    router's `[T, E]` dispatch weights (k non-zero per row); the sparse
    bank reads the k back with `top_k` and runs only those experts, each
    output scaled by its `per_expert_scale`."""
    if not decoder_block.enable_moe_block:
        return None
    bank = decoder_block.moe_expert_bank
    top_k = decoder_block.moe_router.num_experts_per_token

    def gelu(x):
        return keras.activations.gelu(x, approximate=True)

    experts = _swiglu(gelu, float32_gate=True)
    weights = (bank.gate_proj, bank.up_proj, bank.down_proj)

    def call(x, dispatch_weights):
        top_values, top_indices = ops.top_k(dispatch_weights, k=top_k)
        top_indices = ops.cast(top_indices, "int32")
        scales = ops.take(ops.cast(bank.per_expert_scale, x.dtype),
                          top_indices)
        return sparse_mixture(
            x, ops.cast(top_values, x.dtype) * scales, top_indices, weights,
            experts,
        )

    return bank, call
