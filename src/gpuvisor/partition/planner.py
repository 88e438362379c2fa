"""MIG layout planning: the requested instances on the fewest GPUs of one model.

The problem is a cutting-stock problem with few item types (a model has at most seven
profiles) and few bin patterns (the distinct profile counts a valid layout can hold: at most a
few hundred, enumerated exactly by ``mig.enumerate_layouts``). The planner solves its linear
relaxation over those patterns (a small revised simplex, at most seven rows), keeps the whole
part of the solution, and covers what remains by an exact iterative-deepening search (bounded;
a price-weighted greedy takes over if the bound is hit). First-fit decreasing is computed too
and the better of the two is returned, so a plan never uses more GPUs than first-fit
decreasing. ``lower_bound`` is the relaxation's optimum, rounded up: no plan can do better.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from gpuvisor.partition.mig import (
    MigGeometry,
    MigInstance,
    MigProfile,
    enumerate_layouts,
    free_starts,
    occupied_slices,
)

__all__ = [
    "InstanceRequest",
    "PlannedGpu",
    "add_instance",
    "first_fit_decreasing",
    "lower_bound",
    "plan_layouts",
    "plan_requests",
    "used_slices",
]

Layout = tuple[MigInstance, ...]
_EPS = 1e-9
SEARCH_BUDGET = 20_000
"""Nodes the exact search may visit before the greedy covers the remainder instead."""


@dataclass(frozen=True)
class InstanceRequest:
    """``count`` instances of a profile, optionally for one tenant's deployment."""

    profile: str
    count: int
    tenant: str | None = None
    deployment: str | None = None


@dataclass(frozen=True)
class PlannedGpu:
    """One GPU of a plan: its layout and, for each instance, the request it serves."""

    instances: tuple[tuple[MigInstance, InstanceRequest], ...]

    @property
    def layout(self) -> Layout:
        return tuple(instance for instance, _ in self.instances)


def _profiles(geometry: MigGeometry, demand: Mapping[str, int]) -> list[MigProfile]:
    """Return the demanded profiles (count > 0) in the geometry's order; ValueError if unknown."""
    wanted = {name.lower(): count for name, count in demand.items() if count > 0}
    for name in wanted:
        if geometry.profile(name) is None:
            raise ValueError(geometry.unknown_profile_message(name))
    return [p for p in geometry.profiles if p.name.lower() in wanted]


def _flexibility(geometry: MigGeometry, layout: Layout) -> int:
    """How many single instances could still be added: layouts that keep room score higher."""
    return sum(len(free_starts(geometry, layout, p.name)) for p in geometry.profiles)


@lru_cache(maxsize=64)
def _patterns(
    geometry: MigGeometry, names: tuple[str, ...]
) -> tuple[tuple[tuple[int, ...], Layout], ...]:
    """Return the maximal count vectors (over ``names``) a valid layout holds, each with the
    layout that realises it keeping the most room for later additions."""
    best: dict[tuple[int, ...], tuple[int, Layout]] = {}
    index = {name: i for i, name in enumerate(names)}
    for layout in enumerate_layouts(geometry, names):
        counts = [0] * len(names)
        for instance in layout:
            counts[index[instance.profile]] += 1
        key = tuple(counts)
        score = _flexibility(geometry, layout)
        if key not in best or score > best[key][0]:
            best[key] = (score, layout)
    vectors = list(best)
    maximal = [
        v
        for v in vectors
        if any(v) and not any(w != v and all(a >= b for a, b in zip(w, v)) for w in vectors)
    ]
    maximal.sort(key=lambda v: tuple(-x for x in v))
    return tuple((v, best[v][1]) for v in maximal)


def _lp(
    columns: Sequence[tuple[int, ...]], demand: tuple[int, ...]
) -> tuple[list[float], list[float]]:
    """Solve min Σz s.t. Σ z_c·column_c ≥ demand, z ≥ 0 (revised simplex, big-M artificials).

    Returns (z per column, dual price per row). Every row must be covered by some column.
    """
    m = len(demand)
    big = float(sum(demand) + 1)
    # Columns: patterns (cost 1), surplus -e_i (cost 0), artificial e_i (cost big).
    cols: list[tuple[float, list[float]]] = [(1.0, [float(x) for x in c]) for c in columns]
    cols += [(0.0, [-1.0 if r == i else 0.0 for r in range(m)]) for i in range(m)]
    first_artificial = len(cols)
    cols += [(big, [1.0 if r == i else 0.0 for r in range(m)]) for i in range(m)]
    basis = [first_artificial + i for i in range(m)]
    inverse = [[1.0 if r == c else 0.0 for c in range(m)] for r in range(m)]
    values = [float(d) for d in demand]
    prices = [big] * m
    for _ in range(50 * (len(cols) + m)):
        costs = [cols[j][0] for j in basis]
        prices = [sum(costs[r] * inverse[r][i] for r in range(m)) for i in range(m)]
        entering = -1
        for j, (cost, column) in enumerate(cols):  # Bland's rule: no cycling
            if j not in basis and cost - sum(p * a for p, a in zip(prices, column)) < -_EPS:
                entering = j
                break
        if entering < 0:
            break
        column = cols[entering][1]
        direction = [sum(inverse[r][i] * column[i] for i in range(m)) for r in range(m)]
        leave, ratio = -1, math.inf
        for r in range(m):
            if direction[r] > _EPS:
                step = values[r] / direction[r]
                if step < ratio - _EPS or (abs(step - ratio) <= _EPS and basis[r] < basis[leave]):
                    leave, ratio = r, step
        if leave < 0:  # unbounded: impossible for a covering problem with costs ≥ 0
            break
        pivot = direction[leave]
        inverse[leave] = [x / pivot for x in inverse[leave]]
        values[leave] /= pivot
        for r in range(m):
            if r != leave and abs(direction[r]) > _EPS:
                factor = direction[r]
                inverse[r] = [a - factor * b for a, b in zip(inverse[r], inverse[leave])]
                values[r] -= factor * values[leave]
        basis[leave] = entering
    z = [0.0] * len(columns)
    for r, j in enumerate(basis):
        if j < len(columns):
            z[j] = max(0.0, values[r])
    return z, prices


def _cover_bound(profiles: Sequence[MigProfile], geometry: MigGeometry, rest: Sequence[int]) -> int:
    memory = sum(p.memory_slices * n for p, n in zip(profiles, rest))
    compute = sum(p.compute_slices * n for p, n in zip(profiles, rest))
    bound = max(
        math.ceil(memory / geometry.memory_slices), math.ceil(compute / geometry.compute_slices)
    )
    for p, n in zip(profiles, rest):
        bound = max(bound, math.ceil(n / p.max_count))
    return bound


def _greedy(
    patterns: Sequence[tuple[int, ...]], rest: tuple[int, ...], prices: Sequence[float]
) -> list[int]:
    """Cover ``rest`` pattern by pattern, each time the one covering the most priced demand."""
    chosen: list[int] = []
    rest_list = list(rest)
    while any(rest_list):
        best, best_value = -1, (0.0, 0)
        for k, pattern in enumerate(patterns):
            covered = [min(a, r) for a, r in zip(pattern, rest_list)]
            value = (round(sum(c * w for c, w in zip(covered, prices)), 9), sum(covered))
            if value[1] > 0 and (best < 0 or value > best_value):
                best, best_value = k, value
        chosen.append(best)
        rest_list = [max(0, r - a) for r, a in zip(rest_list, patterns[best])]
    return chosen


def _exact(
    geometry: MigGeometry,
    profiles: Sequence[MigProfile],
    patterns: Sequence[tuple[int, ...]],
    rest: tuple[int, ...],
    below: int,
) -> list[int] | None:
    """Return fewer than ``below`` patterns covering ``rest``, or None (none exist or budget)."""
    order = sorted(
        range(len(profiles)),
        key=lambda i: (-profiles[i].memory_slices, -profiles[i].compute_slices, i),
    )
    failed: set[tuple[tuple[int, ...], int]] = set()
    visited = 0

    def cover(rest: tuple[int, ...], k: int) -> list[int] | None:
        nonlocal visited
        if not any(rest):
            return []
        if k == 0 or _cover_bound(profiles, geometry, rest) > k or (rest, k) in failed:
            return None
        visited += 1
        if visited > SEARCH_BUDGET:
            raise TimeoutError
        hardest = next(i for i in order if rest[i] > 0)
        seen: set[tuple[int, ...]] = set()
        for index, pattern in enumerate(patterns):
            if pattern[hardest] == 0:
                continue
            after = tuple(max(0, r - a) for r, a in zip(rest, pattern))
            if after in seen:
                continue
            seen.add(after)
            found = cover(after, k - 1)
            if found is not None:
                return [index, *found]
        failed.add((rest, k))
        return None

    try:
        for k in range(_cover_bound(profiles, geometry, rest), below):
            found = cover(rest, k)
            if found is not None:
                return found
    except TimeoutError:
        return None
    return None


def _realise(
    geometry: MigGeometry,
    profiles: Sequence[MigProfile],
    chosen: Iterable[int],
    layouts: Sequence[Layout],
    demand: Sequence[int],
) -> list[Layout]:
    """Turn chosen patterns into layouts, leaving out instances beyond the demand."""
    rest = {p.name: n for p, n in zip(profiles, demand)}
    out: list[Layout] = []
    for k in chosen:
        keep: list[MigInstance] = []
        for instance in layouts[k]:  # in start order: the lowest offsets are kept
            if rest[instance.profile] > 0:
                rest[instance.profile] -= 1
                keep.append(instance)
        if keep:
            out.append(tuple(keep))
    return out


def plan_layouts(geometry: MigGeometry, demand: Mapping[str, int]) -> list[Layout]:
    """Return valid layouts holding exactly ``demand`` (profile name → count) on the fewest GPUs
    this planner finds: never more than first-fit decreasing, usually the optimum.

    Raises ValueError naming a profile the model does not have.
    """
    profiles = _profiles(geometry, demand)
    if not profiles:
        return []
    wanted = {k.lower(): v for k, v in demand.items()}
    counts = tuple(wanted[p.name.lower()] for p in profiles)
    names = tuple(p.name for p in profiles)
    pattern_layouts = _patterns(geometry, names)
    patterns = [v for v, _ in pattern_layouts]
    layouts = [layout for _, layout in pattern_layouts]
    z, prices = _lp(patterns, counts)
    chosen: list[int] = []
    rest = list(counts)
    for k, amount in enumerate(z):
        whole = math.floor(amount + _EPS)
        chosen += [k] * whole
        rest = [r - a * whole for r, a in zip(rest, patterns[k])]
    remainder = tuple(max(0, r) for r in rest)
    greedy = _greedy(patterns, remainder, prices)
    exact = _exact(geometry, profiles, patterns, remainder, len(greedy))
    chosen += exact if exact is not None else greedy
    planned = _realise(geometry, profiles, chosen, layouts, counts)
    ffd = first_fit_decreasing(geometry, demand)
    return ffd if len(ffd) < len(planned) else planned


def lower_bound(geometry: MigGeometry, demand: Mapping[str, int]) -> int:
    """Return a number of GPUs no valid plan for ``demand`` can go below.

    The linear relaxation's dual prices, when they are dual feasible (no pattern is worth
    more than one GPU at those prices), give a bound by weak duality; so do total memory
    slices, total compute slices and per-profile count limits.
    """
    profiles = _profiles(geometry, demand)
    if not profiles:
        return 0
    wanted = {k.lower(): v for k, v in demand.items()}
    counts = tuple(wanted[p.name.lower()] for p in profiles)
    patterns = [v for v, _ in _patterns(geometry, tuple(p.name for p in profiles))]
    _, prices = _lp(patterns, counts)
    bound = _cover_bound(profiles, geometry, counts)
    feasible = all(p >= -1e-9 for p in prices) and all(
        sum(p * a for p, a in zip(prices, pattern)) <= 1 + 1e-9 for pattern in patterns
    )
    if feasible:
        bound = max(bound, math.ceil(sum(p * d for p, d in zip(prices, counts)) - 1e-6))
    return bound


def first_fit_decreasing(geometry: MigGeometry, demand: Mapping[str, int]) -> list[Layout]:
    """Return the first-fit decreasing layouts: largest instances first, each on the first GPU
    where it fits, at its lowest free offset. The baseline the planner is measured against."""
    profiles = sorted(
        _profiles(geometry, demand),
        key=lambda p: (-p.memory_slices, -p.compute_slices, p.profile_id),
    )
    wanted = {k.lower(): v for k, v in demand.items()}
    gpus: list[list[MigInstance]] = []
    for profile in profiles:
        first = 0  # GPUs only fill up, so one that refused this profile refuses it for good
        for _ in range(wanted[profile.name.lower()]):
            while first < len(gpus) and not free_starts(geometry, gpus[first], profile.name):
                first += 1
            if first == len(gpus):
                gpus.append([])
            start = free_starts(geometry, gpus[first], profile.name)[0]
            gpus[first].append(MigInstance(start, profile.name))
    return [tuple(sorted(layout)) for layout in gpus]


def add_instance(
    geometry: MigGeometry, layout: Sequence[MigInstance], profile_name: str
) -> MigInstance | None:
    """Return where one more ``profile_name`` instance best fits ``layout`` (the offset that
    leaves the most room for later instances), or None when no valid offset is free."""
    profile = geometry.profile(profile_name)
    if profile is None:
        return None
    best: tuple[int, int] | None = None
    for start in free_starts(geometry, layout, profile.name):
        after = (*layout, MigInstance(start, profile.name))
        score = _flexibility(geometry, after)
        if best is None or score > best[0]:
            best = (score, start)
    return None if best is None else MigInstance(best[1], profile.name)


def plan_requests(
    geometry: MigGeometry, requests: Sequence[InstanceRequest], dedicated: bool = False
) -> list[PlannedGpu]:
    """Plan ``requests`` on the fewest GPUs and say which request each instance serves.

    With ``dedicated``, each tenant's instances get GPUs of their own (a dedicated pool).
    Raises ValueError for a profile the model does not have.
    """
    groups: dict[str | None, list[InstanceRequest]] = {}
    for request in requests:
        groups.setdefault(request.tenant if dedicated else None, []).append(request)
    planned: list[PlannedGpu] = []
    for group in groups.values():
        demand: dict[str, int] = {}
        for request in group:
            name = _canonical(geometry, request.profile)
            demand[name] = demand.get(name, 0) + request.count
        owners: dict[str, Iterator[InstanceRequest]] = {
            name: iter(
                [
                    r
                    for r in group
                    if _canonical(geometry, r.profile) == name
                    for _ in range(r.count)
                ]
            )
            for name in demand
        }
        for layout in plan_layouts(geometry, demand):
            planned.append(
                PlannedGpu(tuple((instance, next(owners[instance.profile])) for instance in layout))
            )
    return planned


def _canonical(geometry: MigGeometry, name: str) -> str:
    profile = geometry.profile(name)
    if profile is None:
        raise ValueError(geometry.unknown_profile_message(name))
    return profile.name


def used_slices(geometry: MigGeometry, layouts: Iterable[Layout]) -> int:
    """Return how many memory slices the layouts take in total."""
    return sum(bin(occupied_slices(geometry, layout)).count("1") for layout in layouts)
