"""Moves off devices: which instances must leave the device they are on (cordoned, unhealthy
or gone), and why.

An instance on a cordoned device that still works moves without a gap (its replacement
loads elsewhere while it serves); one on a failed or vanished device is stopped at once and
placed again. A ``disallowMigration`` instance stays where it is, with the reason in its
status."""

from __future__ import annotations

from collections.abc import Iterable

from gpuvisor.control.slices import SliceState
from gpuvisor.inventory.device import Topology

__all__ = ["leaving", "must_leave_now", "unusable"]


def leaving(state: SliceState, topology: Topology) -> str | None:
    """Why an instance must leave its device while it still works (it is cordoned), or
    None. It moves without a gap: its replacement loads elsewhere while it serves. One on
    a failed device is stopped at once instead (``must_leave_now``)."""
    if state.device_id is None or state.disallow_migration:
        return None
    device = topology.get(state.device_id)
    if device is None or not device.healthy or not device.cordoned:
        return None
    return f"{device.id} is cordoned"


def unusable(topology: Topology, device_id: str) -> str | None:
    """Return why slices must leave this device (cordoned, unhealthy), or None."""
    device = topology.get(device_id)
    if device is None:
        return "its device is gone"
    if device.cordoned:
        return f"{device_id} is cordoned"
    if not device.healthy:
        return f"{device_id} is unhealthy" + (
            f" ({device.health_reason})" if device.health_reason else ""
        )
    return None


def must_leave_now(
    slices: Iterable[SliceState], topology: Topology
) -> list[tuple[SliceState, str]]:
    """Return the instances to stop at once, with why: those on failed devices, so that
    they are placed elsewhere (or left Pending with reasons). Those on cordoned devices
    move without a gap instead (see ``leaving``). A ``disallowMigration`` instance stays
    where it is: the reason goes into its status here, and comes out once its device is
    back."""
    out: list[tuple[SliceState, str]] = []
    for state in slices:
        if state.device_id is None:
            continue
        why = unusable(topology, state.device_id)
        if why is None:
            if state.reason.startswith("disallowMigration:"):
                state.set_state(state.state)  # the device is back: drop the note
            continue
        if state.disallow_migration:
            note = f"disallowMigration: stays on {why}"
            if state.reason != note:
                state.set_state(state.state, note)
            continue
        if leaving(state, topology):
            continue  # a cordoned device still works: its replacement loads first
        out.append((state, why))
    return out
