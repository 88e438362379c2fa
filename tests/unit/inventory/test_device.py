"""Device and Topology: defaults, validation, labels and the dict round trip."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpuvisor.inventory.device import (
    DEFAULT_CPU_QUANTUM,
    DEFAULT_GPU_QUANTUM,
    Device,
    Topology,
)


def gpu(device_id: str = "gpu-0", **overrides: Any) -> Device:
    fields: dict[str, Any] = {
        "id": device_id,
        "kind": "gpu",
        "backend": "nvml",
        "model": "H100-80GB",
        "memory_total": 80 * 2**30,
    }
    fields.update(overrides)
    return Device(**fields)


@pytest.mark.parametrize(
    ("kind", "backend", "quantum", "expected"),
    [
        ("cpu", "cpu", 0.0, DEFAULT_CPU_QUANTUM),
        ("gpu", "nvml", 0.0, DEFAULT_GPU_QUANTUM),
        ("gpu", "simulated", 0.0, DEFAULT_GPU_QUANTUM),
        ("cpu", "cpu", 0.005, 0.005),
        ("gpu", "nvml", 0.0005, 0.0005),
    ],
)
def test_quantum_defaults_per_kind(
    kind: Any, backend: Any, quantum: float, expected: float
) -> None:
    device = Device("d", kind, backend, "m", 1, quantum=quantum)
    assert device.quantum == expected


def test_default_quanta_are_10ms_cpu_and_2ms_gpu() -> None:
    assert (DEFAULT_CPU_QUANTUM, DEFAULT_GPU_QUANTUM) == (0.010, 0.002)


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [
        ({"id": ""}, "non-empty id"),
        ({"kind": "tpu"}, "kind must be"),
        ({"backend": "rocm"}, "backend must be"),
        ({"memory_total": -1}, "memory_total"),
        ({"concurrency": 0}, "concurrency"),
        ({"threads": 0}, "threads"),
        ({"quantum": -0.001}, "quantum"),
        ({"lookahead": -0.001}, "lookahead"),
    ],
)
def test_invalid_fields_are_rejected(overrides: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        gpu(**overrides)


def test_labels_are_what_pool_selectors_match() -> None:
    device = gpu("edge-1/gpu-3", backend="simulated", node="edge-1")
    assert device.labels == {
        "kind": "gpu",
        "backend": "simulated",
        "model": "H100-80GB",
        "id": "edge-1/gpu-3",
        "node": "edge-1",
    }


def test_to_dict_is_json_ready_and_ignores_labels_on_the_way_back() -> None:
    device = gpu(uuid="GPU-1", sm_count=132, numa_node=1, pci_bus_id="0000:3b:00.0", index=0)
    data = json.loads(json.dumps(device.to_dict()))
    assert data["quantum"] == DEFAULT_GPU_QUANTUM
    assert Device.from_dict({**data, "labels": device.labels}) == device


devices = st.builds(
    Device,
    id=st.text(min_size=1, max_size=20),
    kind=st.sampled_from(["cpu", "gpu"]),
    backend=st.sampled_from(["cpu", "nvml", "simulated"]),
    model=st.text(max_size=30),
    memory_total=st.integers(min_value=0, max_value=2**50),
    uuid=st.text(max_size=40),
    sm_count=st.none() | st.integers(min_value=1, max_value=500),
    numa_node=st.none() | st.integers(min_value=0, max_value=7),
    pci_bus_id=st.none() | st.text(max_size=16),
    mig_mode=st.booleans(),
    threads=st.none() | st.integers(min_value=1, max_value=512),
    concurrency=st.integers(min_value=1, max_value=16),
    quantum=st.floats(min_value=0.0, max_value=1.0),
    node=st.text(min_size=1, max_size=20),
    healthy=st.booleans(),
    index=st.none() | st.integers(min_value=0, max_value=15),
)


@given(devices)
def test_dict_round_trip_keeps_every_field(device: Device) -> None:
    assert Device.from_dict(json.loads(json.dumps(device.to_dict()))) == device
    assert device.quantum > 0


def test_topology_finds_devices_by_id_and_splits_kinds() -> None:
    cpu = Device("cpu-0", "cpu", "cpu", "AMD EPYC", 8 * 2**30, threads=4)
    gpus = [gpu("gpu-0"), gpu("gpu-1", index=1)]
    topology = Topology([*gpus, cpu])
    assert topology.get("gpu-1") is gpus[1]
    assert topology.get("gpu-7") is None
    assert topology.gpus == gpus
    assert topology.cpus == [cpu]
    assert len(topology) == 3
    assert [d.id for d in topology] == ["gpu-0", "gpu-1", "cpu-0"]
    assert topology.to_dict()["devices"][2]["threads"] == 4


def test_topology_rejects_duplicate_ids() -> None:
    with pytest.raises(ValueError, match="duplicate device id 'gpu-0'"):
        Topology([gpu("gpu-0"), gpu("gpu-0")])
