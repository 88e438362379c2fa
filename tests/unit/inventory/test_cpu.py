"""The CPU device: model name, memory budget, thread count and setting validation."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import psutil
import pytest

from gpuvisor.errors import ConfigError
from gpuvisor.inventory import cpu as cpu_module
from gpuvisor.inventory.cpu import (
    discover_cpu,
    read_cpu_model,
    usable_cpu_count,
    usable_memory,
)
from gpuvisor.inventory.device import DEFAULT_CPU_QUANTUM

GIB = 2**30


def test_cpu_model_comes_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6338\n"
        "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Gold 6338\n"
    )
    assert read_cpu_model(cpuinfo) == "Intel(R) Xeon(R) Gold 6338"


@pytest.mark.parametrize("content", [None, "processor\t: 0\nCPU part\t: 0xd0c\n"])
def test_cpu_model_falls_back_to_platform(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str | None
) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    if content is not None:
        cpuinfo.write_text(content)
    monkeypatch.setattr(platform, "processor", lambda: "aarch64-test")
    assert read_cpu_model(cpuinfo) == "aarch64-test"


@pytest.mark.parametrize(
    ("files", "expected_limit"),
    [
        ({"memory.max": str(2 * GIB)}, 2 * GIB),  # cgroup v2
        ({"memory.max": "max"}, None),
        ({"memory/memory.limit_in_bytes": str(3 * GIB)}, 3 * GIB),  # cgroup v1
        ({"memory/memory.limit_in_bytes": "9223372036854771712"}, None),  # v1 "unlimited"
        ({}, None),
    ],
)
def test_usable_memory_honours_a_lower_cgroup_limit(
    tmp_path: Path, files: dict[str, str], expected_limit: int | None
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text + "\n")
    host = psutil.virtual_memory().total
    expected = host if expected_limit is None else min(host, expected_limit)
    assert usable_memory(tmp_path) == expected


def test_usable_memory_ignores_a_limit_above_host_ram(tmp_path: Path) -> None:
    host = psutil.virtual_memory().total
    (tmp_path / "memory.max").write_text(str(host * 4))
    assert usable_memory(tmp_path) == host


def test_defaults_are_half_the_memory_and_half_the_cpus() -> None:
    device = discover_cpu()
    assert device.id == "cpu-0"
    assert (device.kind, device.backend, device.node) == ("cpu", "cpu", "local")
    assert device.model == read_cpu_model()
    assert device.memory_total == usable_memory() // 2
    assert device.threads == max(1, usable_cpu_count() // 2)
    assert device.concurrency == 1
    assert device.quantum == DEFAULT_CPU_QUANTUM


@pytest.mark.parametrize(("cpus", "threads"), [(1, 1), (2, 1), (3, 1), (16, 8), (96, 48)])
def test_default_threads_are_half_the_cpus_but_at_least_one(
    monkeypatch: pytest.MonkeyPatch, cpus: int, threads: int
) -> None:
    monkeypatch.setattr(cpu_module, "usable_cpu_count", lambda: cpus)
    assert discover_cpu().threads == threads


def test_explicit_settings_win() -> None:
    device = discover_cpu(memory=3 * GIB, threads=5, concurrency=2, quantum=0.025)
    assert (device.memory_total, device.threads, device.concurrency, device.quantum) == (
        3 * GIB,
        5,
        2,
        0.025,
    )


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"memory": 0}, "cpu.memory"),
        ({"threads": 0}, "cpu.threads"),
        ({"concurrency": 0}, "cpu.concurrency"),
        ({"quantum": 0.0}, "cpu.quantum"),
        ({"lookahead": -0.001}, "cpu.lookahead"),
    ],
)
def test_out_of_range_settings_name_the_field(settings: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field) as caught:
        discover_cpu(**settings)
    assert caught.value.fields["field"] == field
