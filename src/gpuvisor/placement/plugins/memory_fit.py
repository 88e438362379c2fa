"""Filter: the slices' memory caps plus the pool's headroom fit in the device's memory.

A partition-tier slice gets its MIG instance's memory, so it is not counted here.
"""

from __future__ import annotations

from gpuvisor.placement.framework import Cycle, DeviceInfo, Snapshot, Status
from gpuvisor.units import format_size


class MemoryFit:
    name = "MemoryFit"

    def filter(self, cycle: Cycle, info: DeviceInfo, snapshot: Snapshot) -> Status:
        request = cycle.request
        if request.isolation == "partition":
            return Status.success()
        total, headroom = info.device.memory_total, cycle.pool.memory_headroom
        if request.memory + headroom > total:
            what = f"{format_size(request.memory, 'up')} requested"
            if headroom:
                what += f" + {format_size(headroom, 'up')} headroom"
            total_text = format_size(total, "down")
            return Status.unresolvable(self.name, f"{what} > {total_text} on this device")
        free = total - headroom - info.memory_used
        if request.memory > free:
            kept = f" ({format_size(headroom)} headroom kept)" if headroom else ""
            return Status.unschedulable(
                self.name,
                f"{format_size(max(0, free), 'down')} free < {format_size(request.memory, 'up')} "
                f"requested{kept}",
            )
        return Status.success()
