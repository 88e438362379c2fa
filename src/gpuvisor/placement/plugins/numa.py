"""NUMA: a ``numa: dedicated`` slice gets a NUMA node no other tenant uses (filter, both
ways: nothing of another tenant joins it either); a ``numa: local`` slice prefers the NUMA
node with the fewest other tenants' slices, whose CPU cores its worker then has mostly to
itself (score)."""

from __future__ import annotations

from gpuvisor.placement.framework import Cycle, DeviceInfo, Snapshot, Status


def _where(info: DeviceInfo) -> str:
    device = info.device
    if device.numa_node is None:
        return f"node {device.node}"
    return f"NUMA node {device.numa_node} of {device.node}"


class NumaPlacement:
    name = "NumaPlacement"

    def __init__(self, weight: float = 0.5) -> None:
        self.weight = weight

    def filter(self, cycle: Cycle, info: DeviceInfo, snapshot: Snapshot) -> Status:
        tenant = cycle.request.tenant
        domain = snapshot.in_numa_domain(info.device)
        holder = next((s for s in domain if s.numa == "dedicated" and s.tenant != tenant), None)
        if holder is not None:
            return Status.unschedulable(self.name, f"{_where(info)} is dedicated to another tenant")
        if cycle.request.numa == "dedicated":
            others = sorted({s.tenant for s in domain if s.tenant != tenant})
            if others:
                return Status.unschedulable(
                    self.name,
                    f"numa 'dedicated' needs a NUMA node of its own; another tenant has "
                    f"slices on {_where(info)}",
                )
        return Status.success()

    def score(self, cycle: Cycle, info: DeviceInfo, snapshot: Snapshot) -> float:
        if cycle.request.numa != "local":
            return 0.0
        tenant = cycle.request.tenant
        others = sum(1 for s in snapshot.in_numa_domain(info.device) if s.tenant != tenant)
        return 100.0 / (1 + others)
