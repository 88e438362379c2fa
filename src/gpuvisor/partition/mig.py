"""Exact MIG geometry: each GPU-instance profile, where it may start, and which layouts are valid.

A MIG-capable GPU has 8 memory slices and 7 compute slices. A GPU instance takes a profile's
number of memory slices starting at one of the profile's valid offsets; instances on one GPU may
not share a memory slice, a profile may appear at most ``max_count`` times, and the compute
slices of all instances add up to at most 7.

Sources:

- NVIDIA Multi-Instance GPU User Guide (R580), "Supported MIG Profiles"
  (https://docs.nvidia.com/datacenter/tesla/mig-user-guide/supported-mig-profiles.html): the
  A100, H100 and H200 profile tables (names, fractions, instance counts) and the placements
  ``nvidia-smi mig -lgipp`` lists, e.g. ``{0,2,4}:2`` for 2g profiles.
- NVIDIA mig-parted ``deployments/systemd/config-default.yaml``: the H100 NVL (94GB) profile
  names and per-GPU counts (1g.12gb × 7, 1g.24gb × 4, 2g.24gb × 3, 3g.47gb × 2, 4g.47gb, 7g.94gb).

Profile ids are the GPU-instance profile ids ``nvidia-smi mig -lgip`` prints (19 for the
one-slice profile, 20 with media extensions, 15, 14, 9, 5, 0). When NVML is present the node
reads the profiles and placements from the driver (``partition.nvml_geometry``) and registers
them with :func:`use_driver_geometry`; :func:`geometry_for` then prefers them to these tables.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "GEOMETRIES",
    "LayoutProblem",
    "MigGeometry",
    "MigInstance",
    "MigProfile",
    "check_layout",
    "describe_no_room",
    "enumerate_layouts",
    "format_slices",
    "free_starts",
    "geometry_for",
    "layout_counts",
    "maximal_layouts",
    "occupied_slices",
    "use_driver_geometry",
]


@dataclass(frozen=True)
class MigProfile:
    """One GPU-instance profile: its size in compute and memory slices, count limit, valid starts."""

    name: str
    profile_id: int
    compute_slices: int
    memory_slices: int
    max_count: int
    starts: tuple[int, ...]

    def mask(self, start: int) -> int:
        """Return the memory slices an instance starting at ``start`` takes, as a bit mask."""
        return ((1 << self.memory_slices) - 1) << start

    def windows(self) -> list[tuple[int, int]]:
        """Return the (first, last) memory slice of each valid placement."""
        return [(s, s + self.memory_slices - 1) for s in self.starts]


@dataclass(frozen=True, order=True)
class MigInstance:
    """One GPU instance in a layout: a profile at a start offset (in memory slices)."""

    start: int
    profile: str


@dataclass(frozen=True)
class LayoutProblem:
    """Why a layout is invalid: the offending instance (its index) and the field to blame."""

    index: int
    field: str  # "profile", "start" or "" (the instance as a whole)
    message: str


@dataclass(frozen=True)
class MigGeometry:
    """Every profile of one GPU model and the slices they share out."""

    model: str
    profiles: tuple[MigProfile, ...]
    memory_slices: int = 8
    compute_slices: int = 7
    source: str = "tables"
    _by_name: dict[str, MigProfile] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self._by_name.update({p.name.lower(): p for p in self.profiles})

    def profile(self, name: str) -> MigProfile | None:
        """Return the profile called ``name`` (case-insensitive), or None."""
        return self._by_name.get(name.strip().lower())

    @property
    def profile_names(self) -> list[str]:
        return [p.name for p in self.profiles]

    def unknown_profile_message(self, name: str) -> str:
        """Return the message for a profile this model does not have, with a suggestion: the
        profile of the same shape when ``name`` is another model's (``1g.5gb`` on an A100-40GB
        is ``1g.10gb`` on an H100-80GB), else the closest name."""
        owners = {
            other.model: theirs.profile_id
            for other in GEOMETRIES.values()
            if (theirs := other.profile(name)) is not None
        }
        mine = [p.name for p in self.profiles if p.profile_id in owners.values()]
        if len(set(owners.values())) == 1 and mine:  # one shape, whoever names it so
            models = " and ".join(f"the {m}" for m in owners)
            hint = f" ('{name}' is {models}'s name; the same instance here is '{mine[0]}')"
        else:
            close = difflib.get_close_matches(name, self.profile_names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{self.model} has no MIG profile '{name}'{hint}; its profiles: " + ", ".join(
            self.profile_names
        )


# The eight-slice geometry every table model shares: (id, compute, memory slices, max, starts).
_SHAPE = (
    (19, 1, 1, 7, tuple(range(7))),
    (20, 1, 1, 1, tuple(range(7))),  # the same one-slice instance with media extensions (+me)
    (15, 1, 2, 4, (0, 2, 4, 6)),
    (14, 2, 2, 3, (0, 2, 4)),
    (9, 3, 4, 2, (0, 4)),
    (5, 4, 4, 1, (0,)),
    (0, 7, 8, 1, (0,)),
)
_NAMES = {
    "A100-40GB": ("1g.5gb", "1g.5gb+me", "1g.10gb", "2g.10gb", "3g.20gb", "4g.20gb", "7g.40gb"),
    "A100-80GB": ("1g.10gb", "1g.10gb+me", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"),
    "H100-80GB": ("1g.10gb", "1g.10gb+me", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"),
    "H100-94GB": ("1g.12gb", "1g.12gb+me", "1g.24gb", "2g.24gb", "3g.47gb", "4g.47gb", "7g.94gb"),
    "H200-141GB": ("1g.18gb", "1g.18gb+me", "1g.35gb", "2g.35gb", "3g.71gb", "4g.71gb", "7g.141gb"),
}

GEOMETRIES: dict[str, MigGeometry] = {
    model: MigGeometry(
        model,
        tuple(MigProfile(name, *shape) for name, shape in zip(names, _SHAPE)),
    )
    for model, names in _NAMES.items()
}
"""The documented geometry of each MIG-capable GPU model in the catalogue, by model name."""

_DRIVER_GEOMETRIES: dict[str, MigGeometry] = {}


def use_driver_geometry(geometry: MigGeometry) -> None:
    """Prefer ``geometry`` (read from NVML) to the tables for its model from now on."""
    _DRIVER_GEOMETRIES[geometry.model.lower()] = geometry


def geometry_for(model: str) -> MigGeometry | None:
    """Return the geometry of a GPU model: the driver's when NVML reported it, else the tables'."""
    wanted = model.strip().lower()
    if wanted in _DRIVER_GEOMETRIES:
        return _DRIVER_GEOMETRIES[wanted]
    for name, geometry in GEOMETRIES.items():
        if name.lower() == wanted:
            return geometry
    return None


def format_slices(slices: Iterable[int]) -> str:
    """Return slice numbers as ranges: ``[0, 1, 2, 3, 6]`` → ``"0–3, 6"``."""
    ordered = sorted(set(slices))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        first, last = ordered[i], ordered[j]
        if j == i:
            parts.append(str(first))
        elif j == i + 1:
            parts.append(f"{first}, {last}")
        else:
            parts.append(f"{first}–{last}")
        i = j + 1
    return ", ".join(parts)


def _bits(mask: int) -> list[int]:
    return [i for i in range(mask.bit_length()) if mask >> i & 1]


def check_layout(geometry: MigGeometry, instances: Sequence[MigInstance]) -> list[LayoutProblem]:
    """Return every reason ``instances`` is not a valid layout on ``geometry`` (empty: valid).

    Checks, per instance in order: the profile exists, the start is one of its valid offsets,
    no memory slice is shared with an earlier instance, the profile's count limit, and the
    compute slices of the whole layout.
    """
    problems: list[LayoutProblem] = []
    taken: dict[int, int] = {}  # memory slice -> index of the instance holding it
    counts: dict[str, int] = {}
    compute = 0
    for index, instance in enumerate(instances):
        profile = geometry.profile(instance.profile)
        if profile is None:
            message = geometry.unknown_profile_message(instance.profile)
            problems.append(LayoutProblem(index, "profile", message))
            continue
        if instance.start not in profile.starts:
            problems.append(
                LayoutProblem(
                    index,
                    "start",
                    f"{profile.name} cannot start at memory slice {instance.start} on "
                    f"{geometry.model} (valid starts: {format_slices(profile.starts)})",
                )
            )
            continue
        slices = range(instance.start, instance.start + profile.memory_slices)
        clash = sorted({taken[s] for s in slices if s in taken})
        if clash:
            other = instances[clash[0]]
            common = [s for s in slices if taken.get(s) == clash[0]]
            problems.append(
                LayoutProblem(
                    index,
                    "start",
                    f"{profile.name} at {instance.start} overlaps {other.profile} at "
                    f"{other.start} on memory slice {format_slices(common)}",
                )
            )
            continue
        counts[profile.name] = counts.get(profile.name, 0) + 1
        if counts[profile.name] > profile.max_count:
            problems.append(
                LayoutProblem(
                    index,
                    "profile",
                    f"more than {profile.max_count} × {profile.name}: an {geometry.model} "
                    f"takes at most {profile.max_count}",
                )
            )
            continue
        compute += profile.compute_slices
        if compute > geometry.compute_slices:
            problems.append(
                LayoutProblem(
                    index,
                    "",
                    f"the instances need {compute} compute slices; an {geometry.model} has "
                    f"{geometry.compute_slices}",
                )
            )
            continue
        for s in slices:
            taken[s] = index
    return problems


def occupied_slices(geometry: MigGeometry, instances: Iterable[MigInstance]) -> int:
    """Return the memory slices a (valid) layout takes, as a bit mask."""
    mask = 0
    for instance in instances:
        profile = geometry.profile(instance.profile)
        if profile is not None:
            mask |= profile.mask(instance.start)
    return mask


def layout_counts(instances: Iterable[MigInstance]) -> dict[str, int]:
    """Return how many instances of each profile a layout has."""
    counts: dict[str, int] = {}
    for instance in instances:
        counts[instance.profile] = counts.get(instance.profile, 0) + 1
    return counts


def _headroom(geometry: MigGeometry, instances: Sequence[MigInstance]) -> tuple[int, int]:
    compute = 0
    for instance in instances:
        profile = geometry.profile(instance.profile)
        compute += profile.compute_slices if profile else 0
    return occupied_slices(geometry, instances), geometry.compute_slices - compute


def free_starts(
    geometry: MigGeometry, instances: Sequence[MigInstance], profile_name: str
) -> list[int]:
    """Return the offsets where one more ``profile_name`` instance fits the (valid) layout."""
    profile = geometry.profile(profile_name)
    if profile is None:
        return []
    mask, compute_left = _headroom(geometry, instances)
    same = sum(1 for i in instances if i.profile.lower() == profile.name.lower())
    if same >= profile.max_count or profile.compute_slices > compute_left:
        return []
    return [s for s in profile.starts if not mask & profile.mask(s)]


def describe_no_room(
    geometry: MigGeometry, instances: Sequence[MigInstance], profile_name: str
) -> str:
    """Return why no ``profile_name`` instance can be added, e.g.
    ``"1g.10gb needs offset 0–6 free; slices 0–6 are taken"``; empty when one fits."""
    profile = geometry.profile(profile_name)
    if profile is None:
        return geometry.unknown_profile_message(profile_name)
    if free_starts(geometry, instances, profile.name):
        return ""
    mask, compute_left = _headroom(geometry, instances)
    if all(mask & profile.mask(start) for start in profile.starts):
        needed = 0
        for start in profile.starts:
            needed |= profile.mask(start)
        taken = _bits(mask & needed)
        verb = "is" if len(taken) == 1 else "are"
        if profile.memory_slices == 1:
            wanted = f"offset {format_slices(profile.starts)}"
        else:
            wanted = "slices " + " or ".join(f"{a}–{b}" for a, b in profile.windows())
        return f"{profile.name} needs {wanted} free; slices {format_slices(taken)} {verb} taken"
    same = sum(1 for i in instances if i.profile.lower() == profile.name.lower())
    if same >= profile.max_count:
        return (
            f"{profile.name}: {same} already, the most an {geometry.model} takes "
            f"is {profile.max_count}"
        )
    return (
        f"{profile.name} needs {profile.compute_slices} compute slices; only "
        f"{compute_left} of {geometry.compute_slices} are free"
    )


def enumerate_layouts(
    geometry: MigGeometry, profiles: Iterable[str] | None = None
) -> list[tuple[MigInstance, ...]]:
    """Return every valid layout (the empty one included) using only ``profiles`` (default all).

    The per-GPU search space is small (a few thousand layouts), so it is enumerated exactly.
    """
    allowed = (
        geometry.profiles
        if profiles is None
        else tuple(p for p in geometry.profiles if p.name in set(profiles))
    )
    placements = sorted(
        (
            (start, index, profile)
            for index, profile in enumerate(allowed)
            for start in profile.starts
        ),
        key=lambda item: (item[0], item[1]),
    )
    layouts: list[tuple[MigInstance, ...]] = []
    chosen: list[MigInstance] = []
    counts = [0] * len(allowed)

    def extend(position: int, mask: int, compute: int) -> None:
        layouts.append(tuple(chosen))
        for k in range(position, len(placements)):
            start, index, profile = placements[k]
            bits = profile.mask(start)
            if (
                mask & bits
                or counts[index] >= profile.max_count
                or compute + profile.compute_slices > geometry.compute_slices
            ):
                continue
            chosen.append(MigInstance(start, profile.name))
            counts[index] += 1
            extend(k + 1, mask | bits, compute + profile.compute_slices)
            counts[index] -= 1
            chosen.pop()

    extend(0, 0, 0)
    return layouts


def maximal_layouts(
    geometry: MigGeometry, profiles: Iterable[str] | None = None
) -> list[tuple[MigInstance, ...]]:
    """Return the valid layouts to which no instance of ``profiles`` (default all) can be added."""
    names = [p.name for p in geometry.profiles] if profiles is None else list(profiles)
    return [
        layout
        for layout in enumerate_layouts(geometry, names)
        if not any(free_starts(geometry, layout, name) for name in names)
    ]
