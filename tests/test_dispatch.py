"""Sparse dispatch: dropless and capacity modes against dense references."""

import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import keras_moe
from keras_moe import dispatch
from tests import layer_checks
from tests import reference
from tests.subprocesses import run_python


def _np(x):
    return ops.convert_to_numpy(x)


def _layer(num_experts=8, k=2, d=6, seed=0, **kwargs):
    layer = keras_moe.MixtureOfExperts(num_experts, hidden_units=10, k=k, seed=seed, **kwargs)
    return layer_checks.randomise_weights(layer, seed, input_shape=(None, d))


def _reference_with_capacity(x, weights, indices, capacity, expert_arrays):
    """Slots go to first choices first, then positions in order."""
    num_experts = expert_arrays[0].shape[0]
    taken = np.zeros(num_experts, int)
    kept = np.zeros(indices.shape, bool)
    for choice in range(indices.shape[1]):
        for position in range(indices.shape[0]):
            expert = indices[position, choice]
            if taken[expert] < capacity:
                taken[expert] += 1
                kept[position, choice] = True
    dense_gates = np.zeros((x.shape[0], num_experts))
    np.put_along_axis(dense_gates, indices, np.where(kept, weights, 0.0), axis=1)
    return reference.moe_output(x, dense_gates, *expert_arrays), int((~kept).sum())


def test_plan_groups_assignments_by_expert_in_priority_order():
    indices = np.array([[2, 0], [2, 1], [0, 2], [1, 3]], "int32")
    plan = dispatch.plan_dispatch(indices, 4)
    np.testing.assert_array_equal(_np(plan.tokens_per_expert), [2, 2, 3, 1])
    assert int(_np(plan.capacity)) == 3 and int(_np(plan.num_dropped)) == 0
    # Expert 2: first choices of positions 0 and 1, then position 2's second.
    np.testing.assert_array_equal(_np(plan.slot_positions)[2], [0, 1, 2])
    np.testing.assert_array_equal(_np(plan.slot_positions)[3], [3, 4, 4])  # 4 = empty
    slots = _np(plan.assignment_slots)
    assert sorted(slots.ravel()) == sorted(set(slots.ravel()))  # one slot each


def test_plan_with_capacity_and_mask():
    indices = np.array([[0, 1], [0, 1], [0, 2], [0, 1]], "int32")
    mask = np.array([True, True, False, True])
    plan = dispatch.plan_dispatch(indices, 3, capacity=2, mask=mask)
    np.testing.assert_array_equal(_np(plan.tokens_per_expert), [3, 3, 0])
    assert int(_np(plan.num_dropped)) == 2
    slots = _np(plan.assignment_slots)
    assert slots[2].tolist() == [6, 6]  # masked: no slot (6 = E*C)
    assert slots[3].tolist() == [6, 6]  # beyond capacity for both experts


@pytest.mark.parametrize("num_experts,k", [(4, 1), (8, 2), (16, 4), (5, 5)])
def test_dropless_and_roomy_capacity_equal_the_dense_reference(num_experts, k):
    x = np.random.default_rng(num_experts).normal(size=(40, 6)).astype("float32")
    expected = None
    for capacity_factor in (None, float(num_experts)):
        layer = _layer(num_experts, k, seed=num_experts, capacity_factor=capacity_factor)
        y = _np(layer(x))
        if expected is None:
            expected = layer_checks.dense_reference(layer, x)
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_untrained_dropless_layer_keeps_a_balanced_buffer():
    # Zero gate kernels tie every expert at inference; without a tie rule
    # all positions would go to experts 0 and 1 and the buffer would hold
    # E * N rows.
    layer = keras_moe.MixtureOfExperts(64, hidden_units=8, k=2)
    x = np.random.default_rng(0).normal(size=(512, 6)).astype("float32")
    layer(x)
    _, indices = layer.gating(x)
    plan = dispatch.plan_dispatch(indices, 64)
    assert int(_np(plan.capacity)) == 512 * 2 // 64


@pytest.mark.parametrize("capacity_factor", [0.25, 0.5, 1.0])
def test_capacity_drops_exactly_the_assignments_beyond_capacity(capacity_factor):
    num_experts, k, tokens = 4, 2, 30
    layer = _layer(num_experts, k, seed=7, capacity_factor=capacity_factor)
    x = np.random.default_rng(7).normal(size=(tokens, 6)).astype("float32")
    weights, indices = (_np(t) for t in layer.gating(x))
    capacity = int(np.ceil(capacity_factor * tokens * k / num_experts))
    expected, expected_dropped = _reference_with_capacity(
        x, weights, indices, capacity, layer_checks.expert_arrays(layer)
    )
    np.testing.assert_allclose(_np(layer(x)), expected, rtol=1e-5, atol=1e-5)
    plan = dispatch.plan_dispatch(indices, num_experts, capacity=capacity)
    assert int(_np(plan.num_dropped)) == expected_dropped > 0


def test_inference_uses_its_own_capacity_factor():
    # Trained with a tight capacity, served dropless (or with another).
    x = np.random.default_rng(9).normal(size=(40, 6)).astype("float32")
    layer = _layer(4, 2, seed=9, capacity_factor=0.5, eval_capacity_factor=None)
    assert layer.get_config()["eval_capacity_factor"] is None
    assert not layer.supports_jit
    np.testing.assert_allclose(
        _np(layer(x)), layer_checks.dense_reference(layer, x), rtol=1e-5, atol=1e-5
    )
    layer(x, training=True)
    assert layer.routing_statistics()["dropped_fraction"] > 0.4  # half the slots
    same = _layer(4, 2, seed=9, capacity_factor=0.5)
    assert same.eval_capacity_factor == 0.5 and same.supports_jit
    weights, indices = (_np(t) for t in same.gating(x))
    expected, _ = _reference_with_capacity(
        x, weights, indices, 10, layer_checks.expert_arrays(same)
    )
    np.testing.assert_allclose(_np(same(x)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("capacity_factor", [None, 8.0, 0.5])
def test_gradients_match_the_dense_reference(capacity_factor):
    layer = _layer(8, 2, seed=3, capacity_factor=capacity_factor)
    x = tf.constant(np.random.default_rng(3).normal(size=(24, 6)).astype("float32"))
    probe = tf.constant(np.random.default_rng(4).normal(size=(24, 6)).astype("float32"))
    expert_vars = [layer.expert_hidden_kernel, layer.expert_hidden_bias,
                   layer.expert_output_kernel, layer.expert_output_bias]
    variables = expert_vars + [layer.gating.gate_kernel, x]  # and the input

    with tf.GradientTape() as tape:
        tape.watch(x)
        sparse = tf.reduce_sum(layer(x) * probe)
    sparse_grads = tape.gradient(sparse, variables)

    with tf.GradientTape() as tape:
        tape.watch(x)
        weights, indices = layer.gating(x)
        if capacity_factor is not None:
            capacity = dispatch.capacity_for(24, 2, 8, capacity_factor)
            plan = dispatch.plan_dispatch(indices, 8, capacity=capacity)
            weights = tf.where(plan.assignment_slots < 8 * capacity, weights, 0.0)
        dense = tf.reduce_sum(
            dispatch.dense_mixture(x, weights, indices, *expert_vars, keras.activations.relu)
            * probe
        )
    dense_grads = tape.gradient(dense, variables)
    np.testing.assert_allclose(sparse.numpy(), dense.numpy(), rtol=1e-5)
    for sparse_grad, dense_grad in zip(sparse_grads, dense_grads):
        np.testing.assert_allclose(
            tf.convert_to_tensor(sparse_grad).numpy(),
            tf.convert_to_tensor(dense_grad).numpy(),
            rtol=1e-4,
            atol=1e-5,
        )


def test_capacity_mode_compiles_with_xla_and_matches_eager():
    layer = _layer(8, 2, seed=5, capacity_factor=1.25)
    assert layer.supports_jit and not _layer(8, 2).supports_jit

    @tf.function(jit_compile=True, input_signature=[tf.TensorSpec([None, 6])])
    def compiled_step(x):
        with tf.GradientTape() as tape:
            y = layer(x, training=False)
            loss = tf.reduce_sum(tf.square(y))
        return y, tape.gradient(loss, layer.expert_hidden_kernel)

    for tokens in (16, 40):
        x = np.random.default_rng(tokens).normal(size=(tokens, 6)).astype("float32")
        y, grad = compiled_step(x)
        np.testing.assert_allclose(y.numpy(), _np(layer(x)), rtol=1e-5, atol=1e-5)
        assert np.isfinite(grad.numpy()).all()


def test_jit_compile_auto_follows_the_mode():
    # What Keras' jit_compile="auto" reads (it also turns XLA off on a CPU
    # with TensorFlow, whatever the layers say).
    from keras.src.trainers.trainer import model_supports_jit

    for capacity_factor, expected in ((None, False), (1.5, True)):
        inputs = keras.Input((6,))
        model = keras.Model(inputs, _layer(4, 2, capacity_factor=capacity_factor)(inputs))
        assert model_supports_jit(model) is expected
        model.compile(optimizer="sgd", loss="mse", jit_compile="auto")
        if not expected:
            assert model.jit_compile is False


JAX_SCRIPT = textwrap.dedent(
    """
    import jax
    import numpy as np
    import keras
    import keras_moe
    from tests import layer_checks, reference
    assert keras.backend.backend() == "jax"

    x = np.random.default_rng(0).normal(size=(30, 6)).astype("float32")
    for capacity_factor in (None, 8.0):
        for layer in (
            keras_moe.MixtureOfExperts(6, 10, k=2, capacity_factor=capacity_factor),
            keras_moe.HierarchicalMixtureOfExperts(2, 3, 10, k=2, capacity_factor=capacity_factor),
            keras_moe.MixtureOfExperts(6, 10, k=2, capacity_factor=capacity_factor, experts="gated"),
        ):
            layer_checks.randomise_weights(layer, seed=1, input_shape=x.shape)
            weights, indices = (np.asarray(t) for t in layer.gating(x))
            gates = np.zeros((30, layer.num_experts))
            np.put_along_axis(gates, indices, weights, axis=1)
            if layer.experts == "gated":
                expected = reference.gated_moe_output(
                    x, gates, *[np.asarray(v) for v in layer.expert_variables.values()])
            else:
                expected = reference.moe_output(x, gates, *layer_checks.expert_arrays(layer))
            # Compiled for real: jax.jit of the layer's stateless call.
            compiled = jax.jit(
                lambda trainable, non_trainable, x: layer.stateless_call(
                    trainable, non_trainable, x)[0]
            )
            y = np.asarray(compiled(
                [v.value for v in layer.trainable_variables],
                [v.value for v in layer.non_trainable_variables], x,
            ))
            assert compiled._cache_size() == 1
            np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(np.asarray(layer(x)), y, rtol=1e-5, atol=1e-5)

    # Expert choice compiles (static capacity) and equals its eager call.
    ec = keras_moe.MixtureOfExperts(4, 10, router="expert_choice")
    layer_checks.randomise_weights(ec, seed=2, input_shape=x.shape)
    compiled = jax.jit(lambda t, n, x: ec.stateless_call(t, n, x)[0])
    y = compiled([v.value for v in ec.trainable_variables],
                 [v.value for v in ec.non_trainable_variables], x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ec(x)), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(y)).sum() > 0

    tokens = np.random.default_rng(2).integers(1, 20, size=(128, 8)).astype("int32")
    tokens[:, 6:] = 0
    for capacity_factor in (None, 2.0):
        keras.utils.set_random_seed(0)
        inputs = keras.Input(shape=(None,), dtype="int32")
        h = keras.layers.Embedding(20, 16, mask_zero=True)(inputs)
        h = keras.layers.LSTM(16, return_sequences=True)(h)
        h = keras_moe.MixtureOfExperts(4, 32, capacity_factor=capacity_factor)(h)
        model = keras.Model(inputs, keras.layers.Dense(20)(h))
        model.compile(optimizer=keras.optimizers.Adam(1e-2),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        assert model.jit_compile
        losses = model.fit(tokens, tokens, epochs=10, batch_size=32, verbose=0).history["loss"]
        assert losses[-1] < 0.8 * losses[0], losses
    print("DONE")
    """
)


def test_layers_on_the_jax_backend(tmp_path):
    pytest.importorskip("jax")
    run_python(JAX_SCRIPT, tmp_path, env_extra={"KERAS_BACKEND": "jax"},
               timeout=600)


# Capacity classes (the dropless path with busy experts) ------------------


def test_class_plan_pads_each_class_to_its_own_busiest_expert():
    rng = np.random.default_rng(11)
    num_tokens, num_experts, k = 300, 12, 2
    # Skewed routing: expert 0 is chosen by everyone, the others unevenly.
    indices = np.stack(
        [np.zeros(num_tokens, "int32"),
         rng.choice(np.arange(1, num_experts), size=num_tokens,
                    p=np.arange(1, num_experts) / np.arange(1, num_experts).sum())],
        axis=1,
    ).astype("int32")
    mask = rng.random(num_tokens) > 0.1
    plan = dispatch.plan_classes(indices, num_experts, 4, mask=mask)
    loads = np.bincount(indices[mask].ravel(), minlength=num_experts)
    np.testing.assert_array_equal(_np(plan.tokens_per_expert), loads)
    assert plan.class_sizes == (3, 3, 3, 3)
    order = _np(plan.expert_order)
    assert (np.diff(loads[order]) <= 0).all()  # busiest first
    # Each class is as wide as its busiest expert's load; the rows in all
    # stay within the bound, far below one capacity for every expert.
    widths = [_np(slots).shape[1] for slots in plan.slot_positions]
    assert widths == [loads[order[3 * g]] for g in range(4)]
    rows = sum(3 * width for width in widths)
    assert rows == int(_np(plan.num_rows))
    assert rows <= mask.sum() * k + 3 * loads.max() < num_experts * loads.max()
    # Every unmasked assignment has its own row, holding its position.
    flat_positions = np.concatenate([_np(s).ravel() for s in plan.slot_positions])
    slots = _np(plan.assignment_slots)
    assert (slots[~mask] == rows).all()
    taken = slots[mask].ravel()
    assert len(set(taken)) == len(taken) and taken.max() < rows
    np.testing.assert_array_equal(
        flat_positions[slots[mask]], np.repeat(np.flatnonzero(mask)[:, None], k, axis=1)
    )
    assert (flat_positions == num_tokens).sum() == rows - len(taken)  # the padding


@pytest.mark.parametrize("hierarchical", [False, True])
def test_classes_equal_the_dense_reference_in_outputs_and_gradients(classes_always, hierarchical):
    if hierarchical:
        layer = keras_moe.HierarchicalMixtureOfExperts(3, 3, hidden_units=10, k=2, seed=2)
        layer_checks.randomise_weights(layer, 2, input_shape=(None, 6))
    else:
        layer = _layer(9, 2, seed=2)
    assert dispatch.classes_pay_off(40, layer.gating.experts_per_position, 9)
    rng = np.random.default_rng(2)
    x = tf.constant(rng.normal(size=(40, 6)).astype("float32"))
    mask = tf.constant(rng.random(40) > 0.2)
    probe = tf.constant(rng.normal(size=(40, 6)).astype("float32"))
    expert_vars = [layer.expert_hidden_kernel, layer.expert_hidden_bias,
                   layer.expert_output_kernel, layer.expert_output_bias]
    variables = expert_vars + layer.gating.trainable_weights
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        sparse = tf.reduce_sum(layer(x, mask=mask) * probe)
        weights, indices = layer.gating(x, mask=mask)
        dense = tf.reduce_sum(
            dispatch.dense_mixture(x, weights, indices, *expert_vars, keras.activations.relu)
            * probe
        )
    np.testing.assert_allclose(sparse.numpy(), dense.numpy(), rtol=1e-5)
    for sparse_grad, dense_grad in zip(
        tape.gradient(sparse, [x] + variables), tape.gradient(dense, [x] + variables)
    ):
        if dense_grad is None:  # the noise kernel, unused at inference
            assert sparse_grad is None
            continue
        np.testing.assert_allclose(
            tf.convert_to_tensor(sparse_grad).numpy(),
            tf.convert_to_tensor(dense_grad).numpy(), rtol=1e-4, atol=1e-5,
        )


def test_the_layer_uses_classes_only_when_they_pay_off():
    assert dispatch.classes_pay_off(64 * 256, 2, 256)  # the paper's regime
    assert dispatch.classes_pay_off(64 * 1024, 2, 1024)
    assert not dispatch.classes_pay_off(4096, 2, 64)  # a small batch
    assert not dispatch.classes_pay_off(4096, 2, 256)  # 32 rows per expert
    assert not dispatch.classes_pay_off(64 * 1024, 2, 8)  # classes of one expert
    assert not dispatch.classes_pay_off(None, 2, 64)  # unknown when traced
    calls = []
    layer = _layer(16, 2, seed=1)
    original = dispatch.plan_classes
    try:
        dispatch.plan_classes = lambda *a, **kw: calls.append(1) or original(*a, **kw)
        x = np.random.default_rng(1).normal(size=(16384, 6)).astype("float32")
        np.testing.assert_allclose(
            _np(layer(x)), layer_checks.dense_reference(layer, x), rtol=1e-4, atol=1e-5
        )
        assert calls
    finally:
        dispatch.plan_classes = original


# Gated (SwiGLU) experts on the same dispatch ------------------------------


@pytest.mark.parametrize("mode", ["dropless", "capacity", "classes"])
def test_gated_experts_equal_the_dense_reference(mode, request):
    if mode == "classes":
        request.getfixturevalue("classes_always")
    layer = keras_moe.MixtureOfExperts(
        9, 10, k=2, seed=6, experts="gated",
        capacity_factor=9.0 if mode == "capacity" else None,
    )
    layer_checks.randomise_weights(layer, 6, input_shape=(None, 6))
    assert list(layer.expert_variables) == [
        "expert_gate_kernel", "expert_up_kernel", "expert_down_kernel"]
    assert layer.expert_gate_kernel.shape == (9, 6, 10)
    assert layer.expert_down_kernel.shape == (9, 10, 6)
    assert layer.get_config()["activation"] == "silu"
    rng = np.random.default_rng(6)
    x = tf.constant(rng.normal(size=(30, 6)).astype("float32"))
    probe = tf.constant(rng.normal(size=(30, 6)).astype("float32"))
    weights, indices = (_np(t) for t in layer.gating(x))
    gates = np.zeros((30, 9))
    np.put_along_axis(gates, indices, weights, axis=1)
    expected = reference.gated_moe_output(
        x.numpy(), gates, *[_np(v) for v in layer.expert_variables.values()]
    )
    variables = list(layer.expert_variables.values()) + [layer.gating.gate_kernel]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = layer(x)
        sparse = tf.reduce_sum(y * probe)
        w, i = layer.gating(x)
        dense = tf.reduce_sum(dispatch.dense_experts_mixture(
            x, w, i, tuple(layer.expert_variables.values()), layer._run_experts) * probe)
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-4, atol=1e-5)
    for got, want in zip(tape.gradient(sparse, [x] + variables),
                         tape.gradient(dense, [x] + variables)):
        np.testing.assert_allclose(
            tf.convert_to_tensor(got).numpy(), tf.convert_to_tensor(want).numpy(),
            rtol=1e-4, atol=1e-5)


def test_experts_argument_is_checked():
    with pytest.raises(ValueError, match="`experts` must be one of"):
        keras_moe.MixtureOfExperts(4, 8, experts="swiglu")


# Blocks (JAX's dropless default): static shapes -----------------------------


@pytest.mark.parametrize("block", [1, 4, 16])
def test_block_plan_has_static_rows_and_equals_the_dense_reference(block):
    layer = _layer(6, 2, seed=12)
    rng = np.random.default_rng(12)
    x = rng.normal(size=(40, 6)).astype("float32")
    mask = rng.random(40) > 0.2
    weights, indices = layer.gating(x, mask=mask)
    plan = dispatch.plan_blocks(indices, 6, block, mask=mask)
    # At most N*k + E*(B-1) rows whatever the routing, in whole blocks.
    rows = _np(plan.slot_positions).size
    assert rows == dispatch.block_count(80, 6, block) * block
    assert rows < 80 + 6 * (block - 1) + block  # plus the last block's rounding
    # Every block's rows belong to its expert.
    slots, experts = _np(plan.slot_positions), _np(plan.block_experts)
    chosen = _np(indices)
    for b in range(slots.shape[0]):
        for position in slots[b][slots[b] < 40]:
            assert experts[b] in chosen[position] and mask[position]
    y = _np(dispatch.block_mixture(
        x, weights, plan, layer._expert_weights(), layer._run_experts))
    expected = layer_checks.dense_reference(layer, x)
    expected[~mask] = 0.0
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
