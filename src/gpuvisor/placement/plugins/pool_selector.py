"""Filter: the device carries the labels the slice's pool selects (glob patterns)."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

from gpuvisor.inventory.device import Device
from gpuvisor.placement.framework import Cycle, DeviceInfo, Snapshot, Status


def selector_matches(selector: Mapping[str, str], device: Device) -> bool:
    """Return True when every selector label matches the device's label (glob patterns)."""
    labels = device.labels
    return all(
        fnmatch.fnmatchcase(labels.get(key, ""), pattern) for key, pattern in selector.items()
    )


class PoolSelector:
    name = "PoolSelector"

    def filter(self, cycle: Cycle, info: DeviceInfo, snapshot: Snapshot) -> Status:
        if selector_matches(cycle.pool.selector, info.device):
            return Status.success()
        return Status.unresolvable(self.name, f"not in pool '{cycle.request.pool}'")
