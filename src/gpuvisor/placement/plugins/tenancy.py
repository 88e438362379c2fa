"""Filter: a ``dedicated`` pool gives each device to one tenant at a time."""

from __future__ import annotations

from gpuvisor.placement.framework import Cycle, DeviceInfo, Snapshot, Status


class Tenancy:
    name = "Tenancy"

    def filter(self, cycle: Cycle, info: DeviceInfo, snapshot: Snapshot) -> Status:
        if cycle.pool.tenancy != "dedicated":
            return Status.success()
        others = sorted({s.tenant for s in info.slices if s.tenant != cycle.request.tenant})
        if others:
            return Status.unschedulable(
                self.name,
                f"pool is dedicated and tenant '{others[0]}' has slices on this device",
            )
        return Status.success()
