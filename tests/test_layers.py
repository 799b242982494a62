"""MixtureOfExperts and HierarchicalMixtureOfExperts behaviour."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import keras_moe
from keras_moe import gating
from tests import layer_checks
from tests import reference
from tests.subprocesses import run_python


def _np(x):
    return ops.convert_to_numpy(x)


@pytest.mark.parametrize("num_experts,k", [(4, 1), (8, 2), (6, 6)])
def test_output_equals_dense_sum_of_gated_experts(num_experts, k):
    layer = keras_moe.MixtureOfExperts(num_experts, hidden_units=12, k=k, output_units=3)
    x = np.random.default_rng(1).normal(size=(4, 5, 7)).astype("float32")
    layer.build(x.shape)
    layer_checks.randomise_weights(layer, seed=num_experts)
    y = _np(layer(x, training=False))
    assert y.shape == (4, 5, 3)
    expected = layer_checks.dense_reference(layer, x.reshape(-1, 7))
    np.testing.assert_allclose(y.reshape(-1, 3), expected, rtol=1e-4, atol=1e-4)


def test_hierarchical_output_equals_dense_sum():
    layer = keras_moe.HierarchicalMixtureOfExperts(3, 4, hidden_units=10, k=2)
    x = np.random.default_rng(2).normal(size=(9, 6)).astype("float32")
    layer.build(x.shape)
    layer_checks.randomise_weights(layer, seed=3)
    y = _np(layer(x))
    g = layer.gating
    dense_gates, _, _ = reference.hierarchical_gating(
        x, g.gate_kernel.numpy(), None, g.group_gate_kernel.numpy(), None, 3, 4, 2
    )
    expected = reference.moe_output(x, dense_gates, *layer_checks.expert_arrays(layer))
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_unchosen_expert_weights_do_not_change_the_output():
    layer = keras_moe.MixtureOfExperts(8, hidden_units=16, k=2)
    x = np.random.default_rng(3).normal(size=(6, 4)).astype("float32")
    layer.build(x.shape)
    layer_checks.randomise_weights(layer, seed=4)
    chosen = set(_np(layer.gating(x)[1]).ravel())
    unchosen = sorted(set(range(8)) - chosen)
    assert unchosen, "the test needs an expert no position chose"
    before = _np(layer(x))
    for weight in [layer.expert_hidden_kernel, layer.expert_output_kernel,
                   layer.expert_hidden_bias, layer.expert_output_bias]:
        values = weight.numpy()
        values[unchosen] = 1e3
        weight.assign(values)
    np.testing.assert_array_equal(_np(layer(x)), before)
    values = layer.expert_output_bias.numpy()
    values[sorted(chosen)[0]] += 1.0
    layer.expert_output_bias.assign(values)
    assert not np.allclose(_np(layer(x)), before)


def test_masked_positions_output_zero_and_mask_is_passed_on():
    inputs = keras.Input(shape=(None,), dtype="int32")
    embedded = keras.layers.Embedding(20, 8, mask_zero=True)(inputs)
    moe = keras_moe.MixtureOfExperts(4, hidden_units=8, name="moe")
    outputs = moe(embedded)
    model = keras.Model(inputs, outputs)
    tokens = np.array([[3, 4, 5, 0, 0], [7, 0, 0, 0, 0]], "int32")
    y = _np(model(tokens))
    np.testing.assert_array_equal(y[tokens == 0], 0.0)
    assert np.abs(y[tokens != 0]).sum() > 0
    eager = moe(keras.layers.Embedding(20, 8, mask_zero=True)(tokens))
    np.testing.assert_array_equal(
        _np(eager._keras_mask), tokens != 0
    )


def test_masked_positions_do_not_count_in_the_balancing_loss():
    layer = keras_moe.MixtureOfExperts(4, hidden_units=8, noisy_gating=False, seed=1)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 6, 5)).astype("float32")
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], bool)
    layer.build(x.shape)
    layer_checks.randomise_weights(layer, seed=5)
    layer(x, training=True, mask=mask)
    masked_loss = _np(layer.losses[0])
    garbage = x.copy()
    garbage[~mask] = 100.0
    layer(garbage, training=True, mask=mask)
    np.testing.assert_allclose(_np(layer.losses[0]), masked_loss, rtol=1e-6)
    _, load, importance = reference.noisy_gating(
        x[mask], layer.gating.gate_kernel.numpy(), None, 2
    )
    np.testing.assert_allclose(masked_loss, reference.balancing_loss(importance, load), rtol=1e-4)


def _lstm_moe_model(vocab=30, num_experts=4, layer_cls=keras_moe.MixtureOfExperts, **kwargs):
    inputs = keras.Input(shape=(None,), dtype="int32")
    x = keras.layers.Embedding(vocab, 16, mask_zero=True)(inputs)
    x = keras.layers.LSTM(16, return_sequences=True)(x)
    if layer_cls is keras_moe.MixtureOfExperts:
        x = layer_cls(num_experts, hidden_units=32, seed=1, name="moe", **kwargs)(x)
    else:
        x = layer_cls(2, 2, hidden_units=32, seed=1, name="moe", **kwargs)(x)
    outputs = keras.layers.Dense(vocab)(x)
    return keras.Model(inputs, outputs)


def _copy_task(num=256, length=8, vocab=30, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, size=(num, length)).astype("int32")
    lengths = rng.integers(3, length + 1, size=num)
    tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0
    return tokens, tokens.copy()


@pytest.mark.parametrize(
    "layer_cls,kwargs",
    [
        (keras_moe.MixtureOfExperts, {}),
        (keras_moe.MixtureOfExperts, {"capacity_factor": 2.0}),
        (keras_moe.HierarchicalMixtureOfExperts, {}),
    ],
)
def test_lstm_moe_model_trains_with_fit(layer_cls, kwargs):
    keras.utils.set_random_seed(0)
    model = _lstm_moe_model(layer_cls=layer_cls, **kwargs)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    tokens, targets = _copy_task()
    history = model.fit(tokens, targets, epochs=4, batch_size=32, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.7 * losses[0], losses
    moe = model.get_layer("moe")
    model(tokens[:4], training=True)
    assert len(moe.losses) == 1 and float(_np(moe.losses[0])) >= 0
    model(tokens[:4], training=False)
    assert moe.losses == []


def test_keras_save_load_and_saved_model_export(tmp_path):
    keras.utils.set_random_seed(1)
    model = _lstm_moe_model()
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    tokens, targets = _copy_task(num=64)
    model.fit(tokens, targets, epochs=1, verbose=0)
    expected = model.predict(tokens, verbose=0)

    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_allclose(reloaded.predict(tokens, verbose=0), expected, rtol=1e-5, atol=1e-5)

    export_dir = os.path.join(tmp_path, "export")
    model.export(export_dir, verbose=False)
    loaded = tf.saved_model.load(export_dir)  # keep it alive while serving
    served = loaded.serve(tf.constant(tokens))
    np.testing.assert_allclose(served.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_exported_graph_has_no_random_ops(tmp_path):
    model = _lstm_moe_model()
    export_dir = os.path.join(tmp_path, "export")
    model.export(export_dir, verbose=False)
    loaded = tf.saved_model.load(export_dir)
    graph = loaded.serve.get_concrete_function(
        tf.TensorSpec([None, None], tf.int32)
    ).graph.as_graph_def()
    ops_used = {node.op for node in graph.node}
    for function in graph.library.function:
        ops_used |= {node.op for node in function.node_def}
    assert not any("Random" in op for op in ops_used), sorted(ops_used)


def test_runs_in_sequential_and_subclassed_models():
    x = np.random.default_rng(0).normal(size=(3, 4, 6)).astype("float32")
    sequential = keras.Sequential([keras.Input((4, 6)), keras_moe.MixtureOfExperts(4, 8)])
    assert sequential(x).shape == (3, 4, 6)

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.moe = keras_moe.HierarchicalMixtureOfExperts(2, 3, 8, output_units=5)

        def call(self, inputs, training=None):
            return self.moe(inputs, training=training)

    assert Subclassed()(x).shape == (3, 4, 5)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: keras_moe.MixtureOfExperts(0, 8), "num_experts"),
        (lambda: keras_moe.MixtureOfExperts(4, 0), "hidden_units"),
        (lambda: keras_moe.MixtureOfExperts(4, 8, k=0), "`k`"),
        (lambda: keras_moe.MixtureOfExperts(4, 8, k=5), "`k`"),
        (lambda: keras_moe.MixtureOfExperts(4, 8, capacity_factor=0.0), "capacity_factor"),
        (lambda: keras_moe.MixtureOfExperts(4, 8, output_units=-1), "output_units"),
        (lambda: keras_moe.HierarchicalMixtureOfExperts(0, 2, 8), "num_groups"),
        (lambda: keras_moe.HierarchicalMixtureOfExperts(2, 0, 8), "experts_per_group"),
        (lambda: keras_moe.HierarchicalMixtureOfExperts(4, 2, 8, k=3), "`k`"),
        (lambda: keras_moe.HierarchicalMixtureOfExperts(2, 4, 8, k=3), "`k`"),
    ],
)
def test_bad_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "layer",
    [
        lambda: keras_moe.MixtureOfExperts(4, 8),
        lambda: keras_moe.HierarchicalMixtureOfExperts(2, 2, 8),
        lambda: gating.NoisyTopKGating(4),
    ],
)
def test_bad_inputs_raise(layer):
    with pytest.raises(ValueError, match="rank >= 2"):
        layer()(np.ones((5,), "float32"))
    with pytest.raises(ValueError, match="rank >= 2"):
        layer()(keras.Input(batch_shape=(5,)))
    with pytest.raises(ValueError, match="last \\(feature\\) dimension"):
        layer()(keras.Input(shape=(3, None)))
    with pytest.raises(ValueError, match="floating-point"):
        layer()(np.ones((2, 3), "int32"))
    with pytest.raises(ValueError, match="floating-point"):
        layer()(keras.Input(shape=(3,), dtype="int32"))


@pytest.mark.parametrize("case", range(len(layer_checks.public_layer_cases())))
def test_every_public_layer_passes_the_shared_checks(case, tmp_path):
    layer_checks.check_public_layer(case, tmp_path)


def test_the_moe_layers_pass_the_shared_checks_on_jax(tmp_path):
    # The two MoE layers (their gates inside them): every check, gradients
    # by jax.grad of the stateless call included. One process, as JAX
    # compiles every layer anew.
    cases = [
        case for case, (cls, kwargs, *_) in enumerate(layer_checks.public_layer_cases())
        if cls.__name__.endswith("MixtureOfExperts") and "capacity_factor" not in kwargs
    ]
    assert len(cases) == 2
    run_python(
        "from tests import layer_checks\n"
        f"for case in {cases!r}:\n"
        f"    layer_checks.check_public_layer(case, {str(tmp_path)!r})\n"
        "print('DONE')\n",
        tmp_path, env_extra={"KERAS_BACKEND": "jax"}, timeout=600,
    )


def test_expert_kernels_are_initialised_per_expert():
    layer = keras_moe.MixtureOfExperts(64, hidden_units=256)
    layer.build((None, 128))
    # glorot_uniform of one [128, 256] kernel: std sqrt(2 / (128 + 256)).
    std = layer.expert_hidden_kernel.numpy().std()
    np.testing.assert_allclose(std, np.sqrt(2.0 / 384), rtol=0.02)


@pytest.mark.parametrize("capacity_factor", [None, 8.0])
def test_softmax_router_moe_equals_the_dense_mixture_of_its_gates(capacity_factor):
    router = gating.SoftmaxTopKGating(6, k=3, normalize=False)
    layer = keras_moe.MixtureOfExperts(6, 10, router=router, capacity_factor=capacity_factor)
    layer_checks.randomise_weights(layer, seed=8, input_shape=(None, 7))
    assert layer.gating is router
    x = np.random.default_rng(8).normal(size=(20, 7)).astype("float32")
    gates, _, _ = reference.softmax_router(x @ router.gate_kernel.numpy(), 3, normalize=False)
    expected = reference.moe_output(x, gates, *layer_checks.expert_arrays(layer))
    np.testing.assert_allclose(_np(layer(x)), expected, rtol=1e-4, atol=1e-5)
    layer(x, training=True)
    assert len(layer.losses) == 1  # the router's balancing loss
    assert layer.routing_statistics()["positions"] == 20.0


@pytest.mark.parametrize("gate", [False, True])
def test_shared_experts_add_their_output_to_every_unmasked_position(gate):
    layer = keras_moe.MixtureOfExperts(
        6, 10, k=2, shared_experts=2, shared_expert_gate=gate, seed=3
    )
    layer_checks.randomise_weights(layer, seed=3, input_shape=(None, 7))
    assert len(layer.trainable_weights) == 2 + 4 + 4 + int(gate)
    assert "shared_hidden_kernel" not in layer.expert_variables  # not sharded
    rng = np.random.default_rng(3)
    x = rng.normal(size=(20, 7)).astype("float32")
    mask = rng.random(20) > 0.3
    w1, b1, w2, b2 = (
        _np(v) for v in (layer.shared_hidden_kernel, layer.shared_hidden_bias,
                         layer.shared_output_kernel, layer.shared_output_bias)
    )
    shared = sum(np.maximum(x @ w1[s] + b1[s], 0.0) @ w2[s] + b2[s] for s in range(2))
    if gate:
        shared = shared / (1.0 + np.exp(-(x @ _np(layer.shared_expert_gate_kernel))))
    expected = layer_checks.dense_reference(layer, x) + shared
    expected[~mask] = 0.0
    np.testing.assert_allclose(_np(layer(x, mask=mask)), expected, rtol=1e-4, atol=1e-4)
    config = layer.get_config()
    assert config["shared_experts"] == 2 and config["shared_expert_gate"] is gate
