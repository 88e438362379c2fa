"""Fragmentation of MIG layouts, and the fewest instance moves that make a profile placeable."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from gpuvisor.partition.mig import MigGeometry, MigInstance, free_starts, occupied_slices

__all__ = ["DefragPlan", "GpuLayout", "Move", "plan_defrag", "unusable_slices"]

MAX_CANDIDATES = 64
"""Target windows tried (fewest blockers first) before the search gives up."""
RELOCATION_BUDGET = 64
"""Backtracking steps spent finding destinations for one window's blockers."""


def unusable_slices(
    geometry: MigGeometry, instances: Sequence[MigInstance], profiles: Iterable[str]
) -> list[int]:
    """Return the free memory slices that no instance of ``profiles`` could be added on.

    A slice counts as usable when some profile in ``profiles`` has a free valid offset
    covering it (respecting the profile's count limit and the compute slices left).
    """
    taken = occupied_slices(geometry, instances)
    usable = 0
    for name in profiles:
        profile = geometry.profile(name)
        if profile is None:
            continue
        for start in free_starts(geometry, instances, profile.name):
            usable |= profile.mask(start)
    return [s for s in range(geometry.memory_slices) if not (taken | usable) >> s & 1]


@dataclass(frozen=True)
class GpuLayout:
    """A MIG GPU as the defragmenter sees it: its layout and which instances may not move."""

    id: str
    geometry: MigGeometry
    instances: tuple[MigInstance, ...]
    pinned: frozenset[int] = field(default_factory=frozenset)
    """Starts of instances holding a slice with ``disallowMigration``: never moved."""
    busy: frozenset[int] = field(default_factory=frozenset)
    """Starts of instances holding a slice (moving them moves the slice)."""


@dataclass(frozen=True)
class Move:
    """Move one instance (and the slice on it, if any) to another offset or GPU."""

    gpu: str
    instance: MigInstance
    to_gpu: str
    to_start: int
    carries_slice: bool


@dataclass(frozen=True)
class DefragPlan:
    """The moves after which ``profile`` fits ``gpu`` at ``start``."""

    profile: str
    gpu: str
    start: int
    moves: tuple[Move, ...]

    def describe(self) -> str:
        """Return the plan in one line, e.g. ``move gpu-2 1g.10gb@3 → gpu-5@1; then ...``."""
        if not self.moves:
            return f"{self.profile} already fits {self.gpu} at offset {self.start}"
        steps = "; ".join(
            f"move {m.gpu} {m.instance.profile}@{m.instance.start} → {m.to_gpu}@{m.to_start}"
            for m in self.moves
        )
        return f"{steps}; then {self.profile} fits {self.gpu} at offset {self.start}"


def _without(instances: Sequence[MigInstance], gone: Iterable[MigInstance]) -> list[MigInstance]:
    removed = set(gone)
    return [i for i in instances if i not in removed]


def _candidates(
    gpus: Sequence[GpuLayout], profile_name: str
) -> list[tuple[int, int, int, int, list[MigInstance]]]:
    """Return (blockers, busy blockers, gpu index, start, blockers) for every target window."""
    found = []
    for g, gpu in enumerate(gpus):
        profile = gpu.geometry.profile(profile_name)
        if profile is None:
            continue
        for start in profile.starts:
            window = profile.mask(start)
            blockers = [
                i
                for i in gpu.instances
                if (p := gpu.geometry.profile(i.profile)) is not None and p.mask(i.start) & window
            ]
            if any(b.start in gpu.pinned for b in blockers):
                continue
            rest = _without(gpu.instances, blockers)
            if start not in free_starts(gpu.geometry, rest, profile.name):
                continue  # count or compute limits forbid it even with the window cleared
            busy = sum(1 for b in blockers if b.start in gpu.busy)
            found.append((len(blockers), busy, g, start, blockers))
    found.sort(key=lambda c: (c[0], c[1], c[2], c[3]))
    return found


def _relocate(
    gpus: Sequence[GpuLayout],
    layouts: list[list[MigInstance]],
    pending: list[MigInstance],
    budget: list[int],
) -> list[tuple[int, int]] | None:
    """Find a free valid offset for each pending instance (bounded backtracking), or None."""
    if not pending:
        return []
    budget[0] -= 1
    if budget[0] < 0:
        return None
    instance, rest = pending[0], pending[1:]
    tried: set[tuple[int, int]] = set()
    for h, gpu in enumerate(gpus):
        if gpu.geometry.profile(instance.profile) is None:
            continue
        for start in free_starts(gpu.geometry, layouts[h], instance.profile)[:2]:
            if (h, start) in tried:
                continue
            tried.add((h, start))
            layouts[h].append(MigInstance(start, instance.profile))
            found = _relocate(gpus, layouts, rest, budget)
            layouts[h].pop()
            if found is not None:
                return [(h, start), *found]
    return None


def plan_defrag(gpus: Sequence[GpuLayout], profile_name: str) -> DefragPlan | None:
    """Return the fewest moves after which one ``profile_name`` instance fits some GPU.

    Each blocking instance moves once, straight to a free valid offset (on another GPU, or on
    the same GPU outside the target window); instances holding a ``disallowMigration`` slice
    never move. Returns None when no such plan exists.
    """
    for gpu in gpus:
        starts = free_starts(gpu.geometry, gpu.instances, profile_name)
        if starts:
            name = gpu.geometry.profile(profile_name)
            return DefragPlan(name.name if name else profile_name, gpu.id, starts[0], ())
    for _, _, g, start, blockers in _candidates(gpus, profile_name)[:MAX_CANDIDATES]:
        target = gpus[g]
        profile = target.geometry.profile(profile_name)
        assert profile is not None
        layouts = [list(gpu.instances) for gpu in gpus]
        layouts[g] = [*_without(target.instances, blockers), MigInstance(start, profile.name)]
        ordered = sorted(
            blockers,
            key=lambda i: -(p.memory_slices if (p := target.geometry.profile(i.profile)) else 0),
        )
        destinations = _relocate(gpus, layouts, ordered, [RELOCATION_BUDGET])
        if destinations is None:
            continue
        moves = tuple(
            Move(target.id, b, gpus[h].id, s, b.start in target.busy)
            for b, (h, s) in zip(ordered, destinations)
        )
        return DefragPlan(profile.name, target.id, start, moves)
    return None
