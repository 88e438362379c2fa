"""Which devices this node serves on: NVML GPUs, the host CPU, and a Fleet's simulated GPUs."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from gpuvisor.errors import ConfigError
from gpuvisor.inventory.cpu import discover_cpu
from gpuvisor.inventory.device import Device, Topology
from gpuvisor.inventory.nvml import discover_nvml
from gpuvisor.inventory.simulated import devices_from_fleet
from gpuvisor.units import format_size

if TYPE_CHECKING:
    from gpuvisor.spec.kinds import Fleet, NodeSpec

__all__ = ["discover"]

logger = logging.getLogger("gpuvisor.inventory")


def discover(node_spec: NodeSpec, fleet: Fleet | None = None) -> Topology:
    """Return this node's devices: NVML GPUs, then the CPU, then the fleet's simulated GPUs.

    ``nvml.enabled``: ``"auto"`` looks for GPUs and accepts none, ``True`` requires at least
    one, ``False`` skips NVML. ``cpu.enabled``: ``True`` always adds ``cpu-0``, ``False``
    never, ``"auto"`` only when NVML found no GPU (then the reason is logged). ``fleet`` is
    the already loaded Fleet document the node configuration's ``fleet`` path names.

    Raises ConfigError when ``nvml.enabled`` is true and no GPU is found, or when the node
    would end up with no device at all; SpecError (from the fleet) for an unknown GPU model.
    """
    gpus: list[Device] = []
    reason: str | None
    if node_spec.nvml.enabled is False:
        reason = "NVML disabled in the node configuration (nvml.enabled: false)"
    else:
        gpus, reason = discover_nvml()
        if not gpus and node_spec.nvml.enabled is True:
            raise ConfigError(
                f"nvml.enabled is true but no NVIDIA GPU was found ({reason}); "
                "set nvml.enabled to auto to serve on the CPU instead",
                field="nvml.enabled",
                reason=reason,
            )
    for gpu in gpus:
        gpu.concurrency = node_spec.nvml.concurrency
        if node_spec.nvml.quantum is not None:
            gpu.quantum = node_spec.nvml.quantum
        if node_spec.nvml.lookahead is not None:
            gpu.lookahead = node_spec.nvml.lookahead
    devices = list(gpus)
    cpu_config = node_spec.cpu
    if cpu_config.enabled is True or (cpu_config.enabled == "auto" and not gpus):
        cpu = discover_cpu(
            memory=cpu_config.memory,
            threads=cpu_config.threads,
            concurrency=cpu_config.concurrency,
            quantum=cpu_config.quantum,
            lookahead=cpu_config.lookahead,
        )
        devices.append(cpu)
        if not gpus:
            logger.info(
                "no NVIDIA GPU found (%s); serving on the CPU device %s (%d threads, %s memory budget)",
                reason,
                cpu.id,
                cpu.threads,
                format_size(cpu.memory_total),
            )
    if fleet is not None:
        devices.extend(devices_from_fleet(fleet))
    if not devices:
        raise ConfigError(
            f"this node has no device to serve on: no NVIDIA GPU found ({reason}), "
            "cpu.enabled is false and no fleet is configured; enable the CPU device "
            "(cpu.enabled: auto) or configure a fleet",
            field="cpu.enabled",
            reason=reason,
        )
    return Topology(devices)
