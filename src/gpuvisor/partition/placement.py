"""Partition-tier placement: a slice on a free MIG instance of its profile, or why not."""

from __future__ import annotations

from collections.abc import Collection

from gpuvisor.inventory.device import Device
from gpuvisor.partition.mig import describe_no_room, free_starts, geometry_for

__all__ = ["free_instances", "partition_refusal"]


def free_instances(mig_profile: str, device: Device, held: Collection[int]) -> list[int]:
    """Return the starts of ``device``'s instances of ``mig_profile`` that hold no slice."""
    geometry = geometry_for(device.model)
    profile = geometry.profile(mig_profile) if geometry else None
    if profile is None:
        return []
    return [
        i.start
        for i in device.mig_instances
        if i.profile.lower() == profile.name.lower() and i.start not in held
    ]


def partition_refusal(
    mig_profile: str, device: Device, held: Collection[int]
) -> tuple[str | None, int | None]:
    """Return (None, start of a free instance) when a ``mig_profile`` slice can go on
    ``device``, else (why not, None).

    ``held`` are the starts of the device's instances already holding a slice. gpuvisor never
    changes a MIG layout: a slice only goes on an instance that exists. The reason says what
    would have to change, e.g. ``"1g.10gb needs offset 0–6 free; slices 0–6 are taken"``.
    """
    if device.kind != "gpu":
        return "not a GPU: isolation 'partition' needs a MIG instance", None
    if not device.mig_mode:
        return "MIG is not enabled on this GPU: isolation 'partition' needs a MIG instance", None
    geometry = geometry_for(device.model)
    if geometry is None:
        return f"no MIG geometry is known for {device.model}", None
    profile = geometry.profile(mig_profile)
    if profile is None:
        return geometry.unknown_profile_message(mig_profile), None
    free = free_instances(profile.name, device, held)
    if free:
        return None, min(free)
    layout = device.mig_instances
    room = free_starts(geometry, layout, profile.name)
    if room:
        have = sum(1 for i in layout if i.profile.lower() == profile.name.lower())
        what = (
            f"all {have} {profile.name} instances hold slices"
            if have
            else (f"the MIG layout has no {profile.name} instance")
        )
        return (
            f"{what}; one more fits at offset {room[0]}: create it (gpuvisor plan exports the "
            "layout for nvidia-mig-parted)",
            None,
        )
    return describe_no_room(geometry, layout, profile.name), None
