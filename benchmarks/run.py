"""MoE layer benchmark: `python -m benchmarks.run` (`make bench`).

Workload (issue 3): float32, d=256, hidden_units=1024, k=2, E in {4, 16,
64, 256, 1024}, in two regimes (`--regimes`): `fixed`, N=4096 tokens (16
sequences of 256) at every E, and `paper`, N = 64 E tokens (E/4 sequences:
about 128 rows per expert, as when the batch grows with the experts; timed
only, no memory probe and no dense-only configurations). For each E, in one
process and interleaved (each repetition times every configuration once),
median of `--reps` repetitions after two warm-up calls, inside
`tf.function`:

- `dense`: the baseline, `Dense(k*hidden, relu) -> Dense(d)` on the same
  tokens (the paper's computationally matched "MoE-1-Wide"); `dense-xla`
  the same with `jit_compile=True`, the baseline of the XLA row;
  `dense-gated` a SwiGLU FFN of the same active size (`silu(x Wg) * (x Wu)`,
  `k*hidden` wide, then `Wd`), the baseline of the keras-hub rows.
- `moe-dropless`: `MixtureOfExperts(capacity_factor=None)`;
  `moe-dropless-one-capacity` the same with capacity classes switched off
  (every expert padded to the busiest one).
- `moe-capacity-xla`: `MixtureOfExperts(capacity_factor=1.25)`,
  `jit_compile=True`.
- `all-experts`: every expert on every token, weighted by the gates (what
  keras-hub does), with our weights; also the reference our outputs are
  checked against (`max_abs_diff`).
- `keras-hub-mixtral`: keras-hub's `MixtralSparseMoeBlock` at the same
  hidden size. Its experts are gated 3-matrix MLPs (1.5x our experts'
  FLOPs at equal hidden size). `keras-hub-mixtral-sparse`: the same block
  after `keras_moe.integrations.keras_hub.sparsify` (only the chosen
  experts, same weights).

The training step is forward + backward (gradients of the weights and of
the input, as when the layer sits between LSTMs), without the optimizer.
Peak memory is measured per configuration in a fresh process, after one
traced step: the peak RSS mark is reset (`/proc/self/clear_refs`), two
steps run, and the peak (`VmHWM`, as `resource.getrusage` reports it)
minus the RSS before them (which holds the weights) is the step's peak,
with `TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1` so that
freed memory is returned. "Beyond weights and gradients" also subtracts
one copy of the weights for their gradients.

The `hub` regime times `dense-gated`, `keras-hub-mixtral` and
`keras-hub-mixtral-sparse` alone at `--hub-experts` (8, 32, 64), N=4096.

`all-experts` and `keras-hub-mixtral` build `[E, N, hidden]` activations
(16 GB at E=1024) and are run for E <= 64 only. The JAX rows
(`benchmarks/jax_rows.py`: dense, capacity and the ragged dropless path)
run in a JAX process for E <= 64.
"""

import argparse
import csv
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

D_MODEL, HIDDEN, K, BATCH, LENGTH = 256, 1024, 2, 16, 256
TOKENS = BATCH * LENGTH
DENSE_ONLY_LIMIT = 64
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

CONFIGS = [
    "dense",
    "dense-xla",
    "dense-gated",
    "moe-dropless",
    "moe-dropless-one-capacity",
    "moe-capacity-xla",
    "all-experts",
    "keras-hub-mixtral",
    "keras-hub-mixtral-sparse",
]


def _applies(config, num_experts, regime="fixed"):
    if regime == "hub":
        return config in HUB_CONFIGS
    if config in ("all-experts", "keras-hub-mixtral"):
        return regime == "fixed" and num_experts <= DENSE_ONLY_LIMIT
    if config in ("keras-hub-mixtral-sparse", "dense-gated"):
        return regime == "fixed"
    return True


def build(config, num_experts, batch=BATCH):
    """Returns (layer, forward(x) -> y, jit_compile), for `batch` sequences."""
    import keras
    from keras import ops

    import keras_moe
    from keras_moe import dispatch

    keras.utils.set_random_seed(0)
    if config == "dense-gated":
        from keras_moe import models

        inputs = keras.Input((LENGTH, D_MODEL))
        layer = keras.Model(inputs, models.dense_feed_forward(
            inputs, K * HIDDEN, D_MODEL, experts="gated"
        ))
        return layer, lambda x, training: layer(x), False
    if config.startswith("dense"):
        layer = keras.Sequential(
            [
                keras.Input((LENGTH, D_MODEL)),
                keras.layers.Dense(K * HIDDEN, activation="relu"),
                keras.layers.Dense(D_MODEL),
            ]
        )
        return layer, lambda x, training: layer(x), config.endswith("xla")
    if config.startswith("keras-hub-mixtral"):
        from keras_hub.src.models.mixtral.mixtral_decoder import (
            MixtralSparseMoeBlock,
        )

        from keras_moe.integrations import keras_hub as hub

        layer = MixtralSparseMoeBlock(
            hidden_dim=D_MODEL, intermediate_dim=HIDDEN, num_experts=num_experts,
            top_k=K,
        )
        layer.build((batch, LENGTH, D_MODEL))
        if config == "keras-hub-mixtral-sparse":
            hub.sparsify(layer)
        return layer, lambda x, training: layer(x, training=training)[0], False
    capacity_factor = 1.25 if config == "moe-capacity-xla" else None
    layer = keras_moe.MixtureOfExperts(
        num_experts, HIDDEN, k=K, seed=0, capacity_factor=capacity_factor
    )
    layer.build((batch, LENGTH, D_MODEL))
    # A trained router, not the zero initialisation: with zero kernels every
    # position ties and inference sends them all to experts 0..k-1.
    layer.gating.gate_kernel.assign(
        keras.random.normal(
            layer.gating.gate_kernel.shape, stddev=D_MODEL**-0.5, seed=1
        )
    )
    if config == "all-experts":

        def forward(x, training):
            features = ops.reshape(x, (-1, D_MODEL))
            weights, indices = layer.gating(features, training=training)
            y = dispatch.dense_mixture(
                features, weights, indices, layer.expert_hidden_kernel,
                layer.expert_hidden_bias, layer.expert_output_kernel,
                layer.expert_output_bias, layer.activation,
            )
            return ops.reshape(y, ops.shape(x))

        return layer, forward, False
    if config == "moe-dropless-one-capacity":

        def forward(x, training):
            # Traced with capacity classes switched off: every expert
            # padded to the busiest one, as before classes.
            saved = dispatch.CLASSES_MIN_ROWS
            dispatch.CLASSES_MIN_ROWS = float("inf")
            try:
                return layer(x, training=training)
            finally:
                dispatch.CLASSES_MIN_ROWS = saved

        return layer, forward, False
    return layer, lambda x, training: layer(x, training=training), (
        config == "moe-capacity-xla"
    )


def step_functions(layer, forward, jit_compile, batch=BATCH):
    import tensorflow as tf

    probe = tf.constant(
        tf.random.stateless_normal((batch, LENGTH, D_MODEL), seed=(1, 2))
    )

    @tf.function(jit_compile=jit_compile)
    def forward_step(x):
        return forward(x, False)

    @tf.function(jit_compile=jit_compile)
    def train_step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = forward(x, True)
            loss = tf.reduce_sum(y * probe)
            if layer.losses:
                loss += tf.add_n(layer.losses)
        return tape.gradient(loss, [x] + layer.trainable_weights)

    return forward_step, train_step


def _block(result):
    """Waits until every tensor of `result` is computed.

    Reads one element of each, not the whole tensor: copying the 1 GB
    weight gradients of E=1024 to NumPy cost more than the step itself
    (fresh pages for every copy), and would count in the peak memory.
    """
    import tensorflow as tf

    for tensor in tf.nest.flatten(result):
        if isinstance(tensor, tf.IndexedSlices):
            tensor = tensor.values
        tf.reshape(tensor, (-1,))[:1].numpy()


def interleaved_times(calls, reps):
    """`reps` rounds, each timing every call of `calls` once, in order.

    Args:
        calls: dict name -> function of no arguments, run to completion
            (`_block`) inside its timing.
        reps: int.

    Returns:
        dict name -> list of seconds, one per round.
    """
    times = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            start = time.perf_counter()
            _block(call())
            times[name].append(time.perf_counter() - start)
    return times


def time_configs(num_experts, configs, reps, batch=BATCH):
    """Interleaved timings: {config: (forward_s, train_s, max_abs_diff)}."""
    import numpy as np
    import tensorflow as tf

    x = tf.constant(
        tf.random.stateless_normal((batch, LENGTH, D_MODEL), seed=(0, 1))
    )
    steps = {}
    layers = {}
    for config in configs:
        layer, forward, jit_compile = build(config, num_experts, batch)
        layers[config] = layer
        steps[config] = step_functions(layer, forward, jit_compile, batch)
    # The reference shares our layer's weights.
    if "all-experts" in layers and "moe-dropless" in layers:
        for source, target in zip(
            layers["moe-dropless"].weights, layers["all-experts"].weights
        ):
            target.assign(source)
    for forward_step, train_step in steps.values():
        for _ in range(2):
            _block(forward_step(x))
            _block(train_step(x))
    calls = {}
    for config, (forward_step, train_step) in steps.items():
        calls[config, "forward"] = lambda step=forward_step: step(x)
        calls[config, "train"] = lambda step=train_step: step(x)
    times = interleaved_times(calls, reps)
    diff = None
    if "all-experts" in steps and "moe-dropless" in steps:
        ours = steps["moe-dropless"][0](x).numpy()
        ref = steps["all-experts"][0](x).numpy()
        diff = float(np.abs(ours - ref).max())
    return {
        config: (
            float(np.median(times[config, "forward"])),
            float(np.median(times[config, "train"])),
            diff if config == "moe-dropless" else None,
        )
        for config in configs
    }


def _rss_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes():
    """VmHWM (resettable); `ru_maxrss` where /proc lacks it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_probe(config, num_experts):
    """Runs in a fresh process; prints a JSON line."""
    import numpy as np
    import tensorflow as tf

    layer, forward, jit_compile = build(config, num_experts)
    _, train_step = step_functions(layer, forward, jit_compile)
    x = tf.constant(
        tf.random.stateless_normal((BATCH, LENGTH, D_MODEL), seed=(0, 1))
    )
    weight_bytes = sum(int(np.prod(w.shape)) * 4 for w in layer.weights)
    _block(train_step(x))  # trace and compile outside the measurement
    before = _rss_bytes()
    # Reset the peak-RSS mark to the current RSS (Linux): the import of
    # TensorFlow and tracing peaked higher than a step may.
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    for _ in range(2):
        _block(train_step(x))
    peak = _peak_rss_bytes()
    step_peak = max(peak - before, 0)
    print(
        json.dumps(
            {
                "weights_mb": weight_bytes / 2**20,
                "step_peak_mb": step_peak / 2**20,
            }
        )
    )


def probe_fits(num_experts):
    """Whether a memory probe at `num_experts` fits beside this process.

    TensorFlow keeps what this process allocated (about 18 GB after timing
    E=1,024 here), so a probe needing a few times the experts' weights
    beside it can exhaust the machine, and the kernel then kills this
    process. Needed: four times the weights (weights, gradients, buffers),
    against `MemAvailable`.
    """
    from benchmarks import roofline

    weights = roofline.expert_weight_bytes(D_MODEL, HIDDEN, num_experts)
    try:
        with open("/proc/meminfo") as handle:
            fields = dict(line.split(":", 1) for line in handle)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return True
    return available > 4 * weights


def measure_memory(config, num_experts):
    env = dict(os.environ, TF_ONEDNN_USE_SYSTEM_ALLOCATOR="1", KERAS_MOE_QUIET="1")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--memory-probe", config,
         str(num_experts)],
        env=env, capture_output=True, text=True, timeout=1800,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        return None
    return json.loads(lines[-1])


def machine_description():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import keras
    import tensorflow as tf

    return (
        f"{cpu}, {os.cpu_count()} cores, TensorFlow {tf.__version__}, "
        f"Keras {keras.__version__}, Python {platform.python_version()}"
    )


COLUMNS = [
    "experts", "tokens", "config", "forward_ms", "train_ms", "tokens_per_s",
    "train_ratio_vs_dense", "forward_ratio_vs_dense", "roofline_ms",
    "ratio_vs_roofline", "step_peak_mb",
    "beyond_weight_grads_mb", "weights_mb", "max_abs_diff_vs_reference",
]


def _format(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


TABLE_TITLES = {
    "fixed": "N = 4,096 tokens at every expert count (the issue-3 workload)",
    "paper": "The paper's regime: N = 64 E tokens (about 128 rows per expert)",
    "jax": "JAX backend (`jax.jit`), N = 4,096: ratios over `jax-dense`",
    "hub": "keras-hub's Mixtral block as shipped and after `sparsify`, "
           "N = 4,096: ratios over `dense-gated`",
}

# The `hub` regime: keras-hub's block against a dense gated FFN of the same
# active size, at its own expert counts (`--hub-experts`).
HUB_CONFIGS = ["dense-gated", "keras-hub-mixtral", "keras-hub-mixtral-sparse"]


def write_tables(tables, header, out_dir):
    """Writes `latest.csv` and `latest.md`; `tables` is [(regime, rows)]."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "latest.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["regime"] + COLUMNS)
        writer.writeheader()
        for regime, rows in tables:
            for row in rows:
                writer.writerow(
                    {"regime": regime, **{c: row.get(c) for c in COLUMNS}}
                )
    lines = [header]
    for regime, rows in tables:
        lines += ["", f"**{TABLE_TITLES[regime]}**", "",
                  "| " + " | ".join(COLUMNS) + " |",
                  "|" + "---|" * len(COLUMNS)]
        for row in rows:
            lines.append(
                "| " + " | ".join(_format(row.get(c)) for c in COLUMNS) + " |"
            )
    table = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "latest.md"), "w") as handle:
        handle.write(table)
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description="MoE layer benchmark")
    parser.add_argument("--experts", default="4,16,64,256,1024")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument(
        "--regimes", default="fixed,paper,hub",
        help="fixed: N=4096 tokens at every E; paper: N = 64 E tokens; "
        "hub: keras-hub's Mixtral block before and after sparsify",
    )
    parser.add_argument("--hub-experts", default="8,32,64")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument(
        "--jax-experts", default="4,16,64",
        help="expert counts of the JAX rows ('' for none); the ragged "
        "dropless path runs densely on XLA:CPU, so not beyond 64",
    )
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--memory-probe", nargs=2, metavar=("CONFIG", "E"))
    args = parser.parse_args(argv)

    os.environ.setdefault("KERAS_MOE_QUIET", "1")
    import keras_moe  # noqa: F401  (quiet backend import)

    if args.memory_probe:
        memory_probe(args.memory_probe[0], int(args.memory_probe[1]))
        return
    configs = args.configs.split(",")
    try:
        import keras_hub  # noqa: F401
    except ImportError:
        configs = [c for c in configs if not c.startswith("keras-hub")]
        print("keras-hub is not installed: skipping keras-hub-mixtral")

    import gc

    import keras

    from benchmarks import roofline

    machine = roofline.measure()
    print(f"This machine now: {roofline.describe(machine)}", flush=True)
    tables = []
    for regime in [r for r in args.regimes.split(",") if r]:
        rows = []
        expert_counts = args.hub_experts if regime == "hub" else args.experts
        for num_experts in [int(e) for e in expert_counts.split(",") if e]:
            batch = batch_for(regime, num_experts)
            active = [c for c in configs if _applies(c, num_experts, regime)]
            print(f"{regime}: E={num_experts}, N={batch * LENGTH}: timing "
                  f"{', '.join(active)}", flush=True)
            # Each E starts clean: the layers and traced functions of the
            # last one (0.5 GB of weights at E=256) slowed the memory-bound
            # E=1024.
            keras.backend.clear_session()
            gc.collect()
            timings = time_configs(num_experts, active, args.reps, batch)
            # Free this E's layers before the memory probes (TensorFlow
            # keeps most of what it allocated, so see `probe_fits` too).
            keras.backend.clear_session()
            gc.collect()
            for config in active:
                row = _row(config, num_experts, batch, timings, machine)
                probe = (not args.no_memory and regime == "fixed"
                         and config != "dense-xla")
                if probe and not probe_fits(num_experts):
                    probe = False
                    print(f"  {config}: memory probe skipped, not enough "
                          f"free memory beside this process (measure "
                          f"E={num_experts} alone: --experts "
                          f"{num_experts} --regimes fixed)", flush=True)
                if probe:
                    memory = measure_memory(config, num_experts)
                    if memory:
                        row["step_peak_mb"] = memory["step_peak_mb"]
                        row["weights_mb"] = memory["weights_mb"]
                        row["beyond_weight_grads_mb"] = (
                            memory["step_peak_mb"] - memory["weights_mb"]
                        )
                rows.append(row)
                print("  " + ", ".join(
                    f"{c}={_format(row.get(c))}" for c in COLUMNS[1:]
                ), flush=True)
        tables.append((regime, rows))
    if args.jax_experts:
        # Free the last configurations first: with the paper's regime at
        # E=1024 still held, this process and the JAX one together ran out
        # of memory (24 GB).
        keras.backend.clear_session()
        gc.collect()
        print(f"jax: E={args.jax_experts}", flush=True)
        rows = jax_rows(args.jax_experts, args.reps)
        if rows:
            tables.append(("jax", rows))
    header = (
        f"Benchmark of {datetime.date.today().isoformat()} on "
        f"{machine_description()}. Workload: float32, d={D_MODEL}, "
        f"hidden={HIDDEN}, k={K}; medians of {args.reps} "
        f"interleaved repetitions; this machine at the start of the run: "
        f"{roofline.describe(machine)} (`benchmarks/roofline.py`). Ratios: "
        f"train/forward time over the `dense` baseline's (`dense-xla`'s for "
        f"`moe-capacity-xla`, `dense-gated`'s for the keras-hub rows); "
        f"`ratio_vs_roofline`: the train step over "
        f"`roofline_ms`, max(FLOPs / matmul rate, bytes / bandwidth). "
        f"Command: `make bench` (`python -m benchmarks.run`)."
    )
    print()
    print(write_tables(tables, header, args.out))


def jax_rows(experts, reps):
    """The JAX rows (`benchmarks.jax_rows`), timed in a JAX process."""
    env = dict(os.environ, KERAS_BACKEND="jax", KERAS_MOE_QUIET="1")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.jax_rows", "--experts", experts,
         "--reps", str(reps)],
        env=env, capture_output=True, text=True, timeout=3600,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    if result.returncode != 0:
        print("JAX rows failed:", result.stderr[-2000:], flush=True)
        return []
    return [json.loads(line) for line in result.stdout.splitlines()
            if line.startswith("{")]


def batch_for(regime, num_experts):
    """Sequences of `LENGTH` per step: 16 (N=4096) in the fixed regime,
    `E / 4` (N = 64 E, about 128 rows per expert) in the paper's."""
    if regime in ("fixed", "hub"):
        return BATCH
    if regime == "paper":
        return max(1, num_experts * 64 // LENGTH)
    raise ValueError(
        f"Unknown regime {regime!r}: 'fixed', 'paper' or 'hub'."
    )


def _row(config, num_experts, batch, timings, machine):
    from benchmarks import roofline

    forward_s, train_s, diff = timings[config]
    baseline = {
        "moe-capacity-xla": "dense-xla",
        "keras-hub-mixtral": "dense-gated",
        "keras-hub-mixtral-sparse": "dense-gated",
    }.get(config, "dense")
    # (the hub regime has no `dense`: its baseline is `dense-gated`)
    base = (timings.get(baseline) or timings.get("dense")
            or timings.get("dense-gated"))
    tokens = batch * LENGTH
    row = {
        "experts": num_experts,
        "tokens": tokens,
        "config": config,
        "forward_ms": forward_s * 1e3,
        "train_ms": train_s * 1e3,
        "tokens_per_s": tokens / train_s,
        "train_ratio_vs_dense": train_s / base[1] if base else None,
        "forward_ratio_vs_dense": forward_s / base[0] if base else None,
        "max_abs_diff_vs_reference": diff,
    }
    if config.startswith("moe"):
        bound = roofline.moe_train_step_bound(
            machine, tokens, D_MODEL, HIDDEN, K, num_experts
        )
        row["roofline_ms"] = bound * 1e3
        row["ratio_vs_roofline"] = train_s / bound
    return row




if __name__ == "__main__":
    main()
