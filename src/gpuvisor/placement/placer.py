"""Where a slice goes: the devices of its pool that can hold it, and why the others cannot.

This is the first-fit core the placement framework grows from: filters that say why a
device is refused, then a bin-packing choice among the devices that remain.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from gpuvisor.inventory.device import Device
from gpuvisor.partition.placement import partition_refusal
from gpuvisor.units import format_size

__all__ = ["PlacedSlice", "PlacementResult", "SliceRequest", "place_slice"]


@dataclass(frozen=True)
class SliceRequest:
    """What one replica asks of a device."""

    slice_id: str
    tenant: str
    pool: str
    memory: int
    compute_share: float
    isolation: str
    mig_profile: str | None = None
    """The MIG profile of a partition-tier slice."""


@dataclass(frozen=True)
class PlacedSlice:
    slice_id: str
    tenant: str
    device_id: str
    memory: int
    compute_share: float
    isolation: str
    mig_start: int | None = None
    """The start (memory slice) of the MIG instance a partition-tier slice holds."""


@dataclass
class PlacementResult:
    """The chosen device, or None with one reason per device explaining the refusal."""

    device_id: str | None
    reasons: dict[str, str] = field(default_factory=dict)
    mig_start: int | None = None
    """For a partition-tier slice: the start of the free MIG instance chosen for it."""

    def explain(self) -> str:
        if not self.reasons:
            return "no device is known to this node"
        return "; ".join(f"{device}: {reason}" for device, reason in sorted(self.reasons.items()))


def selector_matches(selector: Mapping[str, str], device: Device) -> bool:
    """Return True when every selector label matches the device's label (glob patterns)."""
    labels = device.labels
    return all(
        fnmatch.fnmatchcase(labels.get(key, ""), pattern) for key, pattern in selector.items()
    )


def _refusal(
    request: SliceRequest, device: Device, on_device: list[PlacedSlice], tenancy: str
) -> str | None:
    if not device.healthy:
        return "device is unhealthy or cordoned"
    if request.isolation == "partition":
        if tenancy == "dedicated" and any(s.tenant != request.tenant for s in on_device):
            return "pool is dedicated and another tenant's slices are on this device"
        return partition_refusal(request.mig_profile or "", device, _held(on_device))[0]
    if device.mig_mode:
        return "MIG is enabled on this GPU: only slices with isolation 'partition' run on it"
    if any(s.isolation == "exclusive" for s in on_device):
        return "held exclusively by another slice"
    if request.isolation == "exclusive" and on_device:
        return f"isolation 'exclusive' needs an empty device; {len(on_device)} slice(s) are on it"
    if tenancy == "dedicated" and any(s.tenant != request.tenant for s in on_device):
        return "pool is dedicated and another tenant's slices are on this device"
    used = sum(s.memory for s in on_device)
    free = device.memory_total - used
    if request.memory > free:
        return f"{format_size(free)} free < {format_size(request.memory)} requested"
    share = sum(s.compute_share for s in on_device)
    if share + request.compute_share > 1.0 + 1e-9:
        return (
            f"compute shares would sum to {share + request.compute_share:.2f} > 1 "
            f"({share:.2f} already guaranteed)"
        )
    return None


def _held(on_device: list[PlacedSlice]) -> set[int]:
    return {s.mig_start for s in on_device if s.mig_start is not None}


def place_slice(
    request: SliceRequest,
    devices: Iterable[Device],
    placed: Iterable[PlacedSlice],
    selector: Mapping[str, str],
    tenancy: str = "shared",
) -> PlacementResult:
    """Return the device for ``request`` (the fullest that fits: bin-packing), or the reasons none fits."""
    by_device: dict[str, list[PlacedSlice]] = {}
    for s in placed:
        by_device.setdefault(s.device_id, []).append(s)
    result = PlacementResult(device_id=None)
    best: tuple[float, str] | None = None
    chosen: Device | None = None
    for device in devices:
        if not selector_matches(selector, device):
            result.reasons[device.id] = f"not in pool '{request.pool}'"
            continue
        on_device = by_device.get(device.id, [])
        refusal = _refusal(request, device, on_device, tenancy)
        if refusal is not None:
            result.reasons[device.id] = refusal
            continue
        fullness = sum(s.memory for s in on_device) / max(1, device.memory_total)
        if best is None or fullness > best[0]:
            best, chosen = (fullness, device.id), device
    if best is not None:
        result.device_id = best[1]
        result.reasons.clear()
        if request.isolation == "partition" and chosen is not None:
            held = _held(by_device.get(chosen.id, []))
            result.mig_start = partition_refusal(request.mig_profile or "", chosen, held)[1]
    return result
