"""`gpuvisor bench placement`, run small: timing at scale and GPUs used against the optimum."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from gpuvisor.bench.placement import (
    PlacementConfig,
    build_fleet,
    optimal_by_patterns,
    optimal_by_placements,
    placement_command,
)
from gpuvisor.partition.mig import GEOMETRIES
from gpuvisor.partition.planner import first_fit_decreasing, plan_layouts

H100 = GEOMETRIES["H100-80GB"]
SMALL = PlacementConfig(
    gpus=60, mig_gpus=40, slices=500, partition_slices=100, repeat=1, small_instances=3
)


def test_the_scenario_has_the_asked_sizes() -> None:
    devices, workloads = build_fleet(SMALL)
    assert len(devices) == 60 and sum(d.mig_mode for d in devices) == 40
    assert sum(w.replicas for w in workloads) == 500
    assert sum(w.replicas for w in workloads if w.isolation == "partition") == 100
    with pytest.raises(ValueError):
        build_fleet(PlacementConfig(gpus=10, mig_gpus=11))


@pytest.mark.parametrize("partition", [10, 30, 33, 7])
def test_exactly_the_partition_slices_asked_for(partition: int) -> None:
    """The profile mix's shares, rounded one by one, once gave 31 for 30 and 9 for 10."""
    config = PlacementConfig(
        gpus=20, mig_gpus=10, slices=max(partition, 50), partition_slices=partition
    )
    _, workloads = build_fleet(config)
    assert sum(w.replicas for w in workloads if w.isolation == "partition") == partition


@pytest.mark.parametrize(
    "demand",
    [
        {"3g.40gb": 1, "2g.20gb": 2},  # first-fit decreasing needs 2
        {"4g.40gb": 2, "3g.40gb": 3, "1g.10gb": 3},
        {"7g.80gb": 1, "1g.10gb+me": 2, "1g.20gb": 5},
    ],
)
def test_both_integer_programs_find_the_same_optimum(demand: dict[str, int]) -> None:
    ffd = len(first_fit_decreasing(H100, demand))
    by_placements = optimal_by_placements(H100, demand, ffd)
    assert by_placements == optimal_by_patterns(H100, demand)
    assert by_placements <= len(plan_layouts(H100, demand)) <= ffd


def test_the_command_prints_both_tables_and_writes_json(tmp_path: Path) -> None:
    out = io.StringIO()
    output = tmp_path / "placement.json"
    assert placement_command(SMALL, output, Console(file=out, width=160)) == 0
    payload = json.loads(output.read_text())
    assert payload["benchmark"] == "placement"
    scale = payload["scale"]
    assert scale["slices"] == 500 and scale["plan"]["placed"] + scale["plan"]["pending"] == 500
    assert scale["plan_and_place_s"] > 0 and scale["place_on_existing_s"] > 0
    small = payload["optimality"]["small"]
    assert small["instances"] == 3
    assert small["optimum_gpus"] <= small["planner_gpus"] <= small["ffd_gpus"]
    big = payload["optimality"]["scale"]
    assert big["optimum"] <= big["planner"] <= big["ffd"]
    text = out.getvalue()
    assert "Placement at scale" in text and "against the exact optimum" in text
