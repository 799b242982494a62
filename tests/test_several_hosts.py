"""Past one machine: one expert mesh over several processes (JAX, and
TensorFlow DTensor's multi-client mode), and the cluster description each
host reads.

Each process is a fresh Python on 127.0.0.1 with 2 devices (XLA host
devices, or logical CPUs); the one-process reference has 4.
"""

import json

import numpy as np
import pytest

from keras_moe import expert_parallel
from tests.subprocesses import free_ports
from tests.subprocesses import run_python
from tests.subprocesses import start_python
from tests.subprocesses import wait_all

# The same script on every host: the cluster comes from the environment.
JAX_LANGUAGE_MODEL = """
import numpy as np
import jax
import keras
from jax.experimental import multihost_utils
from keras_moe import expert_parallel, models

keras.distribution.set_distribution(expert_parallel.jax_cluster_model_parallel())
assert len(jax.devices()) == 4
rng = np.random.default_rng(0)
x = rng.integers(0, 40, size=(64, 10)).astype("int32")
y = np.roll(x, 1, axis=1)
keras.utils.set_random_seed(0)
model = models.language_model(40, model_dim=16, num_experts=8, hidden_units=16,
                              capacity_factor={capacity_factor}, seed=1)
model.compile(keras.optimizers.Adam(1e-2),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True))
moe = model.get_layer("moe")
# The experts this process holds: two per local device, its own.
held = sorted({{(s.index[0].start, s.index[0].stop)
               for s in moe.expert_hidden_kernel.value.addressable_shards}})
print("HELD", jax.process_index(), held)
losses = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history["loss"]
weights = [np.asarray(multihost_utils.process_allgather(w.value, tiled=True))
           if jax.process_count() > 1 else np.asarray(w.value) for w in model.weights]
np.savez({out!r} + f"/weights_{{jax.process_index()}}_of_{{jax.process_count()}}.npz", *weights)
print("LOSSES", losses)
print("DONE")
"""

JAX_ENV = {"KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}


@pytest.mark.parametrize("capacity_factor", [2.0, None])
def test_multi_process_jax_fit_equals_one_process_and_splits_the_experts(
    tmp_path, capacity_factor
):
    pytest.importorskip("jax")
    script = JAX_LANGUAGE_MODEL.format(
        capacity_factor=capacity_factor, out=str(tmp_path)
    )
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = [
        start_python(script, tmp_path, env_extra={
            **JAX_ENV,
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            **_cluster_env(workers, index),
        })
        for index in range(2)
    ]
    outputs = wait_all(processes, timeout=600)
    run_python(script, tmp_path, env_extra={
        **JAX_ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    }, timeout=600)
    # Each process holds only its own half of the experts.
    assert "HELD 0 [(0, 2), (2, 4)]" in outputs[0]
    assert "HELD 1 [(4, 6), (6, 8)]" in outputs[1]
    _assert_same_weights(tmp_path)


DTENSOR_LSTM_MOE = """
import os
import numpy as np
from keras_moe import expert_parallel
multi_process = bool(os.environ.get("TF_CONFIG"))
expert_parallel.initialize_dtensor_cluster(num_cpu_devices=2 if multi_process else 4)
import keras
import keras_moe
from tensorflow.experimental import dtensor

keras.utils.set_random_seed(0)
inputs = keras.Input(shape=(10, 40))
h = keras.layers.LSTM(16, return_sequences=True, unroll=True)(inputs)
h = keras_moe.MixtureOfExperts(8, 32, capacity_factor=2.0, seed=1, name="moe")(h)
model = keras.Model(inputs, keras.layers.Dense(40)(h))
model.compile(keras.optimizers.Adam(0.02),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True))
rng = np.random.default_rng(0)
y = rng.integers(0, 40, size=(32, 10)).astype("int32")
x = np.eye(40, dtype="float32")[y]
parallel = expert_parallel.ExpertParallel()
parallel.distribute(model)
held = sorted((r.start, r.stop) for r in parallel.expert_placement(model)["moe"].values())
print("HELD", dtensor.client_id(), held)
model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
np.savez({out!r} + f"/weights_{{dtensor.client_id()}}_of_{{dtensor.num_clients()}}.npz",
         *parallel.unsharded_weights(model))
print("DONE")
"""


def _cluster_env(workers, index):
    return {"TF_CONFIG": json.dumps({
        "cluster": {"worker": workers},
        "task": {"type": "worker", "index": index},
    })}


def _assert_same_weights(tmp_path):
    want = np.load(tmp_path / "weights_0_of_1.npz")
    for index in range(2):
        got = np.load(tmp_path / f"weights_{index}_of_2.npz")
        assert len(got.files) == len(want.files) > 10
        for name in want.files:
            np.testing.assert_allclose(got[name], want[name], atol=1e-5)


def test_multi_process_dtensor_fit_equals_one_process_and_splits_the_experts(
    tmp_path
):
    script = DTENSOR_LSTM_MOE.format(out=str(tmp_path))
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = [
        start_python(script, tmp_path, env_extra=_cluster_env(workers, index))
        for index in range(2)
    ]
    outputs = wait_all(processes, timeout=600)
    run_python(script, tmp_path, timeout=600)
    assert "HELD 0 [(0, 2), (2, 4)]" in outputs[0]
    assert "HELD 1 [(4, 6), (6, 8)]" in outputs[1]
    _assert_same_weights(tmp_path)


def test_cluster_from_environment_reads_either_description():
    read = expert_parallel.cluster_from_environment
    assert read({}) is None
    assert read({
        "KERAS_MOE_COORDINATOR_ADDRESS": "10.0.0.1:1234",
        "KERAS_MOE_NUM_PROCESSES": "4", "KERAS_MOE_PROCESS_ID": "3",
    }) == ("10.0.0.1:1234", 4, 3)
    tf_config = {"cluster": {"worker": ["a:1", "b:2", "c:3"]},
                 "task": {"type": "worker", "index": 2}}
    assert read({"TF_CONFIG": json.dumps(tf_config)}) == ("a:1", 3, 2)
    with pytest.raises(ValueError, match="must be integers"):
        read({"KERAS_MOE_COORDINATOR_ADDRESS": "a:1"})
    with pytest.raises(ValueError, match="outside the cluster"):
        read({"KERAS_MOE_COORDINATOR_ADDRESS": "a:1",
              "KERAS_MOE_NUM_PROCESSES": "2", "KERAS_MOE_PROCESS_ID": "2"})
    with pytest.raises(ValueError, match="list the workers"):
        read({"TF_CONFIG": json.dumps({"task": {"index": 0}})})
