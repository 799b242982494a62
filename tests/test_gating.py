"""The gating maths against the independent NumPy reference."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import keras_moe
from keras_moe import gating
from tests import layer_checks
from tests import reference


def _np(x):
    return ops.convert_to_numpy(x)


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 64)])
def test_cv_squared(shape):
    x = np.random.default_rng(1).uniform(0, 3, size=shape).astype("float32")
    np.testing.assert_allclose(_np(gating.cv_squared(x)), reference.cv_squared(x), rtol=1e-5)


def test_cv_squared_of_constant_and_zero_vectors():
    assert float(_np(gating.cv_squared(np.full((4,), 2.5, "float32")))) == 0.0
    assert float(_np(gating.cv_squared(np.zeros((4,), "float32")))) == 0.0
    assert float(_np(gating.cv_squared(np.ones((1,), "float32")))) == 0.0


@pytest.mark.parametrize("n,k", [(4, 1), (6, 2), (8, 3), (5, 4)])
def test_prob_in_top_k(n, k):
    rng = np.random.default_rng(n * 10 + k)
    clean = rng.normal(size=(9, n)).astype("float32")
    stddev = rng.uniform(0.2, 1.5, size=(9, n)).astype("float32")
    noisy = (clean + rng.normal(size=(9, n)) * stddev).astype("float32")
    np.testing.assert_allclose(
        _np(gating.prob_in_top_k(clean, noisy, stddev, k)),
        reference.prob_in_top_k(clean, noisy, stddev, k),
        rtol=1e-5,
        atol=1e-6,
    )


def test_prob_in_top_k_is_one_when_every_expert_is_chosen():
    x = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    np.testing.assert_array_equal(_np(gating.prob_in_top_k(x, x, np.ones_like(x), 4)), 1.0)


def _gating_layer(num_experts, k, input_dim, seed=0, **kwargs):
    layer = gating.NoisyTopKGating(num_experts, k=k, **kwargs)
    layer.build((None, input_dim))
    rng = np.random.default_rng(seed)
    layer.gate_kernel.assign(rng.normal(size=(input_dim, num_experts)).astype("float32"))
    if layer.noisy:
        layer.noise_kernel.assign(
            rng.normal(size=(input_dim, num_experts)).astype("float32") * 0.3
        )
    return layer


def _dense_from_sparse(weights, indices, n):
    weights, indices = _np(weights), _np(indices)
    dense = np.zeros(weights.shape[:-1] + (n,))
    np.put_along_axis(dense, indices, weights, axis=-1)
    return dense


@pytest.mark.parametrize("k", [1, 2, 4])
def test_gates_and_chosen_experts_at_inference(k):
    layer = _gating_layer(6, k, 5)
    x = np.random.default_rng(3).normal(size=(11, 5)).astype("float32")
    weights, indices = layer(x, training=False)
    assert _np(indices).dtype == np.int32
    np.testing.assert_allclose(_np(weights).sum(-1), 1.0, rtol=1e-6)
    expected = reference.gates(x @ layer.gate_kernel.numpy(), k)
    np.testing.assert_allclose(_dense_from_sparse(weights, indices, 6), expected, atol=1e-6)
    assert layer.losses == []


def test_zero_initialised_gate_breaks_ties_round_robin():
    layer = gating.NoisyTopKGating(4, k=2)
    weights, indices = layer(np.ones((6, 8), "float32"))
    assert layer.gate_kernel.numpy().max() == 0.0 == layer.noise_kernel.numpy().max()
    np.testing.assert_allclose(_np(weights), 0.5)
    # Every logit ties; row r takes experts r and r+1 (mod 4).
    expected = [[r % 4, (r + 1) % 4] for r in range(6)]
    np.testing.assert_array_equal(_np(indices), expected)


def test_tie_break_never_overrides_a_real_difference():
    logits = np.array([[0.0, 1e-6, 0.0, -1e-6], [5.0, 5.0, 5.0 + 1e-5, 5.0]], "float32")
    _, indices = gating.top_k_gates(logits, 1)
    np.testing.assert_array_equal(_np(indices)[:, 0], [1, 2])


def _inject_noise(layer, draws):
    """Replaces the layer's normal draws with the given arrays, in order."""
    draws = list(draws)

    def standard_normal(shape):
        draw = draws.pop(0)
        assert tuple(draw.shape) == tuple(int(s) for s in shape)
        return ops.convert_to_tensor(draw)

    layer._standard_normal = standard_normal


@pytest.mark.parametrize("k", [1, 2, 3])
def test_noisy_routing_and_losses_against_reference(k):
    n, d, tokens = 7, 5, 13
    layer = _gating_layer(n, k, d, seed=k, importance_weight=0.3, load_weight=0.7)
    rng = np.random.default_rng(k)
    x = rng.normal(size=(tokens, d)).astype("float32")
    noise = rng.normal(size=(tokens, n)).astype("float32")
    _inject_noise(layer, [noise])
    weights, indices = layer(x, training=True)

    g, load, importance = reference.noisy_gating(
        x, layer.gate_kernel.numpy(), layer.noise_kernel.numpy(), k, noise=noise
    )
    np.testing.assert_allclose(_dense_from_sparse(weights, indices, n), g, atol=1e-5)
    (loss,) = layer.losses
    np.testing.assert_allclose(
        _np(loss), reference.balancing_loss(importance, load, 0.3, 0.7), rtol=1e-4
    )
    _inject_noise(layer, [noise])
    routing = layer.route(x, training=True)
    np.testing.assert_allclose(_np(routing.importance), importance, rtol=1e-5)
    np.testing.assert_allclose(_np(routing.load), load, rtol=1e-4)


def test_load_without_noise_is_a_count():
    layer = _gating_layer(5, 2, 4, noisy=False)
    x = np.random.default_rng(2).normal(size=(20, 4)).astype("float32")
    routing = layer.route(x, training=True)
    g, load, importance = reference.noisy_gating(x, layer.gate_kernel.numpy(), None, 2)
    np.testing.assert_array_equal(_np(routing.load), load)
    np.testing.assert_allclose(_np(routing.importance), importance, rtol=1e-5)
    assert len(layer.trainable_weights) == 1  # no noise kernel when not noisy


def test_masked_positions_get_zero_gates_and_do_not_count():
    layer = _gating_layer(6, 2, 4)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 5, 4)).astype("float32")
    mask = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 0]], bool)
    noise = rng.normal(size=(2, 5, 6)).astype("float32")
    _inject_noise(layer, [noise])
    routing = layer.route(x, training=True, mask=mask)
    weights = _np(routing.expert_weights)
    np.testing.assert_array_equal(weights[~mask], 0.0)
    np.testing.assert_allclose(weights[mask].sum(-1), 1.0, rtol=1e-6)
    _, load, importance = reference.noisy_gating(
        x[mask], layer.gate_kernel.numpy(), layer.noise_kernel.numpy(), 2,
        noise=noise[mask],
    )
    np.testing.assert_allclose(_np(routing.importance), importance, rtol=1e-5)
    np.testing.assert_allclose(_np(routing.load), load, rtol=1e-4)


def test_load_loss_gradients_reach_both_kernels():
    layer = _gating_layer(6, 2, 4, importance_weight=0.0, load_weight=1.0)
    x = np.random.default_rng(5).normal(size=(32, 4)).astype("float32")
    with tf.GradientTape() as tape:
        layer(x, training=True)
        loss = layer.losses[0]
    grad_gate, grad_noise = tape.gradient(loss, [layer.gate_kernel, layer.noise_kernel])
    assert np.abs(grad_gate.numpy()).max() > 1e-6
    assert np.abs(grad_noise.numpy()).max() > 1e-6


def test_noise_only_while_training():
    layer = _gating_layer(8, 2, 4, seed=6)
    x = np.random.default_rng(6).normal(size=(64, 4)).astype("float32")
    first, second = (_np(layer(x, training=False)[1]) for _ in range(2))
    np.testing.assert_array_equal(first, second)
    noisy = _np(layer(x, training=True)[1])
    assert (noisy != first).any()


def _hierarchical_layer(a, b, k, d, seed=0, **kwargs):
    layer = gating.HierarchicalNoisyTopKGating(a, b, k=k, **kwargs)
    return layer_checks.randomise_weights(layer, seed, input_shape=(None, d))


@pytest.mark.parametrize("a,b,k", [(3, 4, 2), (4, 2, 1), (2, 3, 2)])
def test_hierarchical_importance_and_load_against_reference(a, b, k):
    d, tokens = 5, 17
    layer = _hierarchical_layer(a, b, k, d, seed=a + b + k)
    rng = np.random.default_rng(a * b)
    x = rng.normal(size=(tokens, d)).astype("float32")
    noise = rng.normal(size=(tokens, a)).astype("float32")
    chosen_noise = rng.normal(size=(tokens, k, b)).astype("float32")
    _inject_noise(layer, [noise, chosen_noise])
    routing = layer.route(x, training=True)

    # The reference takes a draw for every group; only chosen groups matter.
    std_p = reference.softplus(x @ layer.noise_kernel.numpy()) + 1e-2
    chosen_groups = np.argsort(-(x @ layer.gate_kernel.numpy() + noise * std_p), axis=1)[:, :k]
    group_noise = np.zeros((tokens, a, b), "float32")
    for t in range(tokens):
        group_noise[t, chosen_groups[t]] = chosen_noise[t]
    g, importance, load = reference.hierarchical_gating(
        x, layer.gate_kernel.numpy(), layer.noise_kernel.numpy(),
        layer.group_gate_kernel.numpy(), layer.group_noise_kernel.numpy(),
        a, b, k, noise=noise, group_noise=group_noise,
    )
    np.testing.assert_allclose(
        _dense_from_sparse(routing.expert_weights, routing.expert_indices, a * b), g, atol=1e-5
    )
    np.testing.assert_allclose(_np(routing.importance), importance, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(routing.load), load, rtol=1e-4, atol=1e-6)


def test_hierarchical_inference_gates_against_reference():
    layer = _hierarchical_layer(3, 4, 2, 6, seed=9)
    x = np.random.default_rng(9).normal(size=(10, 6)).astype("float32")
    routing = layer.route(x, training=False)
    g, importance, load = reference.hierarchical_gating(
        x, layer.gate_kernel.numpy(), None, layer.group_gate_kernel.numpy(), None, 3, 4, 2
    )
    np.testing.assert_allclose(_dense_from_sparse(routing.expert_weights, routing.expert_indices, 12), g, atol=1e-5)
    np.testing.assert_allclose(_np(routing.load), load, rtol=1e-5)
    indices = _np(routing.expert_indices)
    assert all(len(set(row)) == 4 for row in indices)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_experts=0), "num_experts"),
        (dict(num_experts=4, k=0), "`k`"),
        (dict(num_experts=4, k=5), "`k`"),
        (dict(num_experts=4, noise_epsilon=-1.0), "noise_epsilon"),
    ],
)
def test_bad_gating_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gating.NoisyTopKGating(**kwargs)


def test_hierarchical_maths_as_pure_functions_against_reference():
    # The functions the layer composes, called directly with the noise.
    a, b, k, d, tokens = 3, 4, 2, 5, 17
    layer = _hierarchical_layer(a, b, k, d, seed=11)
    rng = np.random.default_rng(11)
    x = rng.normal(size=(tokens, d)).astype("float32")
    noise = rng.normal(size=(tokens, a)).astype("float32")
    chosen_noise = rng.normal(size=(tokens, k, b)).astype("float32")
    kernels = {w.name: w.numpy() for w in layer.trainable_weights}
    std_p = reference.softplus(x @ kernels["noise_kernel"]) + 1e-2
    std_g = (reference.softplus(x @ kernels["group_noise_kernel"]) + 1e-2).reshape(tokens, a, b)
    (weights, indices, importance, primary_load, group_load, positions_per_group,
     tokens_per_expert) = gating.hierarchical_top_k_gating(
        (x @ kernels["gate_kernel"]).astype("float32"),
        (x @ kernels["group_gate_kernel"]).reshape(tokens, a, b).astype("float32"), k,
        stddev_primary=std_p.astype("float32"), stddev_groups=std_g.astype("float32"),
        noise_primary=noise, noise_inner=chosen_noise,
    )
    load = gating.hierarchical_load(primary_load, group_load, positions_per_group)

    chosen_groups = np.argsort(-(x @ kernels["gate_kernel"] + noise * std_p), axis=1)[:, :k]
    group_noise = np.zeros((tokens, a, b), "float32")
    for t in range(tokens):
        group_noise[t, chosen_groups[t]] = chosen_noise[t]
    g, want_importance, want_load = reference.hierarchical_gating(
        x, kernels["gate_kernel"], kernels["noise_kernel"], kernels["group_gate_kernel"],
        kernels["group_noise_kernel"], a, b, k, noise=noise, group_noise=group_noise,
    )
    np.testing.assert_allclose(_dense_from_sparse(weights, indices, a * b), g, atol=1e-5)
    np.testing.assert_allclose(_np(importance), want_importance, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(load), want_load, rtol=1e-4, atol=1e-6)
    assert float(_np(positions_per_group).sum()) == tokens * k
    assert float(_np(tokens_per_expert).sum()) == tokens * k * k


def test_hierarchical_load_of_a_group_that_received_nothing_is_zero():
    load = gating.hierarchical_load(
        np.array([2.0, 0.0], "float32"),
        np.array([[1.0, 3.0], [0.0, 0.0]], "float32"),
        np.array([4.0, 0.0], "float32"),
    )
    np.testing.assert_allclose(_np(load), [0.5, 1.5, 0.0, 0.0])


# The softmax top-k router -----------------------------------------------------


def _softmax_router(num_experts, k, d, seed=0, **kwargs):
    layer = gating.SoftmaxTopKGating(num_experts, k=k, **kwargs)
    return layer_checks.randomise_weights(layer, seed, scale=1.0, input_shape=(None, d))


@pytest.mark.parametrize("k,normalize", [(1, False), (2, True), (2, False), (3, True)])
def test_softmax_router_gates_and_losses_against_reference(k, normalize):
    layer = _softmax_router(6, k, 5, seed=k, normalize=normalize,
                            load_balance_weight=0.5, z_loss_weight=0.25)
    rng = np.random.default_rng(k)
    x = rng.normal(size=(2, 7, 5)).astype("float32")
    mask = rng.random((2, 7)) < 0.8
    weights, indices = layer(x, training=True, mask=mask)
    gates, balance, z = reference.softmax_router(
        x.reshape(14, 5) @ layer.gate_kernel.numpy(), k, normalize, mask.ravel()
    )
    np.testing.assert_allclose(
        _dense_from_sparse(weights, indices, 6).reshape(14, 6), gates, atol=1e-5
    )
    (loss,) = layer.losses
    np.testing.assert_allclose(_np(loss), 0.5 * balance + 0.25 * z, rtol=1e-5)
    # At inference: the same gates, no loss.
    weights, indices = layer(x, training=False, mask=mask)
    np.testing.assert_allclose(
        _dense_from_sparse(weights, indices, 6).reshape(14, 6), gates, atol=1e-5
    )
    assert layer.losses == []


def test_softmax_balance_loss_is_k_at_perfect_balance():
    # Uniform probabilities and every expert chosen equally often.
    tokens = np.full((4,), 8.0, "float32")  # 16 positions, k = 2, 4 experts
    probability_sums = np.full((4,), 4.0, "float32")
    loss = gating.load_balancing_loss(tokens, probability_sums, np.float32(16.0))
    np.testing.assert_allclose(_np(loss), 2.0, rtol=1e-6)


def test_softmax_router_jitter_only_while_training_and_gradients_reach_the_kernel():
    layer = _softmax_router(8, 2, 4, seed=3, jitter=0.5, z_loss_weight=1e-2)
    x = np.random.default_rng(3).normal(size=(64, 4)).astype("float32")
    first, second = (_np(layer(x, training=False)[1]) for _ in range(2))
    np.testing.assert_array_equal(first, second)
    assert (_np(layer(x, training=True)[1]) != first).any()
    with tf.GradientTape() as tape:
        layer(x, training=True)
        loss = layer.losses[0]
    (grad,) = tape.gradient(loss, [layer.gate_kernel])
    assert np.abs(grad.numpy()).max() > 1e-6


def test_untrained_softmax_router_spreads_ties_round_robin():
    layer = gating.SoftmaxTopKGating(4, k=2)
    weights, indices = layer(np.ones((6, 8), "float32"))
    np.testing.assert_allclose(_np(weights), 0.5)
    np.testing.assert_array_equal(_np(indices), [[r % 4, (r + 1) % 4] for r in range(6)])


def test_loss_free_bias_chooses_the_experts_and_moves_against_the_load():
    rate = 0.05
    layer = _softmax_router(6, 2, 5, seed=4, bias_update_rate=rate, load_balance_weight=0.0)
    assert len(layer.trainable_weights) == 1  # the bias is not trained
    bias = np.array([0.0, 10.0, 0.0, -10.0, 0.0, 0.0], "float32")
    layer.expert_bias.assign(bias)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(30, 5)).astype("float32")
    mask = rng.random(30) > 0.2
    logits = x @ layer.gate_kernel.numpy()
    # Chosen with the bias, weighted without it.
    expected, _, _ = reference.softmax_router(logits, 2, mask=mask, selection_bias=bias)
    weights, indices = layer(x, mask=mask)
    np.testing.assert_allclose(_dense_from_sparse(weights, indices, 6), expected, rtol=1e-5, atol=1e-6)
    assert (ops.convert_to_numpy(indices)[mask] == 1).any(axis=1).all()
    np.testing.assert_array_equal(layer.expert_bias.numpy(), bias)  # inference: unchanged
    # Training: one update by rate * sign(mean load - load), loads of the
    # unmasked positions.
    weights, indices = layer(x, training=True, mask=mask)
    loads = np.bincount(ops.convert_to_numpy(indices)[mask].ravel(), minlength=6)
    np.testing.assert_allclose(
        layer.expert_bias.numpy(), bias + rate * np.sign(loads.mean() - loads), atol=1e-6
    )
    assert layer.losses == []  # no auxiliary loss with load_balance_weight=0
    layer.reset_statistics()  # statistics only: the bias stays
    np.testing.assert_allclose(
        layer.expert_bias.numpy(), bias + rate * np.sign(loads.mean() - loads), atol=1e-6
    )
    assert layer.get_config()["bias_update_rate"] == rate


def test_loss_free_bias_balances_a_skewed_router_and_is_saved(tmp_path):
    keras.utils.set_random_seed(0)
    router = gating.SoftmaxTopKGating(4, k=1, bias_update_rate=0.02, load_balance_weight=0.0)
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras_moe.MixtureOfExperts(4, 8, router=router)(inputs))
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 4)).astype("float32")
    kernel[:, 0] += 1.5  # skewed to expert 0 (for positive features)
    router.gate_kernel.assign(kernel)
    x = np.abs(rng.normal(size=(256, 3))).astype("float32")
    before = np.bincount(ops.convert_to_numpy(router(x)[1]).ravel(), minlength=4)
    for _ in range(200):
        router(x, training=True)
    after = np.bincount(ops.convert_to_numpy(router(x)[1]).ravel(), minlength=4)
    assert before.max() > 0.7 * 256 and after.max() < 0.4 * 256, (before, after)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(
        loaded.layers[-1].gating.expert_bias.numpy(), router.expert_bias.numpy()
    )
    # A MoE layer with a router instance round-trips whole.
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6
    )


def test_bias_update_rate_is_checked():
    with pytest.raises(ValueError, match="bias_update_rate=-0.1"):
        gating.SoftmaxTopKGating(4, bias_update_rate=-0.1)
    with pytest.raises(ValueError, match="must be finite"):
        gating.SoftmaxTopKGating(4, bias_update_rate=float("nan"))


def test_expert_choice_takes_each_experts_top_positions():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(20, 4)).astype("float32")
    mask = rng.random(20) > 0.25
    positions = mask.astype("float32")[:, None]
    values, slots, importance, tokens = (
        _np(t) for t in gating.expert_choice_gating(logits, 6, positions)
    )
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    for expert in range(4):
        candidates = np.flatnonzero(mask)
        want = candidates[np.argsort(-p[candidates, expert], kind="stable")[:6]]
        np.testing.assert_array_equal(slots[expert], want)
        np.testing.assert_allclose(values[expert], p[want, expert], rtol=1e-6)
    np.testing.assert_allclose(importance, values.sum(1), rtol=1e-6)
    np.testing.assert_array_equal(tokens, [6, 6, 6, 6])
    # Fewer unmasked positions than slots: the rest stay empty (position N).
    few = np.array([[1.0], [0.0], [1.0], [0.0], [0.0]], "float32")
    values, slots, _, tokens = (
        _np(t) for t in gating.expert_choice_gating(logits[:5], 4, few)
    )
    np.testing.assert_array_equal(tokens, [2, 2, 2, 2])
    assert (values == 0).sum() == 8 and (slots[values == 0] == 5).all()
    assert set(slots[values > 0].ravel()) == {0, 2}


def test_untrained_expert_choice_covers_every_position_k_times():
    router = gating.ExpertChoiceGating(8, k=2)
    x = np.random.default_rng(0).normal(size=(32, 5)).astype("float32")
    values, slots = (_np(t) for t in router(x))
    assert slots.shape == (8, 8)  # C = 2 * 32 / 8
    np.testing.assert_array_equal(np.bincount(slots.ravel(), minlength=32), [2] * 32)
    np.testing.assert_allclose(values, 1.0 / 8)


def test_moe_with_expert_choice_equals_its_dense_reference():
    import keras_moe

    layer = keras_moe.MixtureOfExperts(4, 10, k=2, router="expert_choice", seed=0)
    layer_checks.randomise_weights(layer, 3, input_shape=(None, 6))
    assert isinstance(layer.gating, gating.ExpertChoiceGating)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 9, 6)).astype("float32")
    mask = rng.random((2, 9)) > 0.2
    y = _np(layer(x, mask=mask))
    flat, flat_mask = x.reshape(18, 6), mask.ravel()
    logits = flat @ layer.gating.gate_kernel.numpy()
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    capacity = int(np.ceil(18 * 2 / 4))
    gates = np.zeros((18, 4))
    candidates = np.flatnonzero(flat_mask)
    for expert in range(4):
        chosen = candidates[np.argsort(-p[candidates, expert], kind="stable")[:capacity]]
        gates[chosen, expert] = p[chosen, expert]
    expected = reference.moe_output(flat, gates, *layer_checks.expert_arrays(layer))
    np.testing.assert_allclose(y.reshape(18, 6), expected, rtol=1e-4, atol=1e-5)
    assert (y.reshape(18, 6)[~flat_mask] == 0).all()
    layer(x, training=True, mask=mask)
    assert layer.losses == []  # balanced by construction
    assert layer.routing_statistics()["positions"] == flat_mask.sum()
    clone = keras_moe.MixtureOfExperts.from_config(layer.get_config())
    clone.build((None, 6))
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(_np(clone(x, mask=mask)), y, rtol=1e-6)


def test_a_model_with_expert_choice_trains_with_fit():
    import keras_moe

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 6)).astype("float32")
    y = np.tanh(x @ rng.normal(size=(6, 6))).astype("float32")
    inputs = keras.Input((8, 6))
    h = keras_moe.MixtureOfExperts(4, 16, router="expert_choice", name="moe")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(6)(h))
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    losses = model.fit(x, y, batch_size=16, epochs=8, verbose=0).history["loss"]
    assert losses[-1] < 0.7 * losses[0], losses
    assert model.get_layer("moe").routing_statistics()["positions"] == 8 * 64 * 8


def test_expert_choice_arguments_are_checked():
    with pytest.raises(ValueError, match="capacity_factor=0"):
        gating.ExpertChoiceGating(4, capacity_factor=0)
    with pytest.raises(TypeError, match="`k` must be an integer"):
        gating.ExpertChoiceGating(4, k=1.5)
    with pytest.raises(ValueError, match="number of positions"):
        gating.ExpertChoiceGating(4).capacity(None)
