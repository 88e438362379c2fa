"""Filter: a ``dedicated`` pool gives each device to one tenant at a time, whichever pool the
other tenants' slices come from (pools may select the same devices)."""

from __future__ import annotations

from gpuvisor.placement.framework import Cycle, DeviceInfo, Snapshot, Status


class Tenancy:
    name = "Tenancy"

    def filter(self, cycle: Cycle, info: DeviceInfo, snapshot: Snapshot) -> Status:
        tenant = cycle.request.tenant
        if cycle.pool.tenancy != "dedicated":
            holder = next((s for s in info.slices if s.dedicated and s.tenant != tenant), None)
            if holder is not None:
                return Status.unschedulable(
                    self.name,
                    "another tenant holds this device through a dedicated pool",
                )
            return Status.success()
        others = sorted({s.tenant for s in info.slices if s.tenant != tenant})
        if others:
            return Status.unschedulable(
                self.name,
                "pool is dedicated and another tenant has slices on this device",
            )
        return Status.success()
