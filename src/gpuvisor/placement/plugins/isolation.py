"""Filter: the isolation tiers. ``exclusive`` takes a whole empty device and nothing joins it;
``partition`` takes a free MIG instance of its profile (and only partition slices go on a
MIG-enabled GPU); ``process`` and ``shared`` share a device within its memory and compute."""

from __future__ import annotations

from gpuvisor.partition.placement import partition_refusal
from gpuvisor.placement.framework import Cycle, DeviceInfo, Snapshot, Status


class IsolationTier:
    name = "IsolationTier"

    def filter(self, cycle: Cycle, info: DeviceInfo, snapshot: Snapshot) -> Status:
        request, device, on_device = cycle.request, info.device, info.slices
        if request.isolation == "partition":
            held = {s.mig_start for s in on_device if s.mig_start is not None}
            reason, start = partition_refusal(request.mig_profile or "", device, held)
            if reason is not None:
                return Status.unschedulable(self.name, reason)
            cycle.data.setdefault("mig_start", {})[device.id] = start
            return Status.success()
        if device.mig_mode:
            return Status.unresolvable(
                self.name,
                "MIG is enabled on this GPU: only slices with isolation 'partition' run on it",
            )
        if any(s.isolation == "exclusive" for s in on_device):
            return Status.unschedulable(self.name, "held exclusively by another slice")
        if request.isolation == "exclusive" and on_device:
            return Status.unschedulable(
                self.name,
                f"isolation 'exclusive' needs an empty device; {len(on_device)} slice(s) are on it",
            )
        return Status.success()
