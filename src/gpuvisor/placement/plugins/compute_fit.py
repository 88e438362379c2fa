"""Filter: the guaranteed compute shares on a device sum to at most 1."""

from __future__ import annotations

from gpuvisor.placement.framework import Cycle, DeviceInfo, Snapshot, Status


class ComputeFit:
    name = "ComputeFit"

    def filter(self, cycle: Cycle, info: DeviceInfo, snapshot: Snapshot) -> Status:
        request = cycle.request
        if request.isolation == "partition" or request.compute_share <= 0:
            return Status.success()
        share = info.share_used
        if share + request.compute_share > 1.0 + 1e-9:
            return Status.unschedulable(
                self.name,
                f"compute shares would sum to {share + request.compute_share:.2f} > 1 "
                f"({share:.2f} already guaranteed)",
            )
        return Status.success()
