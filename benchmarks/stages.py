"""Where the dropless training step's time goes: `python -m benchmarks.stages`.

A wall-time ablation, not a profiler's op times (with two cores, ops that
run beside the expert matmuls show several times their own cost in op
time). For each expert count, in one process, interleaved medians of
`--reps` training steps (forward and the gradients of the weights and the
input, as `benchmarks.run` times them), each over the dense step of the
same active size (`benchmarks.run`'s `dense`):

- the whole `moe-dropless` step of `benchmarks.run`;
- the experts alone on the dispatched buffer `[E, C, d]`, `C` the busiest
  expert's load (what the step runs: every expert padded to it);
- the experts alone on a balanced buffer, `N k / E` rows each (what they
  would cost without padding);
- the gate alone (clean and noise matmul, noise, top-k, load estimator,
  losses);
- plan, dispatch and combine alone (the routing of the gate's choice, the
  experts left out).

The stages overlap a little (the step runs independent ops side by side),
so their sum is close to the whole step but not equal to it.
"""

import argparse
import os


def stage_steps(num_experts):
    """Returns ({stage: tf.function step}, padding line) for one E."""
    import tensorflow as tf

    from benchmarks import run
    from keras_moe import dispatch

    shape = (run.BATCH, run.LENGTH, run.D_MODEL)
    x = tf.constant(tf.random.stateless_normal(shape, seed=(0, 1)))
    probe = tf.constant(tf.random.stateless_normal(shape, seed=(1, 2)))
    dense, dense_forward, _ = run.build("dense", num_experts)
    moe, moe_forward, _ = run.build("moe-dropless", num_experts)
    features = tf.reshape(x, (-1, run.D_MODEL))
    features_probe = tf.reshape(probe, (-1, run.D_MODEL))
    gate_values, indices = moe.gating(features, training=False)
    plan = dispatch.plan_dispatch(indices, num_experts)
    padded = tf.constant(dispatch.dispatch(features, plan))
    rows = features.shape[0] * run.K
    balanced = tf.random.stateless_normal(
        (num_experts, -(-rows // num_experts), run.D_MODEL), seed=(2, 3)
    )
    padded_probe = tf.random.stateless_normal(padded.shape, seed=(3, 4))
    balanced_probe = tf.random.stateless_normal(balanced.shape, seed=(4, 5))
    weights = tuple(moe.expert_variables.values())

    def experts(buffer):
        return dispatch.mlp_experts(buffer, weights, moe.activation)

    def routed():
        route = dispatch.plan_dispatch(indices, num_experts)
        buffer = dispatch.dispatch(features, route)
        return dispatch.combine(buffer, gate_values, route)

    def gate():
        values, _ = moe.gating(features, training=True)
        return tf.reduce_sum(values) + tf.add_n(moe.gating.losses)

    def step(loss, watched, variables):
        @tf.function
        def train_step():
            with tf.GradientTape() as tape:
                for tensor in watched:
                    tape.watch(tensor)
                value = loss()
            return tape.gradient(value, list(watched) + list(variables))

        return train_step

    steps = {
        "dense step": step(
            lambda: tf.reduce_sum(dense_forward(x, True) * probe), [x],
            dense.trainable_weights,
        ),
        "whole MoE step": step(
            lambda: tf.reduce_sum(moe_forward(x, True) * probe)
            + tf.add_n(moe.losses),
            [x], moe.trainable_weights,
        ),
        "experts on the padded buffer": step(
            lambda: tf.reduce_sum(experts(padded) * padded_probe), [padded],
            weights,
        ),
        "experts on a balanced buffer": step(
            lambda: tf.reduce_sum(experts(balanced) * balanced_probe),
            [balanced], weights,
        ),
        "gate": step(gate, [features], moe.gating.trainable_weights),
        "plan, dispatch, combine": step(
            lambda: tf.reduce_sum(routed() * features_probe), [features], []
        ),
    }
    capacity = int(padded.shape[1])
    padding = (
        f"E={num_experts}: C={capacity} for a mean load of "
        f"{rows / num_experts:.0f} ({capacity * num_experts / rows:.2f}x "
        "the rows)"
    )
    return steps, padding


def measure(num_experts, reps):
    """{stage: median train time over the dense step's}, padding line."""
    import numpy as np

    from benchmarks import run

    steps, padding = stage_steps(num_experts)
    for train_step in steps.values():
        for _ in range(2):
            run._block(train_step())
    times = run.interleaved_times(steps, reps)
    dense = float(np.median(times["dense step"]))
    return {
        stage: float(np.median(values)) / dense
        for stage, values in times.items()
    }, padding


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", default="4,16,64,256,1024")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args(argv)
    os.environ.setdefault("KERAS_MOE_QUIET", "1")
    import keras_moe  # noqa: F401  (quiet backend import)

    import gc

    import keras

    counts = [int(e) for e in args.experts.split(",")]
    results = {}
    for num_experts in counts:
        results[num_experts], padding = measure(num_experts, args.reps)
        print(padding, flush=True)
        keras.backend.clear_session()
        gc.collect()
    stages = list(results[counts[0]])
    print()
    print("| stage (train step / dense step) | "
          + " | ".join(f"E={e:,}" for e in counts) + " |")
    print("|---" * (len(counts) + 1) + "|")
    for stage in stages:
        print(f"| {stage} | "
              + " | ".join(f"{results[e][stage]:.2f}" for e in counts)
              + " |")


if __name__ == "__main__":
    main()
