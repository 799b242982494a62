"""The upstream behaviours `keras_moe.compat` works around, pinned down.

Each test fails when Keras or TensorFlow changes the behaviour (or the
internal) a compat function relies on: then that workaround can go, or
must change.
"""

import textwrap
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_moe import compat
from tests.subprocesses import run_python


class _LossLayer(keras.layers.Layer):
    def call(self, x):
        self.add_loss(keras.ops.sum(x))
        return x


class _PerThreadLossLayer(compat.PerThreadLosses, _LossLayer):
    pass


def test_keras_keeps_call_losses_in_the_private_losses_list():
    # PerThreadLosses overrides `Layer._losses`: Keras must still append
    # `add_loss` values there, read `losses` from it and clear it per call.
    layer = _LossLayer()
    layer(np.ones((2,), "float32"))
    assert isinstance(layer._losses, list) and len(layer._losses) == 1
    assert layer.losses == layer._losses
    layer(np.ones((2,), "float32"))
    assert len(layer._losses) == 1


def test_per_thread_losses_keep_each_threads_own_losses():
    layer = _PerThreadLossLayer()
    layer(np.ones((2,), "float32"))
    seen = {}

    def other_thread():
        seen["before"] = list(layer.losses)
        layer(np.full((2,), 3.0, "float32"))
        seen["after"] = [float(loss) for loss in layer.losses]

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert seen == {"before": [], "after": [6.0]}
    assert [float(loss) for loss in layer.losses] == [2.0]


def test_flatten_layers_finds_layers_nested_in_custom_layers():
    class Outer(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.inner = keras.layers.Dense(2, name="inner_dense")

        def call(self, x):
            return self.inner(x)

    inputs = keras.Input((3,))
    model = keras.Model(inputs, Outer()(inputs))
    names = [layer.name for layer in compat.flatten_layers(model)]
    assert "inner_dense" in names
    assert "inner_dense" not in [layer.name for layer in model.layers]


def test_in_xla_context_sees_jit_compile():
    assert compat.in_xla_context() is False
    seen = []

    @tf.function(jit_compile=True)
    def compiled(x):
        seen.append(compat.in_xla_context())
        seen.append(compat.in_tensorflow_xla_context())
        return x + 1

    compiled(tf.constant(1.0))
    assert seen == [True, True]
    assert compat.in_tensorflow_xla_context() is False


def test_standard_normal_draws_keras_samples_and_normal_ones_under_xla():
    # Without XLA: Keras' own samples (auto_select is Philox on CPU), and the
    # generator advances as Keras' does.
    ours, theirs = keras.random.SeedGenerator(7), keras.random.SeedGenerator(7)
    for _ in range(2):
        np.testing.assert_array_equal(
            compat.standard_normal((64, 8), ours).numpy(),
            keras.random.normal((64, 8), seed=theirs).numpy(),
        )
    # Under XLA (XLA's Philox: other samples than the kernel's, as Keras'
    # own draw under XLA is): standard normal, fresh at every call.
    generator = keras.random.SeedGenerator(7)
    compiled = tf.function(
        lambda: compat.standard_normal((512, 512), generator),
        jit_compile=True,
    )
    first, second = compiled().numpy(), compiled().numpy()
    assert abs(first.mean()) < 0.01 and abs(first.std() - 1.0) < 0.01
    assert abs(np.corrcoef(first.ravel(), second.ravel())[0, 1]) < 0.01


def _gather_index_dtypes(function, *args):
    graph = tf.function(function).get_concrete_function(*args).graph
    return {
        graph.get_tensor_by_name(op.inputs[1].name).dtype
        for op in graph.get_operations() if op.type == "GatherV2"
    }


def _assert_same_values_and_gradients(take, reference, values, seed):
    """`take(values)` equals `reference(values)`, and so does the gradient
    of a random linear function of it; returns the taken values."""
    results = []
    for function in (reference, take):
        with tf.GradientTape() as tape:
            tape.watch(values)
            taken = function(values)
            upstream = tf.random.stateless_normal(taken.shape, seed=seed)
            loss = tf.reduce_sum(taken * upstream)
        results.append((taken.numpy(), tape.gradient(loss, values).numpy()))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    return results[1][0]


def test_take_helpers_are_keras_take_along_axis_with_int32_indices():
    # Upstream: Keras' TensorFlow take_along_axis gathers with int64
    # indices (whose gradient is the slow one).
    values = tf.random.stateless_normal((6, 4, 9), seed=(0, 1))
    indices = tf.constant(
        np.random.default_rng(0).integers(0, 9, (6, 4, 3)), tf.int32
    )
    assert _gather_index_dtypes(
        lambda v: keras.ops.take_along_axis(v, indices, axis=-1), values
    ) == {tf.int64}
    assert _gather_index_dtypes(
        lambda v: compat.take_along_last_axis(v, indices), values
    ) == {tf.int32}
    taken = _assert_same_values_and_gradients(
        lambda v: compat.take_along_last_axis(v, indices),
        lambda v: keras.ops.take_along_axis(v, indices, axis=-1),
        values, seed=(0, 2),
    )
    np.testing.assert_array_equal(
        taken, np.take_along_axis(values.numpy(), indices.numpy(), axis=-1)
    )
    # take_per_row: whole rows of the second axis.
    rows = tf.constant(
        np.random.default_rng(1).integers(0, 4, (6, 2)), tf.int32
    )
    taken = _assert_same_values_and_gradients(
        lambda v: compat.take_per_row(v, rows),
        lambda v: keras.ops.take_along_axis(v, rows[..., None], axis=1),
        values, seed=(0, 3),
    )
    np.testing.assert_array_equal(
        taken, values.numpy()[np.arange(6)[:, None], rows.numpy()]
    )


def test_keras_variables_keep_their_storage_in_value():
    variable = keras.Variable(np.zeros((2,), "float32"))
    replacement = tf.Variable(np.ones((2,), "float32"))
    compat.replace_variable_storage(variable, replacement)
    assert variable.value is replacement
    variable.assign([2.0, 3.0])
    np.testing.assert_array_equal(replacement.numpy(), [2.0, 3.0])


def test_fit_evaluate_predict_use_pinned_step_functions():
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer="sgd", loss="mse")
    calls = []

    def step(name, result):
        def function(iterator):
            batches = list(iterator)
            if not batches:
                raise StopIteration
            calls.append(name)
            return result
        return function

    compat.pin_step_functions(
        model,
        step("train", {"loss": np.float32(1.0)}),
        step("test", {"loss": np.float32(2.0)}),
        step("predict", tf.zeros((4, 1))),
    )
    x, y = np.zeros((4, 2), "float32"), np.zeros((4, 1), "float32")
    model.fit(x, y, epochs=1, verbose=0)
    model.evaluate(x, y, verbose=0)
    model.predict(x, verbose=0)
    assert calls == ["train", "test", "predict"]


def test_optimizers_create_slots_and_apply_through_the_wrapped_methods():
    variables = [keras.Variable(np.ones((3,), "float32")),
                 keras.Variable(np.ones((2, 2), "float32"))]
    optimizer = keras.optimizers.Adam(0.1)
    slots, applied = [], []
    compat.wrap_optimizer(
        optimizer,
        on_slot_created=lambda slot, reference: slots.append(
            (tuple(slot.shape), tuple(reference.shape))
        ),
        transform_gradients=lambda grads: applied.append(len(grads)) or [
            g * 0.0 for g in grads
        ],
    )
    optimizer.build(variables)
    # Adam: a first and a second moment per variable.
    assert sorted(slots) == sorted([((3,), (3,)), ((2, 2), (2, 2))] * 2)
    optimizer.apply_gradients(
        [(tf.ones((3,)), variables[0]), (tf.ones((2, 2)), variables[1])]
    )
    assert applied == [2]
    # The transformed (zero) gradients were the ones applied.
    np.testing.assert_allclose(variables[0].numpy(), 1.0)


def test_multi_worker_strategy_still_needs_the_elementwise_reduce(tmp_path):
    # keras-team/keras#20585: MultiWorkerMirroredStrategy cannot reduce a
    # scalar over axis 0, as Keras' fit asks; our reduce can. When the first
    # assertion fails, upstream has fixed it and the workaround can go.
    run_python(textwrap.dedent(
        """
        import tensorflow as tf
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        scalar = strategy.run(lambda: tf.constant(2.0))
        try:
            strategy.reduce("MEAN", scalar, axis=0)
        except Exception as error:
            assert "reduction dimension" in str(error), error
        else:
            raise AssertionError("upstream reduces scalars over axis 0 now")
        from keras_moe import compat
        compat.elementwise_strategy_reduce(strategy)
        assert float(strategy.reduce("MEAN", scalar, axis=0)) == 2.0
        pair = strategy.run(lambda: (tf.constant([1.0, 3.0]), tf.constant(4.0)))
        vector, number = strategy.reduce("MEAN", pair, axis=0)
        assert float(vector) == 2.0 and float(number) == 4.0
        print("DONE")
        """
    ), tmp_path, timeout=300)


def test_process_mesh_is_remembered():
    before = compat.claimed_process_mesh()
    try:
        compat.claim_process_mesh("mesh-a")
        assert compat.claimed_process_mesh() == "mesh-a"
    finally:
        compat._process_mesh[:] = [] if before is None else [before]


@pytest.mark.parametrize("name", ["add_variable_from_reference", "apply"])
def test_optimizer_methods_keep_their_signatures(name):
    import inspect

    parameters = list(inspect.signature(
        getattr(keras.optimizers.Adam(), name)
    ).parameters)
    expected = {
        "add_variable_from_reference": ["reference_variable", "name"],
        "apply": ["grads", "trainable_variables"],
    }[name]
    assert parameters[: len(expected)] == expected


def test_dtensor_gaps_that_expert_parallel_works_around(tmp_path):
    # ExpertParallel applies gradients densely and replicated (see
    # ExpertParallel._watch_optimizer): TF 2.21's DTensor has no layout
    # propagation for sparse updates, and Adam with a gradient sharded like
    # its variable reads stale slots. When either assertion fails, upstream
    # changed and the workaround may go.
    run_python(textwrap.dedent(
        """
        import numpy as np
        from keras_moe import compat, distribution, expert_parallel
        distribution.use_virtual_cpu_devices(2)
        import tensorflow as tf
        from tensorflow.experimental import dtensor
        import keras

        parallel = expert_parallel.ExpertParallel()
        table = keras.Variable(np.ones((4, 3), "float32"))
        parallel._place(table, parallel.replicated(2))

        @tf.function
        def sparse_update():
            table.value.scatter_sub(tf.IndexedSlices(tf.ones((1, 3)), tf.constant([1])))

        try:
            with dtensor.default_mesh(parallel.mesh):
                sparse_update()
        except Exception as error:
            assert "does not implement layout propagation" in str(error), error
        else:
            raise AssertionError("DTensor propagates layouts of sparse updates now")

        def adam(gradient_layout):
            weights = keras.Variable(np.arange(8, dtype="float32").reshape(4, 2))
            parallel._place(weights, parallel.expert_layout(2))
            optimizer = keras.optimizers.Adam(0.1)
            compat.wrap_optimizer(optimizer, on_slot_created=lambda slot, reference:
                                  parallel._place(slot, parallel.layout_of(reference)))
            optimizer.build([weights])
            parallel._place_remaining(optimizer.variables)
            gradient = np.linspace(-1, 1, 8, dtype="float32").reshape(4, 2)

            @tf.function
            def step():
                optimizer.apply([parallel.pack(gradient, gradient_layout)], [weights])

            with dtensor.default_mesh(parallel.mesh):
                for _ in range(3):
                    step()
            return parallel.to_numpy(weights)

        # Three Adam steps of 0.1 against a constant gradient move each
        # weight by 0.3 against its sign.
        want = np.arange(8, dtype="float32").reshape(4, 2) - 0.3 * np.sign(
            np.linspace(-1, 1, 8, dtype="float32").reshape(4, 2))
        np.testing.assert_allclose(adam(parallel.replicated(2)), want, atol=1e-4)
        sharded = adam(parallel.expert_layout(2))
        assert np.abs(sharded - want).max() > 1.0, "DTensor updates sharded gradients right now"
        print("DONE")
        """
    ), tmp_path, timeout=300)
