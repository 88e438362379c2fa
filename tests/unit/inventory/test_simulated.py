"""Simulated GPUs from a Fleet document, and the GPU catalogue behind them."""

from __future__ import annotations

from typing import Any

import pytest

from gpuvisor.errors import SpecError
from gpuvisor.inventory.simulated import (
    GPU_CATALOGUE,
    devices_from_fleet,
    lookup_gpu_model,
    match_nvml_name,
)
from gpuvisor.spec.kinds import Fleet

GIB = 2**30


def fleet(nodes: list[dict[str, Any]], name: str = "lab") -> Fleet:
    return Fleet.model_validate(
        {
            "apiVersion": "gpuvisor/v1",
            "kind": "Fleet",
            "metadata": {"name": name},
            "spec": {"nodes": nodes},
        }
    )


DESIGN_EXAMPLE = [
    {
        "name": "edge-1",
        "numaNodes": 2,
        "devices": [
            {"model": "H100-80GB", "count": 4, "numa": 0, "mig": {"enabled": True}},
            {"model": "A100-40GB", "count": 2, "numa": 1},
        ],
    }
]


def test_catalogue_has_the_documented_models() -> None:
    assert set(GPU_CATALOGUE) == {
        "H100-80GB",
        "H100-94GB",
        "H200-141GB",
        "A100-40GB",
        "A100-80GB",
        "L4",
        "T4",
        "L40S",
    }
    assert GPU_CATALOGUE["H200-141GB"].memory == 141 * GIB
    assert GPU_CATALOGUE["A100-80GB"].sm_count == 108


def test_the_design_example_becomes_six_devices() -> None:
    devices = devices_from_fleet(fleet(DESIGN_EXAMPLE))
    assert [d.id for d in devices] == [f"edge-1/gpu-{i}" for i in range(6)]
    assert [d.index for d in devices] == list(range(6))
    assert [d.model for d in devices] == ["H100-80GB"] * 4 + ["A100-40GB"] * 2
    assert [d.numa_node for d in devices] == [0, 0, 0, 0, 1, 1]
    assert [d.mig_mode for d in devices] == [True] * 4 + [False] * 2
    assert [d.memory_total for d in devices] == [80 * GIB] * 4 + [40 * GIB] * 2
    assert [d.sm_count for d in devices] == [132] * 4 + [108] * 2
    assert {(d.kind, d.backend, d.node) for d in devices} == {("gpu", "simulated", "edge-1")}
    assert len({d.uuid for d in devices}) == 6
    assert devices[0].labels["node"] == "edge-1"


def test_numbering_restarts_per_node_and_uuids_are_stable() -> None:
    nodes = [
        {"name": "a", "devices": [{"model": "L4", "count": 2}]},
        {"name": "b", "devices": [{"model": "t4"}, {"model": "l40s"}]},
    ]
    devices = devices_from_fleet(fleet(nodes))
    assert [(d.id, d.model) for d in devices] == [
        ("a/gpu-0", "L4"),
        ("a/gpu-1", "L4"),
        ("b/gpu-0", "T4"),
        ("b/gpu-1", "L40S"),
    ]
    again = devices_from_fleet(fleet(nodes))
    assert [d.uuid for d in again] == [d.uuid for d in devices]
    other_fleet = devices_from_fleet(fleet(nodes, name="other"))
    assert not {d.uuid for d in other_fleet} & {d.uuid for d in devices}


def test_unknown_models_are_all_reported_with_the_known_ones() -> None:
    nodes = [
        {"name": "a", "devices": [{"model": "H100-80G"}, {"model": "L4"}]},
        {"name": "b", "devices": [{"model": "MI300X"}]},
    ]
    with pytest.raises(SpecError) as caught:
        devices_from_fleet(fleet(nodes))
    lines = caught.value.message.splitlines()
    known = ", ".join(GPU_CATALOGUE)
    assert lines == [
        "Fleet/lab: spec.nodes[0].devices[0].model: unknown GPU model 'H100-80G' "
        f"(did you mean 'H100-80GB'?); known models: {known}",
        f"Fleet/lab: spec.nodes[1].devices[0].model: unknown GPU model 'MI300X'; known models: {known}",
    ]
    problems = caught.value.fields["problems"]
    assert [p["path"] for p in problems] == [
        "spec.nodes[0].devices[0].model",
        "spec.nodes[1].devices[0].model",
    ]


def test_mig_on_a_gpu_without_mig_is_an_error() -> None:
    nodes = [{"name": "a", "devices": [{"model": "L4", "mig": {"enabled": True}}]}]
    with pytest.raises(
        SpecError, match=r"spec.nodes\[0\].devices\[0\].mig.enabled: L4 does not support MIG"
    ):
        devices_from_fleet(fleet(nodes))


def test_errors_name_where_the_fleet_came_from() -> None:
    document = fleet([{"name": "a", "devices": [{"model": "nope"}]}])
    document._origin = "fleet.yaml doc 1"
    with pytest.raises(SpecError, match=r"^fleet.yaml doc 1 Fleet/lab: spec.nodes\[0\]"):
        devices_from_fleet(document)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("h100-80gb", "H100-80GB"), (" L4 ", "L4"), ("A100-80GB", "A100-80GB"), ("H100", None)],
)
def test_lookup_is_case_insensitive(name: str, expected: str | None) -> None:
    model = lookup_gpu_model(name)
    assert (model.name if model else None) == expected


@pytest.mark.parametrize(
    ("nvml_name", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "H100-80GB"),
        ("NVIDIA H100 NVL", "H100-94GB"),
        ("NVIDIA H200", "H200-141GB"),
        ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
        ("NVIDIA A100-PCIE-40GB", "A100-40GB"),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA A100 80GB PCIe", "A100-80GB"),
        ("NVIDIA L4", "L4"),
        ("Tesla T4", "T4"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L40", None),
        ("NVIDIA H100 PCIe", None),  # 114 SMs: not the catalogue's SXM H100
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_nvml_names_map_to_catalogue_models(nvml_name: str, expected: str | None) -> None:
    model = match_nvml_name(nvml_name)
    assert (model.name if model else None) == expected
