"""Language models with MoE layers, and their matched dense baselines.

- `language_model`: the paper's LSTM-MoE model (Shazeer et al. 2017,
  Appendix C, 1B Word): embedding, LSTM, MoE, LSTM, softmax, with residual
  connections around the LSTM and MoE layers and dropout. The
  computationally matched baseline replaces the MoE layer by one
  feed-forward layer of hidden size `k * hidden_units` (the paper's
  "MoE-1-Wide"): the same multiply-adds per position for the experts.
- `transformer_language_model`: a small decoder-only Transformer whose
  feed-forward layers are MoE layers as MoE models use them today (softmax
  top-k router, gated experts, shared experts), or dense gated layers of
  the same active size.
"""

import keras
import numpy as np

from keras_moe import layers as moe_layers


def language_model(
    vocab_size,
    model_dim=256,
    num_experts=16,
    hidden_units=512,
    k=2,
    hierarchical_groups=None,
    dropout=0.2,
    capacity_factor=None,
    noisy_gating=True,
    importance_weight=0.1,
    load_weight=0.1,
    seed=None,
    experts="mlp",
    name=None,
    sequence_length=None,
    unroll=False,
):
    """Builds `Embedding -> LSTM -> MoE -> LSTM -> softmax` (Appendix C).

    Each of the LSTM and MoE layers is wrapped in a residual connection,
    `x + Dropout(f(x))`, and the embeddings are dropped out too; all widths
    are `model_dim` so that the residuals add up.

    Args:
        vocab_size: int. Words in the vocabulary `V`.
        model_dim: int. Embedding, LSTM and MoE input/output width `d`.
        num_experts: int. Experts of the MoE layer; 0 builds the dense
            baseline (one `Dense(k * hidden_units, relu) -> Dense(d)`).
        hidden_units: int. Hidden size `h` of each expert.
        k: int. Experts per position (per level when hierarchical).
        hierarchical_groups: optional int. Use a
            `HierarchicalMixtureOfExperts` with this many groups of
            `num_experts // hierarchical_groups` experts.
        dropout: float. Dropout rate on embeddings and residual branches.
        capacity_factor, noisy_gating, importance_weight, load_weight,
        seed, experts: passed to the MoE layer.
        name: model name.
        sequence_length: optional int. A fixed number of time steps
            (`None`: any).
        unroll: bool. Unroll the LSTMs over time (needs `sequence_length`;
            required by DTensor, see `expert_parallel.ExpertParallel`).

    Returns:
        `keras.Model` mapping int32 token ids `[batch, time]` to logits
        `[batch, time, V]`. The MoE layer is named "moe" (the baseline's
        feed-forward layers "ffn_hidden" and "ffn_output"), the output
        layer "logits".
    """
    if unroll and not sequence_length:
        raise ValueError("`unroll=True` needs a fixed `sequence_length`.")
    inputs = keras.Input(shape=(sequence_length,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(vocab_size, model_dim, name="embedding")(inputs)
    x = keras.layers.Dropout(dropout)(x)

    def residual(x, branch):
        return keras.layers.Add()([x, keras.layers.Dropout(dropout)(branch)])

    x = residual(x, keras.layers.LSTM(
        model_dim, return_sequences=True, unroll=unroll, name="lstm_1")(x))
    if num_experts:
        common = dict(
            hidden_units=hidden_units,
            k=k,
            capacity_factor=capacity_factor,
            noisy_gating=noisy_gating,
            importance_weight=importance_weight,
            load_weight=load_weight,
            seed=seed,
            experts=experts,
            name="moe",
        )
        if hierarchical_groups:
            if num_experts % hierarchical_groups:
                raise ValueError(
                    f"`num_experts` ({num_experts}) must be divisible by "
                    f"`hierarchical_groups` ({hierarchical_groups})"
                )
            moe = moe_layers.HierarchicalMixtureOfExperts(
                hierarchical_groups, num_experts // hierarchical_groups, **common
            )
        else:
            moe = moe_layers.MixtureOfExperts(num_experts, **common)
        branch = moe(x)
    else:
        branch = dense_feed_forward(
            x, k * hidden_units, model_dim, experts="mlp", name="ffn"
        )
    x = residual(x, branch)
    x = residual(x, keras.layers.LSTM(
        model_dim, return_sequences=True, unroll=unroll, name="lstm_2")(x))
    logits = keras.layers.Dense(vocab_size, name="logits")(x)
    if name is None:
        name = "moe_lm" if num_experts else "dense_lm"
    return keras.Model(inputs, logits, name=name)


@keras.saving.register_keras_serializable(package="keras_moe")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned embedding of each position: `[B, T, d] -> [B, T, d]`.

    Args:
        max_length: int. The longest sequence (`T <= max_length`).
    """

    def __init__(self, max_length, **kwargs):
        super().__init__(**kwargs)
        self.max_length = max_length

    def build(self, input_shape):
        self.embeddings = self.add_weight(
            name="embeddings", shape=(self.max_length, input_shape[-1]),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
        )

    def call(self, inputs):
        length = keras.ops.shape(inputs)[1]
        return inputs + keras.ops.cast(
            self.embeddings[:length], inputs.dtype
        )[None]

    def get_config(self):
        return {**super().get_config(), "max_length": self.max_length}


def transformer_language_model(
    vocab_size,
    sequence_length,
    model_dim=128,
    num_layers=2,
    num_heads=4,
    num_experts=8,
    hidden_units=256,
    k=2,
    shared_experts=1,
    router="softmax_top_k",
    experts="gated",
    capacity_factor=None,
    dropout=0.1,
    seed=None,
    name=None,
):
    """A decoder-only Transformer language model with MoE feed-forwards.

    Pre-norm blocks `x + Dropout(Attention(LN(x)))` (causal) and
    `x + Dropout(FFN(LN(x)))`, learned position embeddings, a final
    layer norm and the output layer "logits".

    Args:
        vocab_size: int. Words in the vocabulary `V`.
        sequence_length: int. The longest input (position embeddings).
        model_dim, num_layers, num_heads: the Transformer's width `d`,
            depth and attention heads.
        num_experts: int. Routed experts of each MoE feed-forward; 0 builds
            the dense baseline, where each feed-forward is one gated layer
            as wide as the experts a position uses,
            `(k + shared_experts) * hidden_units` (`silu(x Wg) * (x Wu)`,
            then `Wd`, no biases; for `experts="mlp"`, `relu` with biases).
        hidden_units: int. Hidden size `h` of each expert.
        k, shared_experts, router, experts, capacity_factor, seed: passed
            to each `MixtureOfExperts` (named "moe_1", "moe_2", ...).
        dropout: float.
        name: model name.

    Returns:
        `keras.Model` mapping int32 token ids `[batch, time]` to logits
        `[batch, time, V]`.
    """
    inputs = keras.Input(shape=(None,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(vocab_size, model_dim, name="embedding")(inputs)
    x = PositionEmbedding(sequence_length, name="positions")(x)
    x = keras.layers.Dropout(dropout)(x)
    for layer in range(1, num_layers + 1):
        normed = keras.layers.LayerNormalization(name=f"attention_norm_{layer}")(x)
        attention = keras.layers.MultiHeadAttention(
            num_heads, model_dim // num_heads, name=f"attention_{layer}"
        )(normed, normed, use_causal_mask=True)
        x = keras.layers.Add()([x, keras.layers.Dropout(dropout)(attention)])
        normed = keras.layers.LayerNormalization(name=f"ffn_norm_{layer}")(x)
        if num_experts:
            branch = moe_layers.MixtureOfExperts(
                num_experts, hidden_units, k=k, router=router,
                experts=experts, shared_experts=shared_experts,
                capacity_factor=capacity_factor, seed=seed,
                name=f"moe_{layer}",
            )(normed)
        else:
            branch = dense_feed_forward(
                normed, (k + shared_experts) * hidden_units, model_dim,
                experts, f"ffn_{layer}",
            )
        x = keras.layers.Add()([x, keras.layers.Dropout(dropout)(branch)])
    x = keras.layers.LayerNormalization(name="final_norm")(x)
    logits = keras.layers.Dense(vocab_size, name="logits")(x)
    if name is None:
        name = "moe_transformer_lm" if num_experts else "dense_transformer_lm"
    return keras.Model(inputs, logits, name=name)


def dense_feed_forward(x, width, output_dim, experts="gated", name="ffn"):
    """One dense feed-forward of `width` hidden units, of an expert kind's
    form: `"gated"`, `(silu(x Wg) * (x Wu)) Wd` without biases (layers
    `{name}_gate`, `_up`, `_down`); `"mlp"`, `relu(x W1 + b1) W2 + b2`
    (`{name}_hidden`, `_output`). `x` is a symbolic tensor."""
    if experts == "gated":
        gate = keras.layers.Dense(width, use_bias=False, name=f"{name}_gate")(x)
        up = keras.layers.Dense(width, use_bias=False, name=f"{name}_up")(x)
        hidden = keras.layers.Multiply()(
            [keras.layers.Activation("silu")(gate), up]
        )
        return keras.layers.Dense(
            output_dim, use_bias=False, name=f"{name}_down"
        )(hidden)
    hidden = keras.layers.Dense(width, activation="relu", name=f"{name}_hidden")(x)
    return keras.layers.Dense(output_dim, name=f"{name}_output")(hidden)


def ops_per_timestep(model):
    """Multiply-adds per position of a forward pass, excluding the softmax.

    The paper's measure (Table 1, "ops/timestep"): LSTMs count
    `4 * units * (input + units)`, dense layers `input * output`, an MoE
    layer its gate (`d * E`; hierarchical: `d * (a + a * b)`, as computed
    here) plus `k` experts of `d * h + h * d_out` (hierarchical: `k * k`;
    gated experts `2 * d * h + h * d_out`) and its shared experts (and
    their gate's `d`); attention layers their projections (`4 d^2` at
    equal widths; the attention scores, which grow with the sequence, are
    left out). The output layer named "logits" (the softmax) and
    embeddings are left out.

    Returns:
        int.
    """
    total = 0
    for layer in model.layers:
        if layer.name == "logits":
            continue
        if isinstance(layer, keras.layers.LSTM):
            input_dim = layer.cell.kernel.shape[0]
            total += 4 * layer.cell.units * (input_dim + layer.cell.units)
        elif isinstance(layer, keras.layers.Dense):
            total += layer.kernel.shape[0] * layer.kernel.shape[1]
        elif isinstance(layer, keras.layers.MultiHeadAttention):
            total += sum(  # the four projection kernels, not the biases
                int(np.prod(weight.shape)) for weight in layer.weights
                if weight.name == "kernel"
            )
        elif isinstance(layer, moe_layers.MixtureOfExpertsBase):
            # Per expert: the multiply-adds of its kernels (`d*h + h*d_out`;
            # gated experts `2*d*h + h*d_out`).
            kernels = [
                variable for name, variable in layer.expert_variables.items()
                if name.endswith("kernel")
            ]
            d = kernels[0].shape[1]
            per_expert = sum(
                int(np.prod(kernel.shape[1:])) for kernel in kernels
            )
            per_position = layer.gating.experts_per_position
            if isinstance(layer, moe_layers.HierarchicalMixtureOfExperts):
                total += d * (layer.num_groups + layer.num_experts)
            else:
                total += d * layer.num_experts
            total += per_position * per_expert
            shared = getattr(layer, "shared_experts", 0)
            total += shared * per_expert
            if shared and layer.shared_expert_gate:
                total += d
    return int(total)


def probabilities_model(model):
    """The same weights, returning next-token probabilities `[B, T, V]`.

    For serving: `model.export()` of the result gives a SavedModel whose
    `serve` signature maps int32 token ids to probabilities.
    """
    probabilities = keras.layers.Softmax(name="probabilities", dtype="float32")(
        model.outputs[0]
    )
    # A single input tensor (not a list), so the signature takes a tensor.
    return keras.Model(model.inputs[0], probabilities, name=f"{model.name}_probs")
