"""Expert parallelism: experts sharded over devices (DTensor on TensorFlow,
keras.distribution on JAX).

Each scenario runs in a subprocess: the 4 virtual devices (logical CPUs for
TensorFlow, `--xla_force_host_platform_device_count=4` for JAX) must be set
before the backend initialises.
"""

import textwrap

import pytest

from tests.subprocesses import ROOT
from tests.subprocesses import run_python

DTENSOR_PRELUDE = """
import os, sys
sys.path.insert(0, {root!r})
import numpy as np
from keras_moe import distribution, expert_parallel, models
distribution.use_virtual_cpu_devices(4)
import tensorflow as tf
from tensorflow.experimental import dtensor
import keras
import keras_moe

def lstm_moe_model(kind="flat", seq=10, vocab=40, experts="mlp"):
    keras.utils.set_random_seed(0)
    # One-hot inputs, not an Embedding: Keras applies an Embedding's sparse
    # gradient lazily in Adam, which the dense update under DTensor is not.
    inputs = keras.Input(shape=(seq, vocab))
    h = keras.layers.LSTM(16, return_sequences=True, unroll=True)(inputs)
    if kind == "flat":
        moe = keras_moe.MixtureOfExperts(8, 32, capacity_factor=2.0, seed=1, name="moe", experts=experts)
    else:
        moe = keras_moe.HierarchicalMixtureOfExperts(2, 4, 32, capacity_factor=2.0, seed=1, name="moe", experts=experts)
    h = moe(h)
    model = keras.Model(inputs, keras.layers.Dense(vocab)(h))
    model.compile(keras.optimizers.Adam(0.02), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    # Gates that route somewhere other than round-robin.
    rng = np.random.default_rng(1)
    for v in moe.weights:
        if "gate_kernel" in v.path:
            v.assign(rng.normal(size=v.shape).astype("float32"))
    return model

def data(n=32, seq=10, vocab=40):
    # A copy task: learnable in a few steps.
    rng = np.random.default_rng(0)
    y = rng.integers(0, vocab, size=(n, seq)).astype("int32")
    return np.eye(vocab, dtype="float32")[y], y
"""

JAX_PRELUDE = """
import os, sys
sys.path.insert(0, {root!r})
import numpy as np
import jax
import keras
from keras_moe import expert_parallel, models
"""


def _run(script, tmp_path, prelude, env_extra=None):
    return run_python(
        textwrap.dedent(prelude).format(root=ROOT) + textwrap.dedent(script),
        tmp_path, env_extra=env_extra,
    )


@pytest.mark.parametrize("batch_shards", [1, 2])
def test_dtensor_shards_experts_and_matches_the_unsharded_layer(tmp_path, batch_shards):
    """E/n experts per device; outputs and every gradient equal unsharded."""
    _run(
        """
        def loss_and_grads(model, x, y):
            with tf.GradientTape() as tape:
                logits = model(x, training=False)
                loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
            variables = [v for v in model.trainable_variables if "noise" not in v.path]
            return logits, loss, [tf.convert_to_tensor(g) for g in tape.gradient(loss, variables)]

        x, y = data()
        batch_shards = {batch_shards}
        # The hierarchical layer with gated (SwiGLU) experts.
        for kind, experts in (("flat", "mlp"), ("hierarchical", "gated")):
            reference = lstm_moe_model(kind, experts=experts)
            sharded = lstm_moe_model(kind, experts=experts)
            sharded.set_weights(reference.get_weights())
            parallel = expert_parallel.ExpertParallel(batch_shards=batch_shards)
            assert parallel.expert_shards == 4 // batch_shards
            parallel.distribute(sharded)
            moe = sharded.get_layer("moe")
            assert len(moe.expert_variables) == {"mlp": 4, "gated": 3}[experts]
            for name, variable in moe.expert_variables.items():
                layout = parallel.layout_of(variable)
                assert layout.sharding_specs[0] == "expert", (name, layout)
                assert all(s == dtensor.UNSHARDED for s in layout.sharding_specs[1:])
                pieces = parallel.local_values(variable)
                assert len(pieces) == 4
                assert all(p.shape[0] == 8 // parallel.expert_shards for p in pieces), name
                assert all(p.shape[1:] == variable.shape[1:] for p in pieces)
            assert parallel.layout_of(moe.gating.gate_kernel).is_fully_replicated()

            want_logits, want_loss, want_grads = loss_and_grads(reference, x, y)
            with dtensor.default_mesh(parallel.mesh):
                logits, loss, grads = tf.function(loss_and_grads)(
                    sharded, parallel._pack_batch(x), parallel._pack_batch(y))
            np.testing.assert_allclose(parallel.to_numpy(logits), want_logits.numpy(), atol=1e-5)
            np.testing.assert_allclose(parallel.to_numpy(loss), want_loss.numpy(), atol=1e-5)
            assert len(grads) == len(want_grads) >= 10
            for got, want in zip(grads, want_grads):
                np.testing.assert_allclose(parallel.to_numpy(got), want.numpy(), atol=1e-5)
            # The host copy of the weights is the same model.
            for got, want in zip(parallel.unsharded_weights(sharded), reference.get_weights()):
                np.testing.assert_array_equal(got, want)
            print(kind, batch_shards, "ok")
        print("DONE")
        """.replace("{batch_shards}", str(batch_shards)),
        tmp_path, DTENSOR_PRELUDE,
    )


def test_dtensor_model_fit_with_lstm_trains_like_the_unsharded_model(tmp_path):
    """`fit`/`evaluate`/`predict` with an LSTM and sharded experts."""
    _run(
        """
        from keras_moe import callbacks
        x, y = data(n=64)
        reference = lstm_moe_model()
        sharded = lstm_moe_model()
        sharded.set_weights(reference.get_weights())
        parallel = expert_parallel.ExpertParallel()
        parallel.distribute(sharded)
        statistics = callbacks.RoutingStatistics()
        fit = dict(batch_size=16, epochs=4, verbose=0, shuffle=False)
        want = reference.fit(x, y, **fit).history["loss"]
        got = sharded.fit(x, y, callbacks=[statistics], **fit).history
        print(want, got["loss"])
        assert got["loss"][-1] < got["loss"][0] - 0.3
        # Same data, weights and noise seeds: the same training run.
        np.testing.assert_allclose(got["loss"], want, rtol=1e-4)
        assert len(got["moe/load_cv2"]) == 4
        counts = sharded.get_layer("moe").routing_statistics()
        assert counts["positions"] == 64 * 10
        np.testing.assert_allclose(counts["fraction_per_expert"].sum(), 1.0, atol=1e-5)
        np.testing.assert_allclose(
            sharded.evaluate(x, y, batch_size=16, verbose=0),
            reference.evaluate(x, y, batch_size=16, verbose=0), rtol=1e-4)
        np.testing.assert_allclose(
            sharded.predict(x, batch_size=16, verbose=0),
            reference.predict(x, batch_size=16, verbose=0), atol=1e-4)

        print("DONE")
        """,
        tmp_path, DTENSOR_PRELUDE,
    )


def test_dtensor_language_model_fit_on_a_batch_by_expert_mesh(tmp_path):
    """The package's LSTM-MoE language model, 2-way data x 2-way expert."""
    _run(
        """
        rng = np.random.default_rng(0)
        x = rng.integers(1, 40, size=(64, 10)).astype("int32")
        lm = models.language_model(40, model_dim=16, num_experts=8, hidden_units=16,
                                   capacity_factor=2.0, sequence_length=10, unroll=True, seed=1)
        lm.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        parallel = expert_parallel.ExpertParallel(batch_shards=2)
        parallel.distribute(lm)
        placement = parallel.expert_placement(lm)["moe"]
        assert [list(r) for r in placement.values()] == [[0, 1, 2, 3], [4, 5, 6, 7]] * 2, placement
        losses = lm.fit(x, x, batch_size=16, epochs=3, verbose=0).history["loss"]
        print(losses)
        assert losses[-1] < losses[0] - 0.1, losses
        print("DONE")
        """,
        tmp_path, DTENSOR_PRELUDE,
    )


CHECKPOINT_SCENARIO = """
import tensorflow as tf
x, y = data(n=32)
fit = dict(batch_size=8, epochs=3, verbose=0, shuffle=False)

def distributed(**kwargs):
    model = lstm_moe_model(**kwargs)
    parallel.distribute(model)
    return model

def state(model):
    # weights (with the routing statistics' accumulators), optimizer state
    return ([parallel.to_numpy(v) for v in model.weights],
            [parallel.to_numpy(v) for v in model.optimizer.variables])

class Interrupted(Exception):
    pass

class InterruptMidEpoch(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == 1 and batch == 2:
            raise Interrupted()

{body}
print("DONE")
"""


def _checkpoint_scenario(body, tmp_path, prelude, env_extra=None):
    script = CHECKPOINT_SCENARIO.format(body=textwrap.dedent(body))
    return _run(script, tmp_path, prelude, env_extra=env_extra)


DTENSOR_CHECKPOINT_PRELUDE = DTENSOR_PRELUDE + """
parallel = expert_parallel.ExpertParallel()
"""

JAX_CHECKPOINT_PRELUDE = JAX_PRELUDE + """
keras.distribution.set_distribution(expert_parallel.jax_model_parallel())

def lstm_moe_model(**kwargs):
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape=(10, 40))
    h = keras.layers.LSTM(16, return_sequences=True)(inputs)
    h = keras_moe.MixtureOfExperts(8, 32, capacity_factor=2.0, seed=1, name="moe")(h)
    model = keras.Model(inputs, keras.layers.Dense(40)(h))
    model.compile(keras.optimizers.Adam(0.02),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model

def data(n=32, seq=10, vocab=40):
    rng = np.random.default_rng(0)
    y = rng.integers(0, vocab, size=(n, seq)).astype("int32")
    return np.eye(vocab, dtype="float32")[y], y

class parallel:  # JAX arrays gather to the host by themselves
    to_numpy = staticmethod(lambda v: np.asarray(v.value if hasattr(v, "value") else v))
    distribute = staticmethod(lambda model: model)

import keras_moe
"""

JAX_4_DEVICES = {
    "KERAS_BACKEND": "jax",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    "JAX_PLATFORMS": "cpu",
}

BACKUP_AND_RESTORE = """
want = distributed()
want.fit(x, y, **fit)
backup = keras.callbacks.BackupAndRestore({backup!r})
interrupted = distributed()
try:
    interrupted.fit(x, y, callbacks=[backup, InterruptMidEpoch()], **fit)
    raise AssertionError("not interrupted")
except Interrupted:
    pass
resumed = distributed()  # a fresh model: everything comes from the backup
resumed.fit(x, y, callbacks=[keras.callbacks.BackupAndRestore({backup!r})], **fit)
got_state, want_state = state(resumed), state(want)
for got, expected in zip(got_state[0] + got_state[1], want_state[0] + want_state[1]):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
assert int(resumed.optimizer.iterations.numpy()) == 12
assert resumed.get_layer("moe").routing_statistics()["positions"] > 0
np.testing.assert_allclose(
    resumed.get_layer("moe").routing_statistics()["fraction_per_expert"],
    want.get_layer("moe").routing_statistics()["fraction_per_expert"], atol=1e-6)
"""

CHECKPOINT_AND_EXPORT = """
model = distributed()
path = {out!r} + "/epoch{{epoch}}.weights.h5"
model.fit(x, y, callbacks=[keras.callbacks.ModelCheckpoint(path, save_weights_only=True)],
          **dict(fit, epochs=2))
want = model.predict(x, batch_size=8, verbose=0)
{unsharded}
plain.load_weights({out!r} + "/epoch2.weights.h5")
np.testing.assert_allclose(plain.predict(x, batch_size=8, verbose=0), want, atol=1e-5)
def export_and_compare():
    model.export({out!r} + "/distributed", verbose=False)
    plain.export({out!r} + "/plain", verbose=False)
    import tensorflow as tf
    served = [tf.saved_model.load({out!r} + "/" + name) for name in ("distributed", "plain")]
    outputs = [np.asarray(s.serve(tf.constant(x[:8]))) for s in served]
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-5)
    np.testing.assert_allclose(outputs[0], want[:8], atol=1e-5)

# model.export() of the distributed model serves what the unsharded
# model's export serves (TensorFlow only: on JAX, jax2tf traces a symbolic
# batch size, which the MoE dispatch cannot take; see the README).
if keras.backend.backend() == "tensorflow":
    export_and_compare()
# .keras of the distributed model, and training goes on after saving
model.save({out!r} + "/model.keras")
loaded = keras.saving.load_model({out!r} + "/model.keras")
np.testing.assert_allclose(loaded.predict(x, batch_size=8, verbose=0), want, atol=1e-5)
model.fit(x, y, **dict(fit, epochs=1))
"""


def test_dtensor_checkpoint_backup_and_restore_resumes_an_interrupted_fit(tmp_path):
    _checkpoint_scenario(
        BACKUP_AND_RESTORE.format(backup=str(tmp_path / "backup")),
        tmp_path, DTENSOR_CHECKPOINT_PRELUDE,
    )


def test_dtensor_checkpoint_and_export_load_into_an_unsharded_model(tmp_path):
    # The unsharded model: the same one in a process without a mesh
    # variable (DTensor keeps one mesh per process, so built before
    # distribute would be too late): a plain copy built now is unsharded.
    _checkpoint_scenario(
        CHECKPOINT_AND_EXPORT.format(out=str(tmp_path), unsharded=(
            "plain = lstm_moe_model()  # never distributed: host variables"
        )),
        tmp_path, DTENSOR_CHECKPOINT_PRELUDE,
    )


def test_jax_checkpoint_backup_and_restore_resumes_an_interrupted_fit(tmp_path):
    pytest.importorskip("jax")
    _checkpoint_scenario(
        BACKUP_AND_RESTORE.format(backup=str(tmp_path / "backup")),
        tmp_path, JAX_CHECKPOINT_PRELUDE, env_extra=JAX_4_DEVICES,
    )


def test_jax_checkpoint_and_export_load_into_an_unsharded_model(tmp_path):
    pytest.importorskip("jax")
    _checkpoint_scenario(
        CHECKPOINT_AND_EXPORT.format(out=str(tmp_path), unsharded=(
            "keras.distribution.set_distribution(None)\n"
            "plain = lstm_moe_model()  # no distribution: one device"
        )),
        tmp_path, JAX_CHECKPOINT_PRELUDE, env_extra=JAX_4_DEVICES,
    )


def test_dtensor_rejects_what_it_cannot_shard(tmp_path):
    _run(
        """
        import pytest
        def model(unroll=True, capacity_factor=2.0, experts=8):
            inputs = keras.Input(shape=(6, 4))
            h = keras.layers.LSTM(8, return_sequences=True, unroll=unroll)(inputs)
            h = keras_moe.MixtureOfExperts(experts, 8, capacity_factor=capacity_factor)(h)
            m = keras.Model(inputs, h)
            m.compile("sgd", "mse")
            return m
        parallel = expert_parallel.ExpertParallel()
        for kwargs, message in [
            (dict(unroll=False), "unroll=True"),
            (dict(capacity_factor=None), "capacity_factor"),
            (dict(experts=6), "multiple of 4"),
        ]:
            with pytest.raises(ValueError, match=message):
                parallel.distribute(model(**kwargs))
        # one mesh per process
        parallel.distribute(model())
        with pytest.raises(ValueError, match="different DTensor mesh"):
            expert_parallel.ExpertParallel(batch_shards=2).distribute(model())
        with pytest.raises(ValueError, match="needs 8 CPU devices"):
            expert_parallel.ExpertParallel(expert_shards=4, batch_shards=2)
        print("DONE")
        """,
        tmp_path, DTENSOR_PRELUDE,
    )


def test_jax_model_parallel_shards_experts_and_fits_with_lstm(tmp_path):
    pytest.importorskip("jax")
    _run(
        """
        assert keras.backend.backend() == "jax" and len(jax.devices()) == 4
        rng = np.random.default_rng(0)
        x = rng.integers(0, 40, size=(64, 10)).astype("int32")
        y = np.roll(x, 1, axis=1)

        def build(capacity_factor=2.0, experts="mlp"):
            model = models.language_model(40, model_dim=16, num_experts=8, hidden_units=16,
                                          capacity_factor=capacity_factor, seed=1,
                                          experts=experts)
            model.compile(keras.optimizers.Adam(1e-2),
                          keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            return model

        # 1 x 4 mesh, capacity mode; 2 x 2 mesh, dropless (ragged_dot)
        # with gated (SwiGLU) experts.
        for expert_shards, capacity_factor, experts in ((4, 2.0, "mlp"), (2, None, "gated")):
            keras.distribution.set_distribution(None)
            reference = build(experts=experts)  # no distribution: one device
            want = reference.predict(x, batch_size=16, verbose=0)
            keras.distribution.set_distribution(
                expert_parallel.jax_model_parallel(expert_shards=expert_shards))
            model = build(capacity_factor, experts)
            model.set_weights(reference.get_weights())
            moe = model.get_layer("moe")
            assert len(moe.expert_variables) == {"mlp": 4, "gated": 3}[experts]
            for name, variable in moe.expert_variables.items():
                value = variable.value
                spec = value.sharding.spec
                assert spec[0] == "model" and all(s is None for s in spec[1:]), (name, spec)
                shards = value.addressable_shards
                assert len(shards) == 4
                assert all(s.data.shape[0] == 8 // expert_shards for s in shards), name
            assert all(s is None for s in moe.gating.gate_kernel.value.sharding.spec)
            np.testing.assert_allclose(model.predict(x, batch_size=16, verbose=0), want, atol=1e-5)
            losses = model.fit(x, y, batch_size=16, epochs=3, verbose=0).history["loss"]
            print(expert_shards, losses)
            assert losses[-1] < losses[0] - 0.02, losses
            # Training kept the experts where they were.
            first = next(iter(moe.expert_variables.values()))
            assert first.value.sharding.spec[0] == "model"
            keras.distribution.set_distribution(None)
        print("DONE")
        """,
        tmp_path, JAX_PRELUDE,
        env_extra={
            "KERAS_BACKEND": "jax",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
            "JAX_PLATFORMS": "cpu",
        },
    )
