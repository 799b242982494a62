"""benchmarks.scale: the cost of expert parallelism on paper, and its byte
counts against what a 4-device run relays out."""

import math

import pytest

from benchmarks import scale


def test_costs_by_hand():
    # MoE-131072-h of the paper: 512 -> 1024 -> 512 experts, 4 per position
    cost = scale.costs(512, 1024, 131072, 4, 1 << 20, 1, 1024,
                       capacity_factor=1.25)
    per_expert = 512 * 1024 + 1024 + 1024 * 512 + 512
    assert per_expert * 131072 == pytest.approx(137.6e9, rel=1e-3)  # "137B"
    assert cost["expert_weights_bytes"] == 4 * 128 * per_expert
    assert cost["optimizer_slot_bytes"] == 2 * cost["expert_weights_bytes"]
    assert cost["capacity"] == math.ceil(1.25 * (1 << 20) * 4 / 131072) == 40
    # all-to-all: each device's cf*k*N/D rows, (1 - 1/D) of them leave,
    # forward and backward
    rows = 1.25 * 4 * (1 << 20) / 1024
    assert cost["all_to_all_each_way_bytes"] == pytest.approx(
        2 * 4 * rows * (1023 / 1024) * 512)
    # dtensor: every device gets all but its own experts' output rows
    assert cost["dtensor_from_experts_bytes"] == pytest.approx(
        2 * 4 * (1023 / 1024) * 131072 * 40 * 512)
    assert cost["dtensor_to_experts_bytes"] == 0  # b = 1: no token gather


def test_byte_counts_equal_what_four_devices_relay_out():
    """The formula's forward traffic equals the bytes counted from the
    relaid-out tensors' shapes and layouts on 1x4 and 2x2 meshes."""
    rows = [line.strip("| ").split(" | ")
            for line in scale.validate().splitlines()[2:]]
    assert [row[0] for row in rows] == ["1x4", "2x2"]
    for mesh, _, _, to_measured, to_formula, from_measured, from_formula in rows:
        assert int(to_measured) == int(to_formula) == 0
        assert int(from_measured) == int(float(from_formula)) > 0, mesh
    # E*C*d*4 bytes, of which 3/4 (1x4) or 1/2 (2x2) arrive from elsewhere
    assert int(rows[0][5]) == 8 * 40 * 16 * 4 * 3 // 4
    assert int(rows[1][5]) == 8 * 40 * 16 * 4 // 2
