"""Reliability: mixed precision, determinism, resumable training, edge cases,
serving (property tests are in test_properties.py)."""

import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import keras_moe
from keras_moe import callbacks as moe_callbacks
from keras_moe import dispatch
from tests import layer_checks
from tests.subprocesses import run_python

def _np(x):
    return ops.convert_to_numpy(x)


def _copy_model(num_experts=8, vocab=20, **moe_kwargs):
    inputs = keras.Input(shape=(None,), dtype="int32")
    x = keras.layers.Embedding(vocab, 16)(inputs)
    x = keras.layers.LSTM(16, return_sequences=True)(x)
    x = keras_moe.MixtureOfExperts(num_experts, 32, seed=1, name="moe", **moe_kwargs)(x)
    return keras.Model(inputs, keras.layers.Dense(vocab, dtype="float32")(x))


def _copy_data(num=128, length=6, vocab=20, seed=0):
    tokens = np.random.default_rng(seed).integers(0, vocab, size=(num, length))
    return tokens.astype("int32"), tokens.astype("int32")


def _run_script(script, tmp_path):
    return run_python(textwrap.dedent(script), tmp_path)


# Mixed precision ------------------------------------------------------------


def test_mixed_float16_training_converges_like_float32():
    tokens, targets = _copy_data()
    finals = {}
    for policy in ("float32", "mixed_float16"):
        keras.mixed_precision.set_global_policy(policy)
        try:
            keras.utils.set_random_seed(0)
            model = _copy_model()
            # compile wraps the optimizer in a LossScaleOptimizer for float16
            model.compile(keras.optimizers.Adam(1e-2),
                          keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            if policy == "mixed_float16":
                assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
                moe = model.get_layer("moe")
                assert moe.compute_dtype == "float16"
                routing = moe.gating.route(
                    ops.cast(np.random.default_rng(0).normal(size=(5, 16)), "float16"),
                    training=True,
                )
                assert routing.expert_weights.dtype == "float32"
            history = model.fit(tokens, targets, batch_size=32, epochs=12, verbose=0)
            losses = history.history["loss"]
            assert np.all(np.isfinite(losses)), losses
            for weight in model.weights:
                assert np.all(np.isfinite(_np(weight))), weight.path
            finals[policy] = losses
        finally:
            keras.mixed_precision.set_global_policy("float32")
    f32, f16 = finals["float32"], finals["mixed_float16"]
    assert f32[-1] < 0.6 * f32[0] and f16[-1] < 0.6 * f16[0], finals
    assert abs(f16[-1] - f32[-1]) < 0.15 * f32[-1], finals


# Determinism ----------------------------------------------------------------


def test_same_seed_gives_bitwise_identical_training_and_seeds_change_the_noise(tmp_path):
    # enable_op_determinism is process-wide: run it in its own process.
    _run_script(
        """
        import numpy as np, tensorflow as tf, keras
        import keras_moe
        tf.config.experimental.enable_op_determinism()
        tokens = np.random.default_rng(0).integers(0, 20, size=(64, 6)).astype("int32")

        def train(seed):
            keras.utils.set_random_seed(seed)
            inputs = keras.Input(shape=(None,), dtype="int32")
            x = keras.layers.Embedding(20, 16)(inputs)
            x = keras.layers.LSTM(16, return_sequences=True)(x)
            x = keras.layers.Dropout(0.2)(x)
            x = keras_moe.MixtureOfExperts(8, 32, name="moe")(x)  # seed from the global one
            model = keras.Model(inputs, keras.layers.Dense(20)(x))
            model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            model.fit(tokens, tokens, batch_size=16, epochs=2, verbose=0)  # shuffled
            return model

        first, second, other = train(7), train(7), train(8)
        for a, b in zip(first.weights, second.weights):
            assert np.array_equal(a.numpy(), b.numpy()), a.path
        for a, b in zip(first.optimizer.variables, second.optimizer.variables):
            assert np.array_equal(a.numpy(), b.numpy()), a.path

        # Same kernels, same input: the noise follows the global seed.
        x = np.random.default_rng(1).normal(size=(32, 16)).astype("float32")
        def noisy_gates(seed):
            keras.utils.set_random_seed(seed)
            gate = keras_moe.NoisyTopKGating(8, k=2)  # seed from the global one
            gate.build((None, 16))
            gate.gate_kernel.assign(np.random.default_rng(2).normal(size=(16, 8)).astype("float32"))
            gate.noise_kernel.assign(np.ones((16, 8), "float32"))
            return np.asarray(gate.route(x, training=True).expert_weights)
        assert np.array_equal(noisy_gates(3), noisy_gates(3))
        assert not np.allclose(noisy_gates(3), noisy_gates(4))
        print("DONE")
        """,
        tmp_path,
    )


# Resumable training ------------------------------------------------------------


class _Interrupt(keras.callbacks.Callback):
    """Stops training with an exception at (epoch, batch)."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.at = (epoch, batch)
        self.epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise RuntimeError("interrupted")


def _resumable_fit(backup_dir, interrupt=None):
    keras.utils.set_random_seed(5)
    model = _copy_model(capacity_factor=1.0)
    model.compile(keras.optimizers.Adam(1e-2),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    tokens, targets = _copy_data()
    callbacks = [moe_callbacks.RoutingStatistics(),
                 keras.callbacks.BackupAndRestore(backup_dir)]
    if interrupt:
        callbacks.append(_Interrupt(*interrupt))
    model.fit(tokens, targets, batch_size=32, epochs=4, shuffle=False,
              callbacks=callbacks, verbose=0)
    return model


def _state(model):
    return {
        "weights": [np.array(_np(v)) for v in model.weights],
        "optimizer": [np.array(_np(v)) for v in model.optimizer.variables],
        "routing": model.get_layer("moe").routing_statistics(),
    }


def _assert_same_state(got, want):
    for a, b in zip(got["weights"], want["weights"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(got["optimizer"], want["optimizer"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for key, value in want["routing"].items():
        np.testing.assert_allclose(got["routing"][key], value, rtol=1e-6, atol=1e-7)


def test_backup_and_restore_resumes_to_the_uninterrupted_state(tmp_path):
    want = _state(_resumable_fit(str(tmp_path / "straight")))
    backup = str(tmp_path / "resumed")
    with pytest.raises(RuntimeError, match="interrupted"):
        _resumable_fit(backup, interrupt=(2, 1))  # part way through epoch 3
    resumed = _resumable_fit(backup)  # a fresh model, as after a restart
    assert resumed.optimizer.iterations.numpy() == 4 * 4
    _assert_same_state(_state(resumed), want)


def test_backup_and_restore_under_mirrored_strategy(tmp_path):
    _run_script(
        """
        import os, numpy as np
        from keras_moe import distribution
        distribution.use_virtual_cpu_devices(2)
        from keras_moe import callbacks as moe_callbacks
        strategy = distribution.mirrored_strategy()
        import keras, keras_moe, tensorflow as tf

        class Interrupt(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.epoch = epoch
            def on_train_batch_end(self, batch, logs=None):
                if (self.epoch, batch) == (2, 1):
                    raise RuntimeError("interrupted")

        tokens = np.random.default_rng(0).integers(0, 20, size=(128, 6)).astype("int32")

        def run(backup_dir, interrupt=False):
            keras.utils.set_random_seed(5)
            with strategy.scope():
                inputs = keras.Input(shape=(None,), dtype="int32")
                x = keras.layers.Embedding(20, 16)(inputs)
                x = keras.layers.LSTM(16, return_sequences=True)(x)
                x = keras_moe.MixtureOfExperts(8, 32, seed=1, capacity_factor=1.0, name="moe")(x)
                model = keras.Model(inputs, keras.layers.Dense(20)(x))
                model.compile(keras.optimizers.Adam(1e-2),
                              keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            callbacks = [moe_callbacks.RoutingStatistics(), keras.callbacks.BackupAndRestore(backup_dir)]
            if interrupt:
                callbacks.append(Interrupt())
            model.fit(tokens, tokens, batch_size=32, epochs=4, shuffle=False, callbacks=callbacks, verbose=0)
            return model

        want = run({tmp!r} + "/straight")
        try:
            run({tmp!r} + "/resumed", interrupt=True)
            raise AssertionError("not interrupted")
        except RuntimeError as error:
            assert "interrupted" in str(error)
        got = run({tmp!r} + "/resumed")
        for a, b in zip(got.weights, want.weights):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
        for a, b in zip(got.optimizer.variables, want.optimizer.variables):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
        g, w = got.get_layer("moe").routing_statistics(), want.get_layer("moe").routing_statistics()
        for key in w:
            np.testing.assert_allclose(g[key], w[key], rtol=1e-6)
        print("DONE")
        """.replace("{tmp!r}", repr(str(tmp_path))),
        tmp_path,
    )


# Edge cases ------------------------------------------------------------------


def _layer_with_weights(num_experts, k=2, dim=6, seed=0, **kwargs):
    layer = keras_moe.MixtureOfExperts(num_experts, 8, k=k, seed=seed, **kwargs)
    return layer_checks.randomise_weights(layer, seed, input_shape=(None, dim))


def _loss_and_grads(layer, x, mask=None):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True, mask=mask)
        loss = tf.reduce_sum(y * y) + sum(layer.losses)
    grads = tape.gradient(loss, [x] + layer.trainable_weights)
    return y, loss, layer.losses, grads


def _assert_finite(*values):
    for value in values:
        if value is None:
            continue
        value = tf.convert_to_tensor(value)
        assert np.all(np.isfinite(value.numpy())), value


@pytest.mark.parametrize(
    "num_experts,k,num_positions,capacity_factor",
    [
        (4, 2, 1, None),  # one position
        (16, 2, 2, None),  # most experts receive nothing
        (16, 2, 2, 2.0),
        (5, 5, 7, None),  # k = num_experts
        (1, 1, 9, None),  # a single expert
        (1024, 2, 3, None),  # many experts, tiny batch
        (1024, 2, 3, 1.0),
    ],
)
def test_edge_shapes_equal_the_dense_reference_with_finite_gradients(
    num_experts, k, num_positions, capacity_factor
):
    layer = _layer_with_weights(num_experts, k=k, capacity_factor=capacity_factor)
    x = np.random.default_rng(num_experts).normal(size=(num_positions, 6)).astype("float32")
    if capacity_factor is None or capacity_factor * num_positions * k >= num_experts:
        # nothing can be dropped: exactly the dense mixture
        np.testing.assert_allclose(_np(layer(x)), layer_checks.dense_reference(layer, x), rtol=1e-5, atol=1e-5)
    y, loss, losses, grads = _loss_and_grads(layer, x)
    assert len(losses) == 1
    _assert_finite(y, loss, *losses, *grads)


def test_every_position_masked_gives_zeros_finite_losses_and_gradients():
    layer = _layer_with_weights(8)
    x = np.random.default_rng(0).normal(size=(3, 5, 6)).astype("float32")
    mask = tf.zeros((3, 5), bool)
    y, loss, losses, grads = _loss_and_grads(layer, x, mask=mask)
    np.testing.assert_array_equal(y.numpy(), 0.0)
    _assert_finite(loss, *losses, *grads)
    assert float(losses[0]) == 0.0


def test_huge_logits_route_like_a_hard_argmax_without_nans():
    layer = _layer_with_weights(8, k=2)
    layer.gating.gate_kernel.assign(_np(layer.gating.gate_kernel) * 1e4)
    x = np.random.default_rng(3).normal(size=(16, 6)).astype("float32")
    logits = x @ _np(layer.gating.gate_kernel)
    assert np.abs(logits).max() > 1e3
    routing = layer.gating.route(x, training=False)
    weights = _np(routing.expert_weights)
    _assert_finite(weights)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(
        np.sort(_np(routing.expert_indices), -1), np.sort(np.argsort(-logits, -1)[:, :2], -1)
    )
    y, loss, losses, grads = _loss_and_grads(layer, x)
    _assert_finite(y, loss, *losses, *grads)


def test_tiny_capacity_drops_most_assignments_and_reports_them():
    layer = _layer_with_weights(4, k=2, capacity_factor=0.05)
    x = np.random.default_rng(4).normal(size=(200, 6)).astype("float32")
    layer.reset_routing_statistics()
    y, loss, losses, grads = _loss_and_grads(layer, x)
    _assert_finite(y, loss, *losses, *grads)
    capacity = dispatch.capacity_for(200, 2, 4, 0.05)
    assert capacity == 5
    dropped = layer.routing_statistics()["dropped_fraction"]
    assert dropped == pytest.approx(1 - 4 * capacity / 400)
    # positions that lost both experts output zeros
    assert np.sum(np.all(y.numpy() == 0.0, axis=-1)) >= 200 - 4 * capacity


@pytest.mark.parametrize("capacity_factor", [None, 1.5])
def test_variable_batch_and_sequence_lengths_trace_once(capacity_factor):
    # noiseless, so that training-mode outputs can equal the reference
    layer = _layer_with_weights(8, capacity_factor=capacity_factor, noisy_gating=False)
    traces = []

    @tf.function(input_signature=[tf.TensorSpec([None, None, 6], tf.float32)])
    def step(x):
        traces.append(1)
        with tf.GradientTape() as tape:
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * y) + tf.add_n(layer.losses)
        return y, tape.gradient(loss, layer.trainable_weights)

    rng = np.random.default_rng(0)
    for batch, length in [(1, 1), (2, 7), (5, 3), (16, 12), (3, 40)]:
        x = rng.normal(size=(batch, length, 6)).astype("float32")
        y, grads = step(x)
        assert y.shape == (batch, length, 6)
        _assert_finite(y, *grads)
        if capacity_factor is None:
            expected = layer_checks.dense_reference(layer, x.reshape(-1, 6)).reshape(batch, length, 6)
            np.testing.assert_allclose(y.numpy(), expected, rtol=1e-4, atol=1e-4)
    assert len(traces) == 1


# Serving ---------------------------------------------------------------------


def test_exported_model_answers_every_batch_size_and_rejects_malformed_requests(tmp_path):
    keras.utils.set_random_seed(2)
    model = _copy_model(capacity_factor=2.0)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    tokens, targets = _copy_data(num=64)
    model.fit(tokens, targets, epochs=1, verbose=0)
    export_dir = str(tmp_path / "export")
    model.export(export_dir, verbose=False)
    served = tf.saved_model.load(export_dir)
    rng = np.random.default_rng(1)
    for batch in (1, 2, 7, 33, 64):
        for length in (1, 5, 12):
            x = rng.integers(0, 20, size=(batch, length)).astype("int32")
            np.testing.assert_allclose(
                served.serve(tf.constant(x)).numpy(),
                model.predict(x, batch_size=batch, verbose=0),
                rtol=1e-5, atol=1e-5,
            )
    for bad in (
        tf.zeros((2, 3, 4), tf.int32),  # wrong rank
        tf.zeros((5,), tf.int32),  # wrong rank
        tf.zeros((2, 3), tf.float32),  # wrong dtype
        tf.constant([["a", "b"]]),  # wrong dtype
    ):
        with pytest.raises((TypeError, ValueError)):
            served.serve(bad)
