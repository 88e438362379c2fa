"""Reserve: the snapshot counts the slice on its device (and its MIG instance), so the
next cycle against the same snapshot sees it; Unreserve takes it back."""

from __future__ import annotations

from gpuvisor.placement.framework import Cycle, PlacedSlice, Snapshot, Status


class SnapshotReserve:
    name = "SnapshotReserve"

    def reserve(self, cycle: Cycle, device_id: str, snapshot: Snapshot) -> Status:
        r = cycle.request
        snapshot.add(
            PlacedSlice(
                r.slice_id,
                r.tenant,
                device_id,
                r.memory,
                r.compute_share,
                r.isolation,
                cycle.data.get("mig_start", {}).get(device_id),
                r.deployment,
                r.numa,
                cycle.pool.tenancy == "dedicated",
            )
        )
        return Status.success()

    def unreserve(self, cycle: Cycle, device_id: str, snapshot: Snapshot) -> None:
        snapshot.remove(cycle.request.slice_id)
