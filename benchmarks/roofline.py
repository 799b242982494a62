"""This machine's roofline, measured in the process that is benchmarked.

The machine is shared and its speed moves from minute to minute, so the
matmul rate and the memory bandwidth are measured at the start of a
benchmark run, in the same process, and every MoE row is compared with the
bound they give:

    roofline(step) = max(FLOPs / matmul rate, bytes / memory bandwidth)

for a training step (forward and the gradients of the weights and the
input) of an MoE layer with `E` experts of hidden size `h` on `N` positions
of width `d`, `k` experts each:

- FLOPs = 12 N k d h (the experts' two matmuls, forward and two backward)
  + 12 N d E (the clean and noise gate matmuls, likewise);
- bytes = 3 * 4 E (2 d h + h + d) (the float32 expert weights read forward,
  read backward, and their gradients written).
"""

import time

from benchmarks import scale

MATMUL_SHAPE = (4096, 256, 2048)  # [M, K] @ [K, N]
COPY_BYTES = 2**30


def _median_seconds(function, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def measure(repeats=10):
    """Measures this machine now.

    Returns:
        dict: `matmul_flops_per_s` (a `4096x256 @ 256x2048` float32
        matmul, median) and `bytes_per_s` (the best of a 1 GiB copy,
        counting its read and its write, and a 1 GiB read, medians).
    """
    import tensorflow as tf

    m, k, n = MATMUL_SHAPE
    a = tf.random.stateless_normal((m, k), seed=(0, 1))
    b = tf.random.stateless_normal((k, n), seed=(0, 2))
    matmul = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)[:1, :1]))
    matmul().numpy()
    matmul_s = _median_seconds(lambda: matmul().numpy(), repeats)

    values = tf.random.stateless_uniform((COPY_BYTES // 4,), seed=(0, 3))
    copy = tf.function(lambda: (values + 1.0)[:1])
    read = tf.function(lambda: tf.reduce_max(values))
    copy().numpy()
    read().numpy()
    copy_s = _median_seconds(lambda: copy().numpy(), max(3, repeats // 2))
    read_s = _median_seconds(lambda: read().numpy(), max(3, repeats // 2))
    return {
        "matmul_flops_per_s": 2 * m * k * n / matmul_s,
        "bytes_per_s": max(2 * COPY_BYTES / copy_s, COPY_BYTES / read_s),
    }


def expert_weight_bytes(model_dim, hidden, experts):
    """float32 bytes of `experts` paper experts (`scale.expert_parameters`)."""
    return 4 * experts * scale.expert_parameters(model_dim, hidden)


def moe_train_step_bound(machine, tokens, model_dim, hidden, k, experts):
    """The roofline bound of an MoE training step, in seconds."""
    flops = 12 * tokens * k * model_dim * hidden + 12 * tokens * model_dim * experts
    weight_bytes = expert_weight_bytes(model_dim, hidden, experts)
    return max(
        flops / machine["matmul_flops_per_s"],
        3 * weight_bytes / machine["bytes_per_s"],
    )


def describe(machine):
    return (
        f"matmul {machine['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s, "
        f"memory {machine['bytes_per_s'] / 1e9:.0f} GB/s"
    )
