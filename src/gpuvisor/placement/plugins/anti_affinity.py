"""Anti-affinity: replicas of an ``antiAffinity`` deployment never share a device (filter)
and prefer nodes that hold fewer of their siblings (score)."""

from __future__ import annotations

from gpuvisor.placement.framework import Cycle, DeviceInfo, PlacedSlice, Snapshot, Status


def _siblings(cycle: Cycle, slices: list[PlacedSlice]) -> list[PlacedSlice]:
    request = cycle.request
    return [
        s
        for s in slices
        if s.tenant == request.tenant
        and s.deployment == request.deployment
        and s.slice_id != request.slice_id
    ]


class AntiAffinity:
    name = "AntiAffinity"

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = weight

    def filter(self, cycle: Cycle, info: DeviceInfo, snapshot: Snapshot) -> Status:
        if not cycle.request.anti_affinity:
            return Status.success()
        siblings = _siblings(cycle, info.slices)
        if siblings:
            return Status.unschedulable(
                self.name,
                f"antiAffinity: replica {siblings[0].slice_id} of deployment "
                f"'{cycle.request.deployment}' is on this device",
            )
        return Status.success()

    def score(self, cycle: Cycle, info: DeviceInfo, snapshot: Snapshot) -> float:
        if not cycle.request.anti_affinity:
            return 0.0
        return 100.0 / (1 + len(_siblings(cycle, snapshot.on_node(info.device.node))))
