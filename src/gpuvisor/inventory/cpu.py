"""The host CPU as one device: what a node without a GPU serves on, and what CI tests."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import psutil

from gpuvisor.errors import ConfigError
from gpuvisor.inventory.device import DEFAULT_CPU_QUANTUM, Device

__all__ = ["CPU_DEVICE_ID", "discover_cpu", "read_cpu_model", "usable_cpu_count", "usable_memory"]

CPU_DEVICE_ID = "cpu-0"

# cgroup v1 reports "no limit" as a huge page-aligned number rather than "max".
_NO_CGROUP_LIMIT = 2**60


def read_cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """Return the CPU's marketing name from ``/proc/cpuinfo``, else what ``platform`` knows."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def usable_cpu_count() -> int:
    """Return how many CPUs this process may run on (its affinity mask, else the host count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _cgroup_memory_limit(cgroup_root: Path) -> int | None:
    """Return the container's memory limit in bytes (cgroup v2, then v1), or None when unlimited."""
    for candidate in (cgroup_root / "memory.max", cgroup_root / "memory" / "memory.limit_in_bytes"):
        try:
            text = candidate.read_text().strip()
        except OSError:
            continue
        if text == "max" or not text.isdigit():
            return None
        limit = int(text)
        return limit if 0 < limit < _NO_CGROUP_LIMIT else None
    return None


def usable_memory(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Return the RAM this process can use: host RAM, or the container's cgroup limit when lower."""
    total = int(psutil.virtual_memory().total)
    limit = _cgroup_memory_limit(cgroup_root)
    return min(total, limit) if limit is not None else total


def discover_cpu(
    memory: int | None = None,
    threads: int | None = None,
    concurrency: int = 1,
    quantum: float | None = None,
    lookahead: float | None = None,
) -> Device:
    """Return the host CPU as device ``cpu-0``.

    ``memory`` defaults to half of ``usable_memory()``, ``threads`` to half the usable CPUs
    (at least one), ``quantum`` to ``DEFAULT_CPU_QUANTUM``. Raises ConfigError when a given
    value is out of range, naming the ``cpu`` setting to fix.
    """
    if memory is not None and memory <= 0:
        raise ConfigError(f"cpu.memory must be a positive size, got {memory}", field="cpu.memory")
    if threads is not None and threads < 1:
        raise ConfigError(f"cpu.threads must be at least 1, got {threads}", field="cpu.threads")
    if concurrency < 1:
        raise ConfigError(
            f"cpu.concurrency must be at least 1, got {concurrency}", field="cpu.concurrency"
        )
    if quantum is not None and quantum <= 0:
        raise ConfigError(f"cpu.quantum must be positive, got {quantum}", field="cpu.quantum")
    if lookahead is not None and lookahead < 0:
        raise ConfigError(
            f"cpu.lookahead cannot be negative, got {lookahead} (0 turns it off)",
            field="cpu.lookahead",
        )
    return Device(
        id=CPU_DEVICE_ID,
        kind="cpu",
        backend="cpu",
        model=read_cpu_model(),
        memory_total=memory if memory is not None else usable_memory() // 2,
        threads=threads if threads is not None else max(1, usable_cpu_count() // 2),
        concurrency=concurrency,
        quantum=quantum if quantum is not None else DEFAULT_CPU_QUANTUM,
        lookahead=lookahead,
    )
