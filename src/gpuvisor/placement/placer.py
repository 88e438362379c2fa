"""Place one slice with the default plugins: the entry point for callers that hold plain
lists of devices and placed slices (the fleet planner, ``gpuvisor plan``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from gpuvisor.inventory.device import Device
from gpuvisor.placement.defaults import default_framework
from gpuvisor.placement.framework import (
    Cycle,
    PlacedSlice,
    PlacementResult,
    PoolPolicy,
    SliceRequest,
    Snapshot,
)
from gpuvisor.placement.plugins.pool_selector import selector_matches

__all__ = ["PlacedSlice", "PlacementResult", "SliceRequest", "place_slice", "selector_matches"]

_FRAMEWORK = default_framework()


def place_slice(
    request: SliceRequest,
    devices: Iterable[Device],
    placed: Iterable[PlacedSlice],
    selector: Mapping[str, str],
    tenancy: str = "shared",
    memory_headroom: int = 0,
) -> PlacementResult:
    """Return the device for ``request`` (bin-packing), or the reasons none fits.

    Nothing is kept: the snapshot the cycle reserves in is built for this call.
    """
    pool = PoolPolicy(
        request.pool,
        dict(selector),
        "dedicated" if tenancy == "dedicated" else "shared",
        memory_headroom=memory_headroom,
    )
    return _FRAMEWORK.place(Cycle(request, pool), Snapshot(devices, placed))
