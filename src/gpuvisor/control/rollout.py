"""The pace of a rolling update: which replicas of a deployment are being replaced now, and
how far the deployment's update has come.

A replica is replaced by loading an instance with the new spec beside the old one (or, when
no device has room for both, in its place). ``rollout.maxSurge`` bounds how many replicas
of one deployment are replaced at the same time; the others keep serving their old
instance until their turn. A replacement that fails (or cannot be placed) holds its turn,
so a broken version stops at the first replica instead of reaching them all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from gpuvisor.control.slices import SliceState

__all__ = ["SERVING", "Progress", "progress", "replacing"]

#: The states of an instance that serves, or will again once its worker is back: during a
#: rolling update, such an instance with the old spec stays until its replacement is Ready.
SERVING = ("Ready", "Restarting")

Fits = Callable[[SliceState], bool]


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

    @property
    def done(self) -> bool:
        return self.updated == self.replicas and not self.replacing and not self.waiting

    def describe(self) -> str:
        """One line for the dashboard and ``get deployments``: '' when nothing is under way."""
        if self.done:
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
    busy = replacing(current, fits)
    stalled = {
        rid: s.state
        for rid in busy
        for s in current[rid]
        if fits(s) and s.state in ("Failed", "Pending")
    }
    return Progress(len(replica_ids), ready, updated, busy, waiting, stalled)
