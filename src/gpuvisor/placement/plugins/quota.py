"""PreFilter: the tenant's placed memory and guaranteed compute stay within its quota.

Applies are checked against quotas too (``control.quotas``); this catches a quota lowered
after the apply, so a replica beyond it waits Pending with the numbers instead of running.
"""

from __future__ import annotations

from gpuvisor.placement.framework import Cycle, Snapshot, Status
from gpuvisor.units import format_size


class TenantQuotaFit:
    name = "TenantQuota"

    def pre_filter(self, cycle: Cycle, snapshot: Snapshot) -> Status:
        request, quota = cycle.request, cycle.quota
        mine = [
            s
            for s in snapshot.slices()
            if s.tenant == request.tenant and s.slice_id != request.slice_id
        ]
        if quota.memory is not None:
            used = sum(s.memory for s in mine)
            if used + request.memory > quota.memory:
                return Status.unschedulable(
                    self.name,
                    f"tenant '{request.tenant}' memory quota: {format_size(used)} placed + "
                    f"{format_size(request.memory)} requested > {format_size(quota.memory)}",
                )
        if quota.compute is not None:
            used_share = sum(s.compute_share for s in mine)
            if used_share + request.compute_share > quota.compute + 1e-9:
                return Status.unschedulable(
                    self.name,
                    f"tenant '{request.tenant}' compute quota: {used_share:.2f} placed + "
                    f"{request.compute_share:.2f} requested > {quota.compute:.2f}",
                )
        return Status.success()
