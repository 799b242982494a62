"""Property tests (hypothesis) over shapes, k, E and masks."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keras import ops

import keras_moe
from tests import layer_checks
from tests import reference

SETTINGS = settings(
    max_examples=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def routing_cases(draw):
    num_experts = draw(st.integers(1, 12))
    k = draw(st.integers(1, num_experts))
    batch = draw(st.integers(1, 4))
    length = draw(st.integers(1, 6))
    dim = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, length, dim)).astype("float32")
    mask = rng.random((batch, length)) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    return num_experts, k, x, ~mask, seed


def _layer(num_experts, k, dim, seed, **kwargs):
    layer = keras_moe.MixtureOfExperts(num_experts, 4, k=k, seed=seed, **kwargs)
    return layer_checks.randomise_weights(
        layer, seed, scale=1.0, input_shape=(None, dim)
    )


@SETTINGS
@given(routing_cases(), st.booleans())
def test_gates_are_a_distribution_over_k_distinct_experts(case, training):
    num_experts, k, x, mask, seed = case
    layer = _layer(num_experts, k, x.shape[-1], seed)
    flat = x.reshape(-1, x.shape[-1])
    routing = layer.gating.route(flat, training=training, mask=mask.reshape(-1))
    weights = ops.convert_to_numpy(routing.expert_weights)
    indices = ops.convert_to_numpy(routing.expert_indices)
    keep = mask.reshape(-1)
    assert weights.shape == indices.shape == (flat.shape[0], k)
    assert np.all(weights >= 0)
    np.testing.assert_allclose(weights.sum(-1), np.where(keep, 1.0, 0.0), atol=1e-5)
    assert np.all((indices >= 0) & (indices < num_experts))
    for row in indices:
        assert len(set(row.tolist())) == k
    if not training:
        # at inference the chosen experts are the top k of the clean logits
        logits = flat @ ops.convert_to_numpy(layer.gating.gate_kernel)
        expected = reference.gates(logits, k)
        dense = np.zeros_like(expected)
        np.put_along_axis(dense, indices, weights, axis=-1)
        np.testing.assert_allclose(dense[keep], expected[keep], atol=1e-5)


@SETTINGS
@given(routing_cases())
def test_dropless_output_is_the_dense_reference_and_positions_do_not_leak(case):
    num_experts, k, x, mask, seed = case
    layer = _layer(num_experts, k, x.shape[-1], seed)
    flat = x.reshape(-1, x.shape[-1])
    expected = layer_checks.dense_reference(layer, flat) * mask.reshape(-1, 1)
    y = ops.convert_to_numpy(layer(x, mask=mask))
    np.testing.assert_allclose(y.reshape(flat.shape[0], -1), expected, rtol=1e-4, atol=1e-4)

    # Change every other position: position 0's output stays the same.
    other = np.random.default_rng(seed + 1).normal(size=x.shape).astype("float32")
    other.reshape(-1, x.shape[-1])[0] = flat[0]
    y_other = ops.convert_to_numpy(layer(other, mask=mask))
    np.testing.assert_allclose(
        y_other.reshape(flat.shape[0], -1)[0], y.reshape(flat.shape[0], -1)[0],
        rtol=1e-5, atol=1e-6,
    )
