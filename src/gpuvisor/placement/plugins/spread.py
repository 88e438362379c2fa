"""Score (pools with ``placement: spread``): the device left emptiest wins, which spreads
a pool's slices so that each gets more of the device's unguaranteed time."""

from __future__ import annotations

from gpuvisor.placement.framework import Cycle, DeviceInfo, Snapshot
from gpuvisor.placement.plugins.binpack import fullness_after


class Spread:
    name = "Spread"

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = weight

    def score(self, cycle: Cycle, info: DeviceInfo, snapshot: Snapshot) -> float:
        if cycle.pool.strategy != "spread":
            return 0.0
        return 100.0 * (1.0 - fullness_after(cycle, info))
