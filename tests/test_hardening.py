"""Bad arguments, empty inputs, malformed masks, the command line and the
statistics callback on both backends."""

import os
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import keras_moe
from tests.subprocesses import run_module
from tests.subprocesses import run_python

# Every public layer with valid arguments; each bad-argument case replaces one.
LAYERS = {
    "NoisyTopKGating": (keras_moe.NoisyTopKGating, dict(num_experts=8, k=2)),
    "HierarchicalNoisyTopKGating": (
        keras_moe.HierarchicalNoisyTopKGating,
        dict(num_groups=4, experts_per_group=2, k=2),
    ),
    "MixtureOfExperts": (
        keras_moe.MixtureOfExperts, dict(num_experts=8, hidden_units=4, k=2)
    ),
    "HierarchicalMixtureOfExperts": (
        keras_moe.HierarchicalMixtureOfExperts,
        dict(num_groups=4, experts_per_group=2, hidden_units=4, k=2),
    ),
}
MOE_LAYERS = ["MixtureOfExperts", "HierarchicalMixtureOfExperts"]


def _integer_arguments(name):
    kwargs = LAYERS[name][1]
    return [key for key in kwargs if key != "k"] + ["k"]


def _noisy_name(name):
    return "noisy_gating" if name in MOE_LAYERS else "noisy"


BAD_VALUES = [
    # (argument, value, error type, words in the message)
    ("k", True, TypeError, "`k` must be an integer"),
    ("k", 2.0, TypeError, "`k` must be an integer"),
    ("k", "2", TypeError, "`k` must be an integer"),
    ("k", 0, ValueError, "`k` must be an integer >= 1. Received: k=0"),
    ("importance_weight", -0.1, ValueError, "importance_weight=-0.1"),
    ("importance_weight", float("nan"), ValueError, "must be finite"),
    ("load_weight", -1, ValueError, "`load_weight` must be >= 0"),
    ("load_weight", "0.1", TypeError, "`load_weight` must be a number"),
    ("noise_epsilon", float("nan"), ValueError, "noise_epsilon=nan"),
    ("noise_epsilon", 0.0, ValueError, "`noise_epsilon` must be > 0"),
    ("noise_epsilon", -1e-2, ValueError, "`noise_epsilon` must be > 0"),
    ("seed", -1, ValueError, "`seed` must be an integer >= 0"),
    ("seed", 1.5, TypeError, "`seed` must be an integer"),
]
MOE_BAD_VALUES = [
    ("capacity_factor", float("inf"), ValueError, "capacity_factor=inf"),
    ("capacity_factor", "2", TypeError, "`capacity_factor` must be a number"),
    ("capacity_factor", 0, ValueError, "`capacity_factor` must be > 0"),
    ("capacity_factor", -1.0, ValueError, "capacity_factor=-1.0"),
    ("eval_capacity_factor", 0.0, ValueError, "`eval_capacity_factor` must be > 0"),
    ("eval_capacity_factor", "auto", TypeError, "`eval_capacity_factor` must be a number"),
    ("shared_experts", -1, ValueError, "shared_experts=-1"),
    ("shared_experts", 1.0, TypeError, "`shared_experts` must be an integer"),
    ("shared_expert_gate", 1, TypeError, "`shared_expert_gate` must be True or False"),
    ("hidden_units", 0, ValueError, "hidden_units=0"),
    ("hidden_units", 4.0, TypeError, "`hidden_units` must be an integer"),
    ("output_units", 0, ValueError, "output_units=0"),
    ("output_units", True, TypeError, "`output_units` must be an integer"),
]


@pytest.mark.parametrize(
    "name,argument,value,error,words",
    [(name, *case) for name in sorted(LAYERS) for case in BAD_VALUES]
    + [(name, *case) for name in MOE_LAYERS for case in MOE_BAD_VALUES],
)
def test_bad_arguments_are_refused_naming_the_argument(name, argument, value, error, words):
    cls, kwargs = LAYERS[name]
    with pytest.raises(error) as raised:
        cls(**{**kwargs, argument: value})
    assert words in str(raised.value)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_counts_reject_bools_floats_strings_and_non_positive_values(name):
    cls, kwargs = LAYERS[name]
    for argument in _integer_arguments(name):
        for value in (True, 4.0, "4", 0, -3):
            with pytest.raises((TypeError, ValueError)) as raised:
                cls(**{**kwargs, argument: value})
            assert f"`{argument}`" in str(raised.value), (argument, value)
    with pytest.raises(TypeError, match=f"`{_noisy_name(name)}` must be True or False"):
        cls(**{**kwargs, _noisy_name(name): "yes"})


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_numpy_integers_and_floats_are_accepted_and_stored_as_python_numbers(name):
    cls, kwargs = LAYERS[name]
    numpy_kwargs = {key: np.int64(value) for key, value in kwargs.items()}
    numpy_kwargs.update(importance_weight=np.float32(0.25), seed=np.int32(3))
    layer = cls(**numpy_kwargs)
    config = layer.get_config()
    for key, value in kwargs.items():
        assert config[key] == value and type(config[key]) is int, key
    assert type(config["importance_weight"]) is float and config["seed"] == 3
    outputs = layer(np.ones((2, 3, 6), "float32"))
    first = outputs[0] if isinstance(outputs, tuple) else outputs
    assert tuple(first.shape)[:2] == (2, 3)


def test_k_is_checked_against_the_argument_it_exceeds():
    with pytest.raises(ValueError, match="`k` must be <= `num_experts`"):
        keras_moe.MixtureOfExperts(2, 4, k=3)
    with pytest.raises(ValueError, match="`k` must be <= `num_groups`.*num_groups=2"):
        keras_moe.HierarchicalMixtureOfExperts(2, 8, 4, k=3)
    with pytest.raises(ValueError, match="`k` must be <= `experts_per_group`"):
        keras_moe.HierarchicalMixtureOfExperts(8, 2, 4, k=3)
    with pytest.raises(ValueError) as raised:
        keras_moe.HierarchicalNoisyTopKGating(2, 8, k=3)
    assert "num_experts" not in str(raised.value)


# Empty inputs -------------------------------------------------------------


EMPTY_SHAPES = [(0, 5, 6), (2, 0, 6), (0, 6)]


@pytest.mark.parametrize("shape", EMPTY_SHAPES)
@pytest.mark.parametrize("capacity_factor", [None, 2.0])
@pytest.mark.parametrize("name", MOE_LAYERS)
def test_no_positions_give_empty_outputs(name, capacity_factor, shape):
    cls, kwargs = LAYERS[name]
    layer = cls(**kwargs, capacity_factor=capacity_factor, output_units=3)
    x = np.zeros(shape, "float32")
    expected = shape[:-1] + (3,)
    assert tuple(layer(x).shape) == expected
    y = layer(x, training=True)
    assert tuple(y.shape) == expected
    assert all(np.isfinite(ops.convert_to_numpy(loss)) for loss in layer.losses)

    # A graph traced for any number of positions, fed none.
    function = tf.function(
        lambda x: layer(x), input_signature=[tf.TensorSpec((None,) * (len(shape) - 1) + (6,))]
    )
    assert tuple(function(x).shape) == expected
    assert tuple(function(np.ones((3,) * (len(shape) - 1) + (6,), "float32")).shape)[-1] == 3


@pytest.mark.parametrize("name", ["NoisyTopKGating", "HierarchicalNoisyTopKGating"])
def test_gates_route_no_positions(name):
    cls, kwargs = LAYERS[name]
    layer = cls(**kwargs)
    weights, indices = layer(np.zeros((2, 0, 6), "float32"), training=True)
    assert weights.shape[:2] == (2, 0) and indices.shape[:2] == (2, 0)
    (loss,) = layer.losses
    assert float(ops.convert_to_numpy(loss)) == 0.0


def _token_model(capacity_factor=None):
    inputs = keras.Input(shape=(None,), dtype="int32")
    x = keras.layers.Embedding(20, 8)(inputs)
    x = keras_moe.MixtureOfExperts(4, 8, capacity_factor=capacity_factor)(x)
    return keras.Model(inputs, keras.layers.Dense(20)(x))


@pytest.mark.parametrize("capacity_factor", [None, 2.0])
def test_a_model_predicts_and_serves_empty_sequences(capacity_factor, tmp_path):
    model = _token_model(capacity_factor)
    empty = np.zeros((2, 0), "int32")
    assert model.predict(empty, verbose=0).shape == (2, 0, 20)
    tokens = np.ones((2, 3), "int32")
    expected = model.predict(tokens, verbose=0)
    path = str(tmp_path / "export")
    model.export(path, verbose=False)
    served = tf.saved_model.load(path)
    assert tuple(served.serve(tf.constant(empty)).shape) == (2, 0, 20)
    np.testing.assert_allclose(served.serve(tf.constant(tokens)).numpy(), expected, rtol=1e-5, atol=1e-6)


# Masks ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_masks_of_the_wrong_shape_are_refused(name):
    cls, kwargs = LAYERS[name]
    layer = cls(**kwargs)
    x = np.ones((2, 5, 6), "float32")
    for mask in (np.ones((5, 2), bool), np.ones((2, 4), bool), np.ones((2, 5, 1), bool), np.ones((10,), bool)):
        with pytest.raises(ValueError, match="`mask` must have the shape .*\\(2, 5\\)"):
            layer(x, mask=mask)
    layer(x, mask=np.ones((2, 5), bool))  # the right shape is fine


# Routing ties ----------------------------------------------------------------


def test_untrained_hierarchical_moe_spreads_positions_over_every_expert():
    layer = keras_moe.HierarchicalMixtureOfExperts(8, 8, 4, k=2)
    layer.build((None, 16))
    routing = layer.gating.route(np.ones((512, 16), "float32"), training=False)
    indices = ops.convert_to_numpy(routing.expert_indices)
    counts = np.bincount(indices.ravel(), minlength=64)
    # 512 positions x 4 experts over 64 experts: 32 each, exactly.
    assert counts.min() == counts.max() == 32, counts


# RoutingStatistics and the command line --------------------------------------


def test_empty_inputs_and_routing_statistics_on_jax(tmp_path):
    pytest.importorskip("jax")
    run_python(textwrap.dedent(
        """
        import numpy as np
        import keras
        import keras_moe
        from keras_moe import callbacks

        # No positions: empty outputs, finite losses, both modes.
        for capacity_factor in (None, 2.0):
            for layer in (
                keras_moe.MixtureOfExperts(4, 8, capacity_factor=capacity_factor),
                keras_moe.HierarchicalMixtureOfExperts(2, 2, 8, capacity_factor=capacity_factor),
            ):
                for shape in ((0, 5, 6), (2, 0, 6)):
                    x = np.zeros(shape, "float32")
                    assert layer(x).shape == shape, layer(x).shape
                    assert layer(x, training=True).shape == shape
                    assert all(np.isfinite(float(loss)) for loss in layer.losses)

        # RoutingStatistics resets and reads the statistics each epoch.
        inputs = keras.Input(shape=(None,), dtype="int32")
        x = keras.layers.Embedding(20, 8)(inputs)
        x = keras_moe.MixtureOfExperts(4, 8, name="moe")(x)
        model = keras.Model(inputs, keras.layers.Dense(20)(x))
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        tokens = np.random.default_rng(0).integers(0, 20, size=(32, 5)).astype("int32")
        statistics = callbacks.RoutingStatistics()
        history = model.fit(tokens, tokens, batch_size=8, epochs=2, verbose=0,
                            callbacks=[statistics])
        (epochs,) = statistics.history.values()
        assert [epoch["positions"] for epoch in epochs] == [160.0, 160.0], epochs
        assert len(history.history["moe/load_cv2"]) == 2
        layer = model.get_layer("moe")
        layer.reset_routing_statistics()
        assert layer.routing_statistics()["positions"] == 0.0
        print("DONE")
        """
    ), tmp_path, env_extra={"KERAS_BACKEND": "jax"}, timeout=300)


def test_routing_statistics_reach_tensorboard_in_either_order(tmp_path):
    from keras_moe import callbacks

    model = _token_model()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    tokens = np.random.default_rng(0).integers(0, 20, size=(16, 5)).astype("int32")
    for order, log_dir in (("after", tmp_path / "after"), ("before", tmp_path / "before")):
        routing = callbacks.RoutingStatistics(log_dir=str(log_dir))
        board = keras.callbacks.TensorBoard(str(log_dir))
        listed = [board, routing] if order == "after" else [routing, board]
        model.fit(tokens, tokens, epochs=1, verbose=0, callbacks=listed)
        tags = set()
        for root, _, files in os.walk(log_dir):
            for name in files:
                for event in tf.compat.v1.train.summary_iterator(os.path.join(root, name)):
                    tags.update(value.tag for value in event.summary.value)
        layer_name = model.layers[2].name
        assert f"{layer_name}/load_cv2" in tags, (order, sorted(tags))


def _cli(tmp_path, *arguments, backend="tensorflow", timeout=60):
    return run_module("keras_moe.train", arguments, tmp_path,
                      env_extra={"KERAS_BACKEND": backend}, timeout=timeout)


@pytest.mark.parametrize(
    "arguments,words",
    [
        (["--epochs", "0"], "`--epochs` must be an integer >= 1. Received: --epochs=0"),
        (["--batch-size", "0"], "`--batch-size` must be an integer >= 1"),
        (["--seq-len", "0"], "`--seq-len` must be an integer >= 1"),
        (["--hierarchical", "0"], "`--hierarchical` must be an integer >= 1"),
        (["--learning-rate", "-1"], "`--learning-rate` must be > 0.0"),
        (["--learning-rate", "nan"], "`--learning-rate` must be finite"),
        (["--experts", "-3"], "`--experts` must be an integer >= 0"),
        (["--experts", "2", "--k", "5"], "--k 5 exceeds --experts 2"),
        (["--experts", "16", "--hierarchical", "3"], "must be a multiple of --hierarchical 3"),
        (["--experts", "16", "--hierarchical", "8", "--k", "3"], "--k 3 exceeds the groups"),
        (["--experts", "0", "--hierarchical", "2"], "--hierarchical needs --experts > 0"),
        (["--dropout", "1.5"], "`--dropout` must be < 1.0"),
        (["--capacity-factor", "inf"], "`--capacity-factor` must be finite"),
        (["--max-tokens", "50"], "--max-tokens 50 is too few"),
        (["--epochs", "two"], "`--epochs` must be an integer. Received: --epochs=two"),
        (["--verbose", "5"], "--verbose: invalid choice"),
    ],
)
def test_cli_usage_errors_exit_2_without_a_traceback(arguments, words, tmp_path):
    result = _cli(tmp_path, *arguments)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("usage: keras-moe-train"), result.stderr
    assert words in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_cli_help_answers_without_importing_tensorflow(tmp_path):
    result = _cli(tmp_path, "--help")
    assert result.returncode == 0 and "--learning-rate" in result.stdout
    run_python(textwrap.dedent(
        """
        import runpy
        sys.argv = ["-m", "--help"]
        try:
            runpy.run_module("keras_moe.train", run_name="__main__", alter_sys=True)
        except SystemExit as exit:
            assert exit.code == 0
        assert "tensorflow" not in sys.modules and "keras" not in sys.modules
        print("DONE")
        """
    ), tmp_path, timeout=60)


def test_cli_exits_0_after_a_good_run(tmp_path):
    # (On JAX the same command was checked by hand; its crash, in
    # RoutingStatistics, is tested above on JAX directly.)
    result = _cli(
        tmp_path, "--experts", "4", "--hidden-units", "8", "--model-dim", "8", "--epochs", "1",
        "--batch-size", "8", "--seq-len", "5", "--max-tokens", "400", "--verbose", "0",
        "--out", str(tmp_path / "run"), timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "moe_lm" in result.stdout and "Traceback" not in result.stderr
    assert result.stderr.strip() == "", result.stderr[-3000:]


# The softmax router and the `router` argument ---------------------------------


@pytest.mark.parametrize(
    "argument,value,error,words",
    [
        ("num_experts", np.float64(4), TypeError, "`num_experts` must be an integer"),
        ("k", 9, ValueError, "`k` must be <= `num_experts`"),
        ("k", True, TypeError, "`k` must be an integer"),
        ("normalize", 1, TypeError, "`normalize` must be True or False"),
        ("load_balance_weight", -0.01, ValueError, "load_balance_weight=-0.01"),
        ("z_loss_weight", float("nan"), ValueError, "`z_loss_weight` must be finite"),
        ("jitter", 1.0, ValueError, "`jitter` must be < 1.0"),
        ("jitter", -0.1, ValueError, "`jitter` must be >= 0.0"),
        ("seed", "1", TypeError, "`seed` must be an integer"),
    ],
)
def test_softmax_router_arguments_are_checked(argument, value, error, words):
    kwargs = dict(num_experts=8, k=2)
    with pytest.raises(error) as raised:
        keras_moe.SoftmaxTopKGating(**{**kwargs, argument: value})
    assert words in str(raised.value)


def test_router_argument_is_checked():
    with pytest.raises(ValueError, match="`router` must be one of"):
        keras_moe.MixtureOfExperts(8, 4, router="switch")
    with pytest.raises(TypeError, match="`router` must be one of"):
        keras_moe.MixtureOfExperts(8, 4, router=keras.layers.Dense(8))
    with pytest.raises(ValueError, match="routes over 6 experts but num_experts=8"):
        keras_moe.MixtureOfExperts(8, 4, router=keras_moe.SoftmaxTopKGating(6))
