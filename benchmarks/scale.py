"""The cost of expert parallelism at scale, on paper: `python -m benchmarks.scale`.

For a model configuration (d, h, E, k, MoE layers, tokens per step, a
`batch x expert` mesh) it prints, per device: the bytes of expert weights
and of their optimizer slots; per MoE layer and training step, the bytes
each device receives in each direction (to the experts, from the experts);
and the share of the MoE layers' time that moving them would take at a
given interconnect bandwidth and matmul rate. Two ways of moving tokens:

- `dtensor`: `keras_moe.expert_parallel.ExpertParallel` as it runs today
  (measured on 4 devices by `--validate`): the dispatched `[E, C, d]`
  buffer is replicated on every device (with `b > 1` batch shards the
  batch-sharded tokens are gathered into it: `(1 - 1/b) N d` to the
  experts), each device slices its experts' rows (nothing else moves to
  them) and the `[E, C, d_out]` outputs are all-gathered over the expert
  axis (`(1 - 1/n_e) E C d_out` from the experts); the backward pass moves
  the same tensors the other way. Its optimizer workaround (TF 2.21)
  relays every expert gradient out to replicated before the update:
  `(1 - 1/n_e)` of all expert parameters per device per step, counted
  apart. Expert work is repeated on every batch shard.
- `all_to_all`: the paper's (and GShard's) layout, for comparison: tokens
  and experts both sharded over all `D` devices; each device sends its
  `cf k N / D` rows to their experts' devices (`1 - 1/D` of them leave) and
  receives their outputs back; the backward pass the same again.

Byte counts are float32 (`--bytes-per-value`); `C = ceil(cf N k / E)`
(`dispatch.capacity_for`). `--validate` runs one MoE layer on 4 virtual
CPU devices under `ExpertParallel` (1x4 and 2x2 meshes), records every
tensor relaid out by the layer's hooks with its shape and its layouts
before and after, counts the bytes each device receives (what it holds
after minus what it held already), and prints them beside this module's
formula.

Without arguments it prints the validation and then the table for the
paper's largest configurations (hierarchical MoE, 4 experts per position,
512 -> 1024 -> 512 ReLU experts: MoE-4096-h, 4.3B parameters, to
MoE-131072-h, 137B) on 8 to 1,024 devices.
"""

import argparse
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def capacity(tokens, k, experts, capacity_factor):
    """Rows per expert: `ceil(cf * N * k / E)` (as `dispatch.capacity_for`)."""
    return math.ceil(capacity_factor * tokens * k / experts)


def expert_parameters(d, h, d_out=None):
    """Parameters of one paper expert: `d h + h + h d_out + d_out`."""
    d_out = d_out or d
    return d * h + h + h * d_out + d_out


def costs(d, h, experts, k, tokens, batch_shards, expert_shards,
          capacity_factor=1.25, layers=1, bytes_per_value=4, slots=2):
    """Per-device costs of one configuration.

    Args:
        d, h: expert input/output and hidden widths.
        experts: `E`; k: experts per position (`k*k` for the paper's
            hierarchical layer: pass the product).
        tokens: positions per training step, over the whole mesh (`N`).
        batch_shards, expert_shards: the `b x n_e` mesh.
        capacity_factor: `cf`.
        layers: MoE layers (weights and traffic scale with them).
        bytes_per_value: 4 for float32.
        slots: optimizer slots per weight (Adam: 2).

    Returns:
        dict of bytes per device (`*_bytes`) and rows per device.
    """
    devices = batch_shards * expert_shards
    rows = capacity(tokens, k, experts, capacity_factor)
    weights = bytes_per_value * experts * expert_parameters(d, h) / expert_shards
    value = bytes_per_value * layers
    keep_batch = 1 - 1 / batch_shards
    keep_expert = 1 - 1 / expert_shards
    keep_all = 1 - 1 / devices
    routed_rows = capacity_factor * k * tokens  # all devices together
    return {
        "devices": devices,
        "capacity": rows,
        "expert_weights_bytes": layers * weights,
        "optimizer_slot_bytes": layers * weights * slots,
        # dtensor: forward + backward, per direction
        "dtensor_to_experts_bytes": 2 * value * keep_batch * tokens * d,
        "dtensor_from_experts_bytes": 2 * value * keep_expert * experts * rows * d,
        "dtensor_gradient_gather_bytes": value * keep_expert * experts
        * expert_parameters(d, h),
        "dtensor_rows_per_device": experts * rows / expert_shards,
        # all-to-all over all devices: forward + backward, per direction
        "all_to_all_each_way_bytes": 2 * value * keep_all * routed_rows / devices * d,
        "all_to_all_rows_per_device": routed_rows / devices,
    }


def step_share(cost, d, h, layers, bandwidth, matmul_rate, scheme):
    """Share of the MoE layers' step time spent moving tokens (and, for
    `dtensor`, the gradient gather): `t_comm / (t_comm + t_experts)`, with
    `t_experts` = 3 (forward and backward) x 2 d h x 2 FLOPs per row."""
    flops_per_row = 3 * 2 * (2 * d * h)
    if scheme == "dtensor":
        moved = (cost["dtensor_to_experts_bytes"]
                 + cost["dtensor_from_experts_bytes"])
        rows = cost["dtensor_rows_per_device"]
    else:
        moved = 2 * cost["all_to_all_each_way_bytes"]
        rows = cost["all_to_all_rows_per_device"]
    communication = moved / bandwidth
    compute = layers * rows * flops_per_row / matmul_rate
    return communication / (communication + compute)


def _size(value):
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if value >= scale:
            return f"{value / scale:,.3g} {unit}"
    return f"{value:,.0f} B"


PAPER_CONFIGURATIONS = [
    # (name, experts, parameters said in the paper)
    ("MoE-4096-h", 4096, "4.3B"),
    ("MoE-16384-h", 16384, "17B"),
    ("MoE-65536-h", 65536, "68B"),
    ("MoE-131072-h", 131072, "137B"),
]


def paper_table(tokens, bandwidth, matmul_rate, capacity_factor,
                device_counts=(8, 64, 256, 1024)):
    """Markdown rows for the paper's largest configurations, every device
    on the expert axis (`b = 1`)."""
    d, h, k = 512, 1024, 4
    lines = [
        "| model | experts | devices | expert weights / device | Adam slots / device "
        "| dtensor: from experts / layer-step | dtensor: gradient gather / step "
        "| dtensor share | all-to-all: each way / layer-step | all-to-all share |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, experts, said in PAPER_CONFIGURATIONS:
        for devices in device_counts:
            cost = costs(d, h, experts, k, tokens, 1, devices,
                         capacity_factor=capacity_factor)
            lines.append(
                f"| {name} ({said}) | {experts:,} | {devices:,} "
                f"| {_size(cost['expert_weights_bytes'])} "
                f"| {_size(cost['optimizer_slot_bytes'])} "
                f"| {_size(cost['dtensor_from_experts_bytes'])} "
                f"| {_size(cost['dtensor_gradient_gather_bytes'])} "
                f"| {step_share(cost, d, h, 1, bandwidth, matmul_rate, 'dtensor'):.0%} "
                f"| {_size(cost['all_to_all_each_way_bytes'])} "
                f"| {step_share(cost, d, h, 1, bandwidth, matmul_rate, 'all_to_all'):.0%} |"
            )
    return "\n".join(lines)


VALIDATION_SCRIPT = """
import sys
import numpy as np
from keras_moe import distribution, expert_parallel
distribution.use_virtual_cpu_devices(4)
import tensorflow as tf
from tensorflow.experimental import dtensor
import keras, keras_moe
from benchmarks import scale

def shard_box(layout, shape, location):
    # the index ranges a device at `location` holds
    box = []
    for spec, size in zip(layout.sharding_specs, shape):
        if spec == dtensor.UNSHARDED:
            box.append((0, size))
        else:
            parts = layout.mesh.dim_size(spec)
            step = size // parts
            box.append((location[spec] * step, (location[spec] + 1) * step))
    return box

def received(shape, before, after):
    # bytes the busiest device receives: what it holds after minus the
    # part it held already
    most = 0
    for location in after.mesh.local_device_locations():
        held = shard_box(before, shape, location)
        wanted = shard_box(after, shape, location)
        total = np.prod([b - a for a, b in wanted])
        overlap = np.prod([max(0, min(b1, b2) - max(a1, a2))
                           for (a1, b1), (a2, b2) in zip(wanted, held)])
        most = max(most, 4 * (total - overlap))
    return int(most)

d, h, E, k, batch, length, cf = 16, 32, 8, 2, 8, 10, 2.0
# One mesh per process (DTensor): one process per mesh shape.
batch_shards = int(sys.argv[1])
keras.utils.set_random_seed(0)
inputs = keras.Input(shape=(length, d))
layer = keras_moe.MixtureOfExperts(E, h, k=k, capacity_factor=cf, seed=1, name="moe")
model = keras.Model(inputs, layer(inputs))
model.compile("sgd", "mse")
parallel = expert_parallel.ExpertParallel(batch_shards=batch_shards)
parallel.distribute(model)
moved = {"to_experts": 0, "from_experts": 0}
def record(direction, relayout):
    def hook(tensor):
        out = relayout(tensor)
        moved[direction] += received(tuple(tensor.shape), dtensor.fetch_layout(tensor),
                                     dtensor.fetch_layout(out))
        return out
    return hook
layer.set_expert_relayout(record("to_experts", parallel._to_expert_layout),
                          record("from_experts", parallel._to_token_layout))
x = np.random.default_rng(0).normal(size=(batch, length, d)).astype("float32")
with dtensor.default_mesh(parallel.mesh):
    layer(parallel.pack(x, parallel.replicated(3)), training=True)
cost = scale.costs(d, h, E, k, batch * length, batch_shards, 4 // batch_shards,
                   capacity_factor=cf)
# the formula's forward halves of the relaid-out tensors (the token
# gather of b > 1 happens inside dispatch's gather, not in a relayout)
formula = cost["dtensor_from_experts_bytes"] / 2
print(f"| {batch_shards}x{4 // batch_shards} | {batch * length} | {cost['capacity']} "
      f"| {moved['to_experts']} | 0 | {moved['from_experts']} | {formula:.0f} |")
print("DONE")
"""


def validate():
    """Runs the 4-device measurement (1x4 and 2x2 meshes, a process
    each); returns its markdown table."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_MOE_QUIET="1",
               KERAS_BACKEND="tensorflow")
    rows = []
    for batch_shards in (1, 2):
        result = subprocess.run(
            [sys.executable, "-c", VALIDATION_SCRIPT, str(batch_shards)],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
        )
        if result.returncode != 0 or "DONE" not in result.stdout:
            raise RuntimeError(result.stdout[-2000:] + result.stderr[-3000:])
        rows += [line for line in result.stdout.splitlines()
                 if line.startswith("|")]
    return "\n".join([
        "| mesh (b x n_e) | tokens | C | to experts, measured | to experts, formula "
        "| from experts, measured | from experts, formula |",
        "|---|---|---|---|---|---|---|",
    ] + rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--h", type=int, default=1024)
    parser.add_argument("--experts", type=int)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=1 << 20,
                        help="positions per training step, whole mesh")
    parser.add_argument("--mesh", default=None,
                        help="BxE: batch shards x expert shards")
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--bandwidth", type=float, default=25.0,
                        help="interconnect GB/s per device")
    parser.add_argument("--matmul-tflops", type=float, default=100.0)
    parser.add_argument("--validate", action="store_true")
    args = parser.parse_args(argv)
    bandwidth = args.bandwidth * 1e9
    matmul_rate = args.matmul_tflops * 1e12
    if args.experts and args.mesh:
        batch_shards, expert_shards = (int(v) for v in args.mesh.split("x"))
        cost = costs(args.d, args.h, args.experts, args.k, args.tokens,
                     batch_shards, expert_shards, args.capacity_factor,
                     args.layers)
        for key, value in cost.items():
            print(f"{key}: {_size(value) if key.endswith('bytes') else value}")
        for scheme in ("dtensor", "all_to_all"):
            share = step_share(cost, args.d, args.h, args.layers, bandwidth,
                               matmul_rate, scheme)
            print(f"{scheme} share of the MoE layers' step: {share:.0%}")
        return
    if args.validate or not args.experts:
        print("Bytes the busiest device receives in one forward pass of one "
              "MoE layer under ExpertParallel (4 virtual CPU devices, d=16, "
              "E=8, k=2, cf=2), counted from the relaid-out tensors' shapes "
              "and layouts, against `costs`:\n")
        print(validate())
        print()
    if not args.experts:
        print(f"The paper's largest configurations (d=512, h=1024, 4 experts "
              f"per position, cf={args.capacity_factor}, "
              f"{args.tokens:,} tokens per step, every device on the expert "
              f"axis; shares at {args.bandwidth:g} GB/s per device and "
              f"{args.matmul_tflops:g} TFLOP/s), per MoE layer:\n")
        print(paper_table(args.tokens, bandwidth, matmul_rate,
                          args.capacity_factor))


if __name__ == "__main__":
    main()
