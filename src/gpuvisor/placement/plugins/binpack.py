"""Score (pools with ``placement: binpack``, the default): the device left fullest wins,
which keeps whole devices free for exclusive slices and large models."""

from __future__ import annotations

from gpuvisor.placement.framework import Cycle, DeviceInfo, Snapshot


def fullness_after(cycle: Cycle, info: DeviceInfo) -> float:
    """Return 0-1: the device's memory and compute use, averaged, with the slice on it."""
    request, device = cycle.request, info.device
    memory = (info.memory_used + request.memory) / max(1, device.memory_total)
    compute = info.share_used + request.compute_share
    return min(1.0, (memory + min(1.0, compute)) / 2)


class BinPack:
    name = "BinPack"

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = weight

    def score(self, cycle: Cycle, info: DeviceInfo, snapshot: Snapshot) -> float:
        if cycle.pool.strategy != "binpack":
            return 0.0
        return 100.0 * fullness_after(cycle, info)
