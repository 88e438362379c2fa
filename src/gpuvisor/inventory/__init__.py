"""gpuvisor.inventory: the devices a node serves on (CPU, NVML GPUs, simulated GPUs)."""

from __future__ import annotations

from gpuvisor.inventory.cpu import discover_cpu
from gpuvisor.inventory.device import (
    DEFAULT_CPU_QUANTUM,
    DEFAULT_GPU_QUANTUM,
    Device,
    DeviceBackend,
    DeviceKind,
    Topology,
)
from gpuvisor.inventory.discovery import discover
from gpuvisor.inventory.nvml import discover_nvml
from gpuvisor.inventory.simulated import GPU_CATALOGUE, GpuModel, devices_from_fleet

__all__ = [
    "DEFAULT_CPU_QUANTUM",
    "DEFAULT_GPU_QUANTUM",
    "GPU_CATALOGUE",
    "Device",
    "DeviceBackend",
    "DeviceKind",
    "GpuModel",
    "Topology",
    "devices_from_fleet",
    "discover",
    "discover_cpu",
    "discover_nvml",
]
