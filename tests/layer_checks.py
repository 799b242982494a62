"""One helper that every public layer goes through (see STYLE.md).

`check_layer` asserts: config round trip; eager and symbolic calls agree on
shapes and dtypes; the number of trainable weights and of seed generators;
one loss when training and none at inference; a compiled `fit` step with
finite loss; every mixed-precision policy (outputs in the compute dtype,
gate values float32, finite outputs/losses/gradients); a `.keras`
save/load round trip that reproduces the predictions; and (TensorFlow) a
`model.export()` whose SavedModel serves them.
"""

import os

import keras
import numpy as np
from keras import ops


def _as_list(outputs):
    return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]


def _float_outputs(outputs):
    return [o for o in _as_list(outputs) if keras.backend.is_float_dtype(o.dtype)]


def _total(outputs, losses):
    total = sum(ops.sum(ops.cast(o, "float32")) for o in _float_outputs(outputs))
    return total + sum(losses)


def weight_gradients(layer, inputs):
    """Gradients of (sum of float outputs + losses) w.r.t. the trainable
    weights, while training, on the TensorFlow or the JAX backend."""
    if keras.backend.backend() == "jax":
        import jax

        non_trainable = [v.value for v in layer.non_trainable_variables]

        def total(trainable):
            outputs, _, losses = layer.stateless_call(
                trainable, non_trainable, inputs, training=True,
                return_losses=True,
            )
            return _total(outputs, losses)

        return jax.grad(total)([v.value for v in layer.trainable_variables])
    import tensorflow as tf

    with tf.GradientTape() as tape:
        outputs = layer(inputs, training=True)
        total = _total(outputs, layer.losses)
    return tape.gradient(total, layer.trainable_weights)


def _gradients_finite(layer, inputs):
    grads = weight_gradients(layer, inputs)
    assert len(grads) == len(layer.trainable_weights) > 0
    return all(
        g is not None and bool(np.all(np.isfinite(ops.convert_to_numpy(g))))
        for g in grads
    )


def check_layer(
    layer_cls,
    init_kwargs,
    input_shape,
    expected_output_shapes,
    expected_num_trainable_weights,
    expected_num_seed_generators=1,
    expected_num_statistics=4,
    tmp_path=None,
):
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=input_shape).astype("float32")

    # Config round trip.
    layer = layer_cls(**init_kwargs)
    config = layer.get_config()
    restored = layer_cls.from_config(config)
    assert restored.get_config() == config

    # Eager call: shapes, weights, losses.
    outputs = layer(inputs)
    shapes = [tuple(o.shape) for o in _as_list(outputs)]
    assert shapes == [tuple(s) for s in expected_output_shapes], shapes
    assert len(layer.trainable_weights) == expected_num_trainable_weights
    # Non-trainable weights are the routing-statistics accumulators only.
    assert len(layer.non_trainable_weights) == expected_num_statistics
    assert all(w.name.endswith("_total") for w in layer.non_trainable_weights)
    seed_generators = [
        sub for sub in layer._flatten_layers() for _ in sub._seed_generators
    ]
    assert len(seed_generators) == expected_num_seed_generators
    assert layer.losses == []
    layer(inputs, training=True)
    assert len(layer.losses) == 1
    assert np.isfinite(ops.convert_to_numpy(layer.losses[0]))
    layer(inputs, training=False)
    assert layer.losses == []

    # Symbolic call agrees with the eager one.
    symbolic_input = keras.Input(batch_shape=(None,) + tuple(input_shape[1:]))
    symbolic = _as_list(layer_cls(**init_kwargs)(symbolic_input))
    for sym, eager in zip(symbolic, _as_list(outputs)):
        assert tuple(sym.shape)[1:] == tuple(eager.shape)[1:]
        assert keras.backend.standardize_dtype(sym.dtype) == (
            keras.backend.standardize_dtype(eager.dtype)
        )

    # A compiled fit step, through a functional model.
    model_input = keras.Input(shape=tuple(input_shape[1:]))
    model_outputs = _float_outputs(layer_cls(**init_kwargs)(model_input))
    model = keras.Model(model_input, model_outputs[0])
    model.compile(optimizer="adam", loss="mse")
    targets = ops.convert_to_numpy(model(inputs))
    history = model.fit(inputs, targets + 1.0, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])

    # Mixed precision.
    for policy in ("mixed_float16", "mixed_bfloat16"):
        mixed = layer_cls(**init_kwargs, dtype=policy)
        mixed_outputs = _as_list(mixed(inputs, training=True))
        compute_dtype = keras.DTypePolicy(policy).compute_dtype
        for output, reference in zip(mixed_outputs, _as_list(outputs)):
            expected = keras.backend.standardize_dtype(reference.dtype)
            if expected == "float32" and len(mixed_outputs) == 1:
                expected = compute_dtype  # MoE outputs follow the policy.
            assert keras.backend.standardize_dtype(output.dtype) == expected
        for output in _float_outputs(mixed_outputs):
            assert np.all(np.isfinite(ops.convert_to_numpy(ops.cast(output, "float32"))))
        for loss in mixed.losses:
            assert keras.backend.standardize_dtype(loss.dtype) == "float32"
            assert np.isfinite(ops.convert_to_numpy(loss))
        for weight in mixed.weights:
            assert weight.dtype == "float32"
        assert _gradients_finite(mixed, inputs)

    # .keras save/load reproduces the predictions.
    if tmp_path is not None:
        path = os.path.join(str(tmp_path), "layer.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
        want = ops.convert_to_numpy(model.predict(inputs, verbose=0))
        np.testing.assert_allclose(
            ops.convert_to_numpy(loaded.predict(inputs, verbose=0)), want,
            rtol=1e-6, atol=1e-6,
        )
        # And the exported SavedModel serves them (TensorFlow: see the
        # README for export on JAX).
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            export_path = os.path.join(str(tmp_path), "exported")
            model.export(export_path, verbose=False)
            served = tf.saved_model.load(export_path)
            np.testing.assert_allclose(
                served.serve(tf.constant(inputs)).numpy(), want,
                rtol=1e-5, atol=1e-6,
            )


def public_layer_cases():
    """`(layer class, constructor arguments, output shapes, trainable
    weights, seed generators)` for every public layer, on inputs
    `(3, 4, 5)`."""
    import keras_moe

    return [
        (keras_moe.NoisyTopKGating, dict(num_experts=6, k=2, seed=1), [(3, 4, 2)] * 2, 2, 1),
        (keras_moe.HierarchicalNoisyTopKGating, dict(num_groups=3, experts_per_group=2, k=2, seed=1), [(3, 4, 4)] * 2, 4, 1),
        (keras_moe.MixtureOfExperts, dict(num_experts=6, hidden_units=8, seed=1), [(3, 4, 5)], 6, 1),
        (keras_moe.MixtureOfExperts, dict(num_experts=6, hidden_units=8, output_units=3, capacity_factor=1.5, eval_capacity_factor=2.0, noisy_gating=False), [(3, 4, 3)], 5, 1),
        (keras_moe.HierarchicalMixtureOfExperts, dict(num_groups=2, experts_per_group=3, hidden_units=8, k=2, seed=2, experts="gated"), [(3, 4, 5)], 7, 1),
        (keras_moe.SoftmaxTopKGating, dict(num_experts=6, k=2, z_loss_weight=1e-3, jitter=0.1, seed=1), [(3, 4, 2)] * 2, 1, 1),
        (keras_moe.MixtureOfExperts, dict(num_experts=6, hidden_units=8, router="softmax_top_k", capacity_factor=2.0, shared_experts=2, shared_expert_gate=True), [(3, 4, 5)], 10, 1),
    ]


def check_public_layer(case, tmp_path):
    """`check_layer` for `public_layer_cases()[case]`."""
    layer_cls, init_kwargs, output_shapes, num_weights, num_seeds = (
        public_layer_cases()[case]
    )
    check_layer(
        layer_cls,
        init_kwargs,
        input_shape=(3, 4, 5),
        expected_output_shapes=output_shapes,
        expected_num_trainable_weights=num_weights,
        expected_num_seed_generators=num_seeds,
        # The gate's 4 accumulators, and the MoE layers' dropped count.
        expected_num_statistics=5 if "hidden_units" in init_kwargs else 4,
        tmp_path=tmp_path,
    )


# Layers with random weights ----------------------------------------------


def randomise_weights(layer, seed=0, scale=0.5, input_shape=None):
    """Fills a layer's trainable weights with `N(0, scale^2)` draws.

    Builds it first when `input_shape` is given. Zero-initialised gates tie
    every expert; random ones route somewhere other than round-robin.
    Returns the layer.
    """
    if input_shape is not None:
        layer.build(input_shape)
    rng = np.random.default_rng(seed)
    for weight in layer.trainable_weights:
        weight.assign(rng.normal(size=weight.shape).astype("float32") * scale)
    return layer


# Reading a built MoE layer for the NumPy reference (tests/reference.py) ----


def expert_arrays(layer):
    """A MoE layer's stacked expert weights as NumPy arrays, in the order of
    `reference.moe_output`: hidden kernel, hidden bias, output kernel,
    output bias."""
    return [
        ops.convert_to_numpy(weight)
        for weight in (layer.expert_hidden_kernel, layer.expert_hidden_bias,
                       layer.expert_output_kernel, layer.expert_output_bias)
    ]


def dense_reference(layer, x):
    """The noiseless output of a flat `MixtureOfExperts` on `x [N, d]`,
    recomputed by the NumPy reference from the layer's weights."""
    from tests import reference

    gate_kernel = ops.convert_to_numpy(layer.gating.gate_kernel)
    gates = reference.gates(x @ gate_kernel, layer.gating.k)
    return reference.moe_output(x, gates, *expert_arrays(layer))
