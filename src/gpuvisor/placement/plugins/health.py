"""Filter: nothing new goes on a cordoned or unhealthy device."""

from __future__ import annotations

from gpuvisor.placement.framework import Cycle, DeviceInfo, Snapshot, Status


class DeviceHealth:
    name = "DeviceHealth"

    def filter(self, cycle: Cycle, info: DeviceInfo, snapshot: Snapshot) -> Status:
        device = info.device
        if device.cordoned:
            return Status.unresolvable(self.name, "cordoned by an operator")
        if not device.healthy:
            why = f": {device.health_reason}" if device.health_reason else ""
            return Status.unresolvable(self.name, f"device is unhealthy{why}")
        return Status.success()
