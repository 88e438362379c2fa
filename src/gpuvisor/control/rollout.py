"""The pace of a rolling update: which replicas of a deployment are being replaced now, and
how far the deployment's update has come.

A replica is replaced by loading an instance with the new spec beside the old one (or, when
no device has room for both, in its place). ``rollout.maxSurge`` bounds how many replicas
of one deployment are replaced at the same time; the others keep serving their old
instance until their turn. A replacement that fails (or cannot be placed) holds its turn,
so a broken version stops at the first replica instead of reaching them all.

A move off a cordoned device works the same way: the instance there serves until its
replacement, loaded elsewhere, is Ready. This module also says which instances to stop
(``outdated``) and what the status of one that serves until its replacement reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from gpuvisor.control.desired import DesiredSlice
from gpuvisor.control.slices import SliceState

__all__ = [
    "SERVING",
    "Progress",
    "ahead_of",
    "by_replica",
    "fits",
    "handed_over",
    "outdated",
    "progress",
    "replacing",
    "serving_note",
    "tells_of_replacement",
    "waiting_note",
]

#: The states of an instance that serves, or will again once its worker is back: during a
#: rolling update, such an instance with the old spec stays until its replacement is Ready.
SERVING = ("Ready", "Restarting")

Fits = Callable[[SliceState], bool]
#: Why an instance must leave its device while it still works, or None (``moves.leaving``).
Leaving = Callable[[SliceState], str | None]

_OLD_SPEC = "serving the previous spec"
_REPLACING = "its replacement "  # in the reason of an instance that serves until then
_IN_LINE = "waiting for its turn"  # in the reason of one whose replacement has not started


def by_replica(instances: Iterable[SliceState]) -> dict[str, list[SliceState]]:
    """Group instances by the replica they belong to, in replica order."""
    out: dict[str, list[SliceState]] = {}
    for s in sorted(instances, key=lambda s: s.id):
        out.setdefault(s.replica_id, []).append(s)
    return out


def _being_replaced(instances: Sequence[SliceState], fits: Fits) -> bool:
    new = [s for s in instances if fits(s)]
    if not new or any(s.state == "Ready" for s in new):
        return False
    if any(s.state in SERVING for s in instances if not fits(s)):
        return True  # its old instance serves beside the new one
    return any(s.state != "Pending" or s.took_over for s in new)


def replacing(replicas: dict[str, list[SliceState]], fits: Fits) -> list[str]:
    """The replicas whose instance with the current spec is not Ready (yet): loading, beside
    the old instance or in its place; Failed or Restarting; or Pending in the place of an old
    instance that served. One that failed (or cannot be placed) holds its turn until it is
    fixed or the spec changes again, so the replicas still on the old spec keep serving it. A
    replica that is Pending and took no one's place (there was never room for it) holds
    nothing: the update goes on without it."""
    return [rid for rid, instances in replicas.items() if _being_replaced(instances, fits)]


@dataclass(frozen=True)
class Progress:
    """How far a deployment's rolling update has come."""

    replicas: int  # replicas asked for
    ready: int  # replicas with an instance that serves requests now
    updated: int  # replicas served by an instance with the current spec
    replacing: list[str] = field(default_factory=list)  # replicas being replaced now
    waiting: list[str] = field(default_factory=list)  # replicas serving the old spec, in line
    stalled: dict[str, str] = field(default_factory=dict)  # replica -> its new instance's state
    first_start: bool = False  # no replica has served another spec: nothing to update

    @property
    def done(self) -> bool:
        return self.updated == self.replicas and not self.replacing and not self.waiting

    def describe(self) -> str:
        """One line for the dashboard and ``get deployments``: '' when nothing is under way."""
        if self.done or self.first_start:
            return ""
        parts = [f"{self.updated} of {self.replicas} replica(s) updated"]
        loading = [rid for rid in self.replacing if rid not in self.stalled]
        if loading:
            parts.append(f"replacing {', '.join(loading)}")
        if self.stalled:
            what = ", ".join(f"{rid} (its new instance is {s})" for rid, s in self.stalled.items())
            parts.append(f"stalled on {what}")
        if self.waiting:
            parts.append(f"{len(self.waiting)} waiting for their turn")
        return "; ".join(parts)


def progress(
    replica_ids: Sequence[str], replicas: dict[str, list[SliceState]], fits: Fits
) -> Progress:
    """The progress of a deployment whose current replicas are ``replica_ids``, from all of its
    instances (``replicas``, grouped by replica; those of replicas being scaled away count
    nowhere)."""
    ready = updated = 0
    waiting: list[str] = []
    for rid in replica_ids:
        instances = replicas.get(rid, [])
        if any(s.state == "Ready" for s in instances):
            ready += 1
        if any(s.state == "Ready" and fits(s) for s in instances):
            updated += 1
        elif not any(fits(s) for s in instances) and any(s.state in SERVING for s in instances):
            waiting.append(rid)
    current = {rid: replicas.get(rid, []) for rid in replica_ids}
    if all(fits(s) and not s.took_over for group in current.values() for s in group):
        # nothing of another spec, and nothing took the place of one: the deployment's first
        # start (a new instance that fails is a failed slice, not a stalled update)
        return Progress(len(replica_ids), ready, updated, first_start=True)
    busy = replacing(current, fits)
    stalled = {
        rid: s.state
        for rid in busy
        for s in current[rid]
        if fits(s) and s.state in ("Failed", "Pending")
    }
    return Progress(len(replica_ids), ready, updated, busy, waiting, stalled)


def fits(state: SliceState, want: DesiredSlice, leaving: Leaving) -> bool:
    """Whether an instance is what its replica asks for: the current spec, on a device it
    may stay on."""
    return state.spec_hash == want.spec_hash and leaving(state) is None


def handed_over(old: SliceState, new: SliceState) -> str:
    """Why ``old`` stops now that ``new``, which replaces it, is Ready."""
    if old.spec_hash == new.spec_hash:
        return f"stopping: moved to {new.device_id} as {new.id}"
    return f"stopping: replaced by {new.id}"


def outdated(
    instances: Iterable[SliceState], desired: Mapping[str, DesiredSlice], leaving: Leaving
) -> list[tuple[str, str]]:
    """Return the instances to stop now, with why: those of replicas no longer asked for;
    and of the others, all but what the replica needs: an instance that fits (the current
    spec, on a device it may stay on) and, until that one is Ready, one that serves the
    old spec or from a cordoned device (a rolling update, or a move without a gap). A
    spec that cannot be served (a missing profile, model or tenant) stops the old
    instances at once."""
    out: list[tuple[str, str]] = []
    replicas: dict[str, list[SliceState]] = {}
    for s in instances:
        replicas.setdefault(s.replica_id, []).append(s)
    for rid, group in replicas.items():
        want = desired.get(rid)
        if want is None:
            out += [(s.id, "stopping: deleted, scaled down or unloaded") for s in group]
            continue
        fitting = [s for s in group if fits(s, want, leaving)]
        fitting.sort(key=lambda s: s.state != "Ready")  # a Ready one first, else the oldest
        keep = fitting[0] if fitting else None
        if keep is not None:  # two that fit (a move undone by an uncordon): one stays
            out += [(s.id, f"stopping: {keep.id} serves this replica") for s in fitting[1:]]
        servable = not want.problem and want.model is not None and want.profile is not None
        serving = False
        for s in group:
            if s in fitting:
                continue
            why = leaving(s) if s.spec_hash == want.spec_hash else None
            if keep is not None and keep.state == "Ready":
                out.append((s.id, handed_over(s, keep)))
            elif not serving and servable and (s.state in SERVING or _restoring(s)):
                serving = True
            else:
                out.append((s.id, f"moving: {why}" if why else "stopping: spec changed"))
    return out


def _restoring(s: SliceState) -> bool:
    """Whether ``s`` loads the spec its replica served before the node restarted."""
    return s.restored and s.state == "Loading"


def ahead_of(
    want: DesiredSlice, deployment_instances: Iterable[SliceState], leaving: Leaving
) -> list[str]:
    """The other replicas of ``want``'s deployment (of whose ``deployment_instances``) whose
    replacement is under way, when they are as many as its ``rollout.maxSurge`` (``want``
    waits for its turn); else []."""
    siblings = by_replica(s for s in deployment_instances if s.replica_id != want.slice_id)
    busy = replacing(siblings, lambda s: fits(s, want, leaving))
    return busy if len(busy) >= want.deployment.spec.rollout.max_surge else []


def _serving(leaving: str | None) -> str:
    return f"{leaving}: serving" if leaving else _OLD_SPEC


def waiting_note(leaving: str | None, ahead: Sequence[str], max_surge: int) -> str:
    """The reason of an instance that serves (the old spec, or from a cordoned device:
    ``leaving``) while its replica waits for its turn behind the replicas ``ahead``."""
    return (
        f"{_serving(leaving)}: {_IN_LINE} ({', '.join(ahead)} first; rollout.maxSurge: {max_surge})"
    )


def serving_note(leaving: str | None, replacement: SliceState) -> str:
    """The reason of an instance that serves (the old spec, or from a cordoned device:
    ``leaving``) until ``replacement`` is Ready, or after it failed."""
    if replacement.state == "Failed":
        return f"{_serving(leaving)}: its replacement {replacement.id} failed"
    if replacement.state == "Pending":
        return f"{_serving(leaving)}: its replacement {replacement.id} fits on no device"
    return f"{_serving(leaving)} until its replacement {replacement.id} is Ready"


def tells_of_replacement(reason: str) -> bool:
    """Whether a reason is one of ``waiting_note`` or ``serving_note``: it tells of a
    replacement, which is stale once nothing replaces the instance any more."""
    return _REPLACING in reason or _IN_LINE in reason
