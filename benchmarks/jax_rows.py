"""The benchmark's JAX rows: `python -m benchmarks.jax_rows --experts 4,16`.

Run by `benchmarks.run` in a subprocess with `KERAS_BACKEND=jax` (a
process has one Keras backend). The same workload as the TensorFlow rows
(`benchmarks.run`: d=256, hidden=1024, k=2, N=4096 tokens), timed the
same way (interleaved medians after two warm-up calls), each step a
`jax.jit` of the layer's stateless call. One difference: each
configuration's timed calls follow one untimed forward call of its own.
On XLA:CPU the first call after `jax-moe-ragged`'s training step (the
heaviest of the rows) took about 90 ms more at E=16 and 760 ms more at
E=64, whatever the configuration: without the untimed call,
`jax-dense`'s forward, timed right after it, came out 3x to 13x its
cost.

- `jax-dense`: `Dense(k*hidden, relu) -> Dense(d)`, the baseline;
- `jax-moe-capacity`: `MixtureOfExperts(capacity_factor=1.25)`;
- `jax-moe-dropless`: the dropless default (blocks of one expert,
  `jax_dispatch.DROPLESS = "blocks"`);
- `jax-moe-ragged`: dropless through `jax.lax.ragged_dot`.

The training step is the value and gradients of `sum(y * probe)` (plus
the balancing losses) with respect to the trainable weights and the input.
Prints one JSON line per row.
"""

import argparse
import json
import os
import time

from benchmarks.run import D_MODEL, HIDDEN, K, LENGTH, BATCH

CONFIGS = ["jax-dense", "jax-moe-capacity", "jax-moe-dropless", "jax-moe-ragged"]


def _build(config, num_experts):
    import keras

    import keras_moe

    keras.utils.set_random_seed(0)
    if config == "jax-dense":
        return keras.Sequential(
            [
                keras.Input((LENGTH, D_MODEL)),
                keras.layers.Dense(K * HIDDEN, activation="relu"),
                keras.layers.Dense(D_MODEL),
            ]
        )
    layer = keras_moe.MixtureOfExperts(
        num_experts, HIDDEN, k=K, seed=0,
        capacity_factor=1.25 if config == "jax-moe-capacity" else None,
    )
    layer.build((BATCH, LENGTH, D_MODEL))
    # A trained router, as in the TensorFlow rows.
    layer.gating.gate_kernel.assign(
        keras.random.normal(
            layer.gating.gate_kernel.shape, stddev=D_MODEL**-0.5, seed=1
        )
    )
    return layer


def _forward_function(config, layer):
    """The layer's stateless call, with `jax_dispatch.DROPLESS` set for
    the ragged row while it is traced."""
    from keras_moe import jax_dispatch

    def call(trainable, non_trainable, x, **kwargs):
        saved = jax_dispatch.DROPLESS
        if config == "jax-moe-ragged":
            jax_dispatch.DROPLESS = "ragged"
        try:
            return layer.stateless_call(trainable, non_trainable, x, **kwargs)
        finally:
            jax_dispatch.DROPLESS = saved

    return call


def _steps(config, layer):
    import jax
    import jax.numpy as jnp

    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]
    probe = jax.random.normal(jax.random.PRNGKey(2), (BATCH, LENGTH, D_MODEL))

    stateless_call = _forward_function(config, layer)

    @jax.jit
    def forward(trainable, x):
        return stateless_call(trainable, non_trainable, x)[0]

    def loss(trainable, x):
        outputs, losses = stateless_call(
            trainable, non_trainable, x, training=True, return_losses=True
        )[0::2]
        total = jnp.sum(outputs * probe)
        for extra in losses:
            total = total + extra
        return total

    train = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return trainable, forward, train


def time_configs(num_experts, reps):
    import jax
    import numpy as np

    x = jax.random.normal(jax.random.PRNGKey(1), (BATCH, LENGTH, D_MODEL))
    steps = {}
    for config in CONFIGS:
        steps[config] = _steps(config, _build(config, num_experts))
    for trainable, forward, train in steps.values():
        for _ in range(2):
            jax.block_until_ready(forward(trainable, x))
            jax.block_until_ready(train(trainable, x))
    times = {config: ([], []) for config in CONFIGS}
    for _ in range(reps):
        for config, (trainable, forward, train) in steps.items():
            jax.block_until_ready(forward(trainable, x))  # see the docstring
            start = time.perf_counter()
            jax.block_until_ready(forward(trainable, x))
            middle = time.perf_counter()
            jax.block_until_ready(train(trainable, x))
            end = time.perf_counter()
            times[config][0].append(middle - start)
            times[config][1].append(end - middle)
    return {
        config: (float(np.median(f)), float(np.median(t)))
        for config, (f, t) in times.items()
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", default="4,16,64")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args(argv)
    os.environ.setdefault("KERAS_MOE_QUIET", "1")
    import keras

    assert keras.backend.backend() == "jax", keras.backend.backend()
    for num_experts in [int(e) for e in args.experts.split(",")]:
        keras.backend.clear_session()
        timings = time_configs(num_experts, args.reps)
        base_forward, base_train = timings["jax-dense"]
        for config, (forward_s, train_s) in timings.items():
            print(json.dumps({
                "experts": num_experts,
                "tokens": BATCH * LENGTH,
                "config": config,
                "forward_ms": forward_s * 1e3,
                "train_ms": train_s * 1e3,
                "tokens_per_s": BATCH * LENGTH / train_s,
                "train_ratio_vs_dense": train_s / base_train,
                "forward_ratio_vs_dense": forward_s / base_forward,
            }), flush=True)


if __name__ == "__main__":
    main()
