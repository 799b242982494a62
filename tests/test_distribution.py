"""Data-parallel training: MirroredStrategy and MultiWorkerMirroredStrategy.

Device configuration must happen before TensorFlow initialises, so each
scenario runs in a subprocess with 4 logical CPU devices (or as 2 worker
processes talking over 127.0.0.1).
"""

import json
import textwrap

import numpy as np

from tests.subprocesses import ROOT
from tests.subprocesses import free_ports
from tests.subprocesses import run_python
from tests.subprocesses import start_python
from tests.subprocesses import wait_all

PRELUDE = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {root!r})
    import numpy as np
    from keras_moe import distribution
    distribution.use_virtual_cpu_devices(4)
    import tensorflow as tf
    import keras
    import keras_moe
    from tests import layer_checks

    VOCAB = 24

    def lstm_moe_model(kind="flat", **moe_kwargs):
        inputs = keras.Input(shape=(None,), dtype="int32")
        h = keras.layers.Embedding(VOCAB, 16, mask_zero=True)(inputs)
        h = keras.layers.LSTM(16, return_sequences=True)(h)
        if kind == "flat":
            h = keras_moe.MixtureOfExperts(4, 32, seed=1, name="moe", **moe_kwargs)(h)
        else:
            h = keras_moe.HierarchicalMixtureOfExperts(2, 2, 32, seed=1, name="moe", **moe_kwargs)(h)
        return keras.Model(inputs, keras.layers.Dense(VOCAB)(h))

    def copy_task(num=256, length=8, seed=0):
        rng = np.random.default_rng(seed)
        tokens = rng.integers(1, VOCAB, size=(num, length)).astype("int32")
        tokens[:, 6:] = 0
        return tokens, tokens.copy()

    LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    """
)


def _run(script, tmp_path, timeout=900):
    return run_python(
        PRELUDE.format(root=ROOT) + textwrap.dedent(script), tmp_path, timeout=timeout
    )


def test_mirrored_balancing_loss_and_gate_gradients_are_those_of_the_global_batch(tmp_path):
    _run(
        """
        strategy = distribution.mirrored_strategy()
        assert strategy.num_replicas_in_sync == 4
        rng = np.random.default_rng(0)
        x = rng.normal(size=(32, 6)).astype("float32")
        makers = [
            lambda: keras_moe.MixtureOfExperts(8, 16, noisy_gating=False, importance_weight=0.3, load_weight=0.7),
            lambda: keras_moe.HierarchicalMixtureOfExperts(2, 4, 16, noisy_gating=False),
            lambda: keras_moe.MixtureOfExperts(8, 16, router=keras_moe.SoftmaxTopKGating(
                8, k=2, load_balance_weight=0.5, z_loss_weight=0.1)),
            # Loss-free balancing: the bias moves by the global batch's loads.
            lambda: keras_moe.MixtureOfExperts(8, 16, router=keras_moe.SoftmaxTopKGating(
                8, k=2, load_balance_weight=0.5, bias_update_rate=0.1)),
        ]
        for make in makers:
            with strategy.scope():
                layer = make()
                layer.build((None, 6))
            layer_checks.randomise_weights(layer, seed=7)
            gate_vars = layer.gating.trainable_weights
            bias = getattr(layer.gating, "expert_bias", None)
            if bias is not None:
                bias.assign(np.linspace(-0.2, 0.2, 8).astype("float32"))
                bias_before = bias.numpy()

            with tf.GradientTape() as tape:
                layer(x, training=True)
                (single_loss,) = layer.losses
            single_grads = tape.gradient(single_loss, gate_vars)
            if bias is not None:
                bias_single = bias.numpy()
                assert np.abs(bias_single - bias_before).max() > 0
                bias.assign(bias_before)

            dataset = strategy.experimental_distribute_dataset(
                tf.data.Dataset.from_tensor_slices(x).batch(32))

            @tf.function
            def replicated(batch):
                def replica_fn(xb):
                    with tf.GradientTape() as tape:
                        layer(xb, training=True)
                        (loss,) = layer.losses
                    return loss, tape.gradient(loss, gate_vars)
                loss, grads = strategy.run(replica_fn, args=(batch,))
                # Keras' convention for add_loss: average over replicas.
                return (strategy.reduce("MEAN", loss, axis=None),
                        [strategy.reduce("MEAN", g, axis=None) for g in grads])

            loss, grads = replicated(next(iter(dataset)))
            if bias is not None:
                np.testing.assert_allclose(bias.numpy(), bias_single, atol=1e-6)
            np.testing.assert_allclose(loss.numpy(), single_loss.numpy(), rtol=1e-5)
            assert float(single_loss) > 0
            for replicated_grad, single_grad in zip(grads, single_grads):
                assert np.abs(single_grad.numpy()).max() > 0
                np.testing.assert_allclose(
                    replicated_grad.numpy(), single_grad.numpy(), rtol=1e-5, atol=1e-7)
        print("DONE")
        """,
        tmp_path,
    )


def test_mirrored_fit_step_equals_single_device_and_loss_falls(tmp_path):
    _run(
        """
        strategy = distribution.mirrored_strategy()
        tokens, targets = copy_task()
        for kind in ("flat", "hierarchical"):
            keras.utils.set_random_seed(0)
            single = lstm_moe_model(kind, noisy_gating=False)
            single.compile(optimizer=keras.optimizers.SGD(0.5), loss=LOSS)
            with strategy.scope():
                mirrored = lstm_moe_model(kind, noisy_gating=False)
                mirrored.compile(optimizer=keras.optimizers.SGD(0.5), loss=LOSS)
            mirrored.set_weights(single.get_weights())
            assert mirrored.jit_compile is False

            # One step on the same global batch: the same reported loss
            # (cross-entropy plus the balancing loss at the same scale) and
            # the same weights afterwards.
            batch = (tokens[:32], targets[:32])
            single_loss = single.fit(*batch, batch_size=32, epochs=1, shuffle=False, verbose=0).history["loss"][0]
            mirrored_loss = mirrored.fit(*batch, batch_size=32, epochs=1, shuffle=False, verbose=0).history["loss"][0]
            np.testing.assert_allclose(mirrored_loss, single_loss, rtol=1e-5)
            for a, b in zip(mirrored.get_weights(), single.get_weights()):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

        # And it learns (the flat layer; the hierarchical one trains under
        # fit in test_layers).
        with strategy.scope():
            model = lstm_moe_model("flat")
            model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=LOSS)
        losses = model.fit(tokens, targets, batch_size=32, epochs=4, verbose=0).history["loss"]
        assert losses[-1] < 0.8 * losses[0], losses
        print("DONE")
        """,
        tmp_path,
    )


def test_mirrored_jit_compile_is_off_and_forcing_it_fails_clearly(tmp_path):
    _run(
        """
        strategy = distribution.mirrored_strategy()
        tokens, targets = copy_task(num=64)
        with strategy.scope():
            model = lstm_moe_model(capacity_factor=2.0)
            model.compile(optimizer="adam", loss=LOSS, jit_compile="auto")
        assert model.jit_compile is False
        model.fit(tokens, targets, batch_size=32, epochs=1, verbose=0)
        with strategy.scope():
            forced = lstm_moe_model(capacity_factor=2.0)
            forced.compile(optimizer="adam", loss=LOSS, jit_compile=True)
        try:
            forced.fit(tokens, targets, batch_size=32, epochs=1, verbose=0)
        except Exception as error:
            message = str(error)
            assert "jit_compile=False" in message and "MirroredStrategy" in message, message
        else:
            raise AssertionError("jit_compile=True under MirroredStrategy did not fail")
        print("DONE")
        """,
        tmp_path,
    )


WORKER = textwrap.dedent(
    """
    import json, os
    import numpy as np
    import tensorflow as tf
    from keras_moe import distribution
    strategy = distribution.multi_worker_mirrored_strategy()
    import keras
    import keras_moe

    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 24, size=(256, 8)).astype("int32")
    tokens[:, 6:] = 0
    dataset = tf.data.Dataset.from_tensor_slices((tokens, tokens)).batch(32)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = dataset.with_options(options)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        inputs = keras.Input(shape=(None,), dtype="int32")
        h = keras.layers.Embedding(24, 16, mask_zero=True)(inputs)
        h = keras.layers.LSTM(16, return_sequences=True)(h)
        h = keras_moe.MixtureOfExperts(4, 32, seed=1)(h)
        model = keras.Model(inputs, keras.layers.Dense(24)(h))
        model.compile(optimizer=keras.optimizers.Adam(1e-2),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(dataset, epochs=3, verbose=0)
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    np.savez(os.path.join({out!r}, f"worker{{index}}.npz"), *model.get_weights())
    print("DONE", history.history["loss"])
    """
)


def test_multi_worker_mirrored_fit_in_two_processes(tmp_path):
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    script = WORKER.format(out=str(tmp_path))
    workers = [
        start_python(script, tmp_path, env_extra={"TF_CONFIG": json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}
        )})
        for index in range(2)
    ]
    outputs = wait_all(workers)
    losses = [json.loads(stdout.split("DONE", 1)[1].strip().replace("'", '"')) for stdout in outputs]
    assert losses[0][-1] < losses[0][0]
    first = np.load(tmp_path / "worker0.npz")
    second = np.load(tmp_path / "worker1.npz")
    assert len(first.files) == len(second.files) > 0
    for name in first.files:
        np.testing.assert_array_equal(first[name], second[name])


def test_cli_trains_under_mirrored_strategy(tmp_path):
    _run(
        f"""
        from keras_moe import train
        (row,) = train.run([
            "--experts", "4", "--hidden-units", "16", "--model-dim", "16",
            "--epochs", "1", "--batch-size", "8", "--seq-len", "10",
            "--max-tokens", "3000", "--strategy", "mirrored",
            "--out", {str(tmp_path / "run")!r}, "--verbose", "0",
        ])
        assert 1.0 < row["test_perplexity"] < 1e5, row
        # 8 rows of (3000 - 1) // 8 = 374 tokens: 37 windows of 10 per row.
        assert row["routing"]["moe"][0]["positions"] == 37 * 8 * 10
        print("DONE")
        """,
        tmp_path,
    )
