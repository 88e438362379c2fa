"""The plugins a node places with, in the order they run."""

from __future__ import annotations

from gpuvisor.placement.framework import Framework
from gpuvisor.placement.plugins.anti_affinity import AntiAffinity
from gpuvisor.placement.plugins.binpack import BinPack
from gpuvisor.placement.plugins.compute_fit import ComputeFit
from gpuvisor.placement.plugins.health import DeviceHealth
from gpuvisor.placement.plugins.isolation import IsolationTier
from gpuvisor.placement.plugins.memory_fit import MemoryFit
from gpuvisor.placement.plugins.numa import NumaPlacement
from gpuvisor.placement.plugins.pool_selector import PoolSelector
from gpuvisor.placement.plugins.quota import TenantQuotaFit
from gpuvisor.placement.plugins.reserve import SnapshotReserve
from gpuvisor.placement.plugins.spread import Spread
from gpuvisor.placement.plugins.tenancy import Tenancy

__all__ = ["default_framework"]


def default_framework() -> Framework:
    """Return the framework with every built-in plugin.

    Filters run cheapest and most decisive first, so a device's reason is the most telling
    one: cordoned or unhealthy, outside the pool, the wrong isolation tier, another
    tenant's, NUMA, anti-affinity, then memory and compute. Anti-affinity weighs more than
    the pool's strategy (replicas on different nodes before a fuller device); NUMA locality
    breaks ties between otherwise equal devices.
    """
    numa, anti = NumaPlacement(weight=0.5), AntiAffinity(weight=2.0)
    return Framework(
        pre_filters=[TenantQuotaFit()],
        filters=[
            DeviceHealth(),
            PoolSelector(),
            IsolationTier(),
            Tenancy(),
            numa,
            anti,
            MemoryFit(),
            ComputeFit(),
        ],
        scores=[BinPack(), Spread(), numa, anti],
        reserves=[SnapshotReserve()],
    )
