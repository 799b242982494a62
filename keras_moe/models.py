"""The paper's LSTM-MoE language model and its matched dense baseline.

Shazeer et al. 2017, Appendix C (1B Word): embedding, LSTM, MoE, LSTM,
softmax, with residual connections around the LSTM and MoE layers and
dropout. The computationally matched baseline replaces the MoE layer by one
feed-forward layer of hidden size `k * hidden_units` (the paper's
"MoE-1-Wide"): the same multiply-adds per position for the experts.
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
        hidden = keras.layers.Dense(
            k * hidden_units, activation="relu", name="ffn_hidden"
        )(x)
        branch = keras.layers.Dense(model_dim, name="ffn_output")(hidden)
    x = residual(x, branch)
    x = residual(x, keras.layers.LSTM(
        model_dim, return_sequences=True, unroll=unroll, name="lstm_2")(x))
    logits = keras.layers.Dense(vocab_size, name="logits")(x)
    if name is None:
        name = "moe_lm" if num_experts else "dense_lm"
    return keras.Model(inputs, logits, name=name)


def ops_per_timestep(model):
    """Multiply-adds per position of a forward pass, excluding the softmax.

    The paper's measure (Table 1, "ops/timestep"): LSTMs count
    `4 * units * (input + units)`, dense layers `input * output`, an MoE
    layer its gate (`d * E`; hierarchical: `d * (a + a * b)`, as computed
    here) plus `k` experts of `d * h + h * d_out` (hierarchical: `k * k`;
    gated experts `2 * d * h + h * d_out`).
    The output layer named "logits" (the softmax) and embeddings are left
    out.

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
