"""Which devices a node serves on, for each combination of nvml/cpu settings and a fleet."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from gpuvisor.errors import ConfigError
from gpuvisor.inventory import discovery
from gpuvisor.inventory.device import Device
from gpuvisor.inventory.discovery import discover
from gpuvisor.spec.kinds import Fleet, NodeSpec

GIB = 2**30
NO_GPU = "NVML library not found"


def node_spec(**settings: Any) -> NodeSpec:
    return NodeSpec.model_validate(settings)


def nvml_gpu(index: int) -> Device:
    return Device(f"gpu-{index}", "gpu", "nvml", "H100-80GB", 80 * GIB, index=index)


@pytest.fixture
def nvml_finds(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Make NVML discovery return the given GPUs (or the 'no library' reason when none)."""

    def set_gpus(count: int) -> list[str]:
        calls: list[str] = []

        def fake_discover_nvml() -> tuple[list[Device], str | None]:
            calls.append("discover_nvml")
            gpus = [nvml_gpu(i) for i in range(count)]
            return gpus, None if gpus else NO_GPU

        monkeypatch.setattr(discovery, "discover_nvml", fake_discover_nvml)
        return calls

    return set_gpus


@pytest.mark.parametrize(
    ("gpus", "cpu_enabled", "expected_ids"),
    [
        (0, "auto", ["cpu-0"]),
        (2, "auto", ["gpu-0", "gpu-1"]),
        (2, True, ["gpu-0", "gpu-1", "cpu-0"]),
        (0, True, ["cpu-0"]),
        (2, False, ["gpu-0", "gpu-1"]),
    ],
)
def test_cpu_device_joins_when_enabled_or_when_auto_finds_no_gpu(
    nvml_finds: Any, gpus: int, cpu_enabled: Any, expected_ids: list[str]
) -> None:
    nvml_finds(gpus)
    topology = discover(node_spec(cpu={"enabled": cpu_enabled}))
    assert [d.id for d in topology] == expected_ids


def test_no_gpu_logs_why_and_what_the_cpu_device_offers(
    nvml_finds: Any, caplog: pytest.LogCaptureFixture
) -> None:
    nvml_finds(0)
    with caplog.at_level(logging.INFO, logger="gpuvisor.inventory"):
        discover(node_spec(cpu={"memory": "2Gi", "threads": 3}))
    assert caplog.messages == [
        "no NVIDIA GPU found (NVML library not found); serving on the CPU device cpu-0 "
        "(3 threads, 2Gi memory budget)"
    ]


def test_gpus_found_means_no_cpu_line(nvml_finds: Any, caplog: pytest.LogCaptureFixture) -> None:
    nvml_finds(1)
    with caplog.at_level(logging.INFO, logger="gpuvisor.inventory"):
        discover(node_spec(cpu={"enabled": True}))
    assert caplog.messages == []


def test_cpu_settings_reach_the_device(nvml_finds: Any) -> None:
    nvml_finds(0)
    spec = node_spec(
        cpu={"memory": "3Gi", "threads": 2, "concurrency": 2, "quantum": "5ms", "lookahead": 0}
    )
    cpu = discover(spec).get("cpu-0")
    assert cpu is not None
    assert (cpu.memory_total, cpu.threads, cpu.concurrency, cpu.quantum, cpu.lookahead) == (
        3 * GIB,
        2,
        2,
        0.005,
        0.0,
    )
    nvml_finds(0)
    assert discover(node_spec()).devices[0].lookahead == 0.002  # the CPU's default


def test_nvml_disabled_is_never_called(nvml_finds: Any, caplog: pytest.LogCaptureFixture) -> None:
    calls = nvml_finds(2)
    with caplog.at_level(logging.INFO, logger="gpuvisor.inventory"):
        topology = discover(node_spec(nvml={"enabled": False}))
    assert calls == []
    assert [d.id for d in topology] == ["cpu-0"]
    assert "NVML disabled in the node configuration" in caplog.text


def test_nvml_required_but_missing_is_a_config_error(nvml_finds: Any) -> None:
    nvml_finds(0)
    with pytest.raises(
        ConfigError,
        match=r"nvml.enabled is true but no NVIDIA GPU was found \(NVML library not found\)",
    ):
        discover(node_spec(nvml={"enabled": True}))


def test_no_device_at_all_is_a_config_error(nvml_finds: Any) -> None:
    nvml_finds(0)
    with pytest.raises(ConfigError, match="this node has no device to serve on"):
        discover(node_spec(cpu={"enabled": False}))


def test_fleet_devices_follow_the_local_ones(nvml_finds: Any) -> None:
    nvml_finds(0)
    fleet = Fleet.model_validate(
        {
            "apiVersion": "gpuvisor/v1",
            "kind": "Fleet",
            "metadata": {"name": "lab"},
            "spec": {"nodes": [{"name": "edge-1", "devices": [{"model": "L4", "count": 2}]}]},
        }
    )
    with_cpu = discover(node_spec(), fleet)
    assert [d.id for d in with_cpu] == ["cpu-0", "edge-1/gpu-0", "edge-1/gpu-1"]
    fleet_only = discover(node_spec(cpu={"enabled": False}), fleet)
    assert [d.backend for d in fleet_only] == ["simulated", "simulated"]


def test_real_discovery_on_this_machine() -> None:
    topology = discover(node_spec())
    if topology.gpus:
        assert all(d.backend == "nvml" for d in topology.gpus)
        assert topology.cpus == []
    else:
        assert [d.id for d in topology] == ["cpu-0"]
        cpu = topology.devices[0]
        assert cpu.memory_total > 0
        assert cpu.threads is not None and cpu.threads >= 1


def test_gpu_scheduling_settings_come_from_the_nvml_section(nvml_finds: Any) -> None:
    nvml_finds(2)
    defaults = discover(node_spec())
    assert [(d.concurrency, d.quantum, d.lookahead) for d in defaults.devices] == [
        (1, 0.002, 0.001)
    ] * 2
    nvml_finds(2)
    tuned = discover(node_spec(nvml={"concurrency": 2, "quantum": "5ms", "lookahead": "500us"}))
    assert [(d.concurrency, d.quantum, d.lookahead) for d in tuned.devices] == [
        (2, 0.005, 0.0005)
    ] * 2
