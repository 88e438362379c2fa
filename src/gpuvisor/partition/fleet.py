"""Fleet capacity planning: every deployment's replicas on a fleet's GPUs, or why they wait.

``plan_fleet`` is what ``gpuvisor plan`` runs, offline and without side effects:

1. partition-tier replicas go on free MIG instances that exist (the fullest GPU first);
2. unless ``existing_only``, the rest get new instances: first where a valid offset is free on
   a GPU that already has a layout, then on MIG GPUs with no layout yet, laid out by
   ``planner.plan_requests`` on as few GPUs as it can;
3. other replicas go, first-fit by decreasing memory, on GPUs without MIG (memory, compute
   shares, exclusive and dedicated rules as on a node);
4. whatever is left stays pending with one reason per GPU, worded as the node words them
   (``placement.placer.place_slice``), plus the fewest instance moves that would make room.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from gpuvisor.inventory.device import Device
from gpuvisor.partition.fragmentation import GpuLayout, plan_defrag, unusable_slices
from gpuvisor.partition.mig import MigGeometry, MigInstance, geometry_for, occupied_slices
from gpuvisor.partition.planner import InstanceRequest, add_instance, plan_requests
from gpuvisor.placement.placer import PlacedSlice, SliceRequest, place_slice, selector_matches

__all__ = ["FleetPlan", "GpuPlan", "Holder", "Pending", "Workload", "plan_fleet"]

MAX_REASONS = 12
"""Distinct reasons listed per pending deployment (devices with the same reason are merged)."""


@dataclass(frozen=True)
class Workload:
    """One deployment's replicas with what placement needs from its Profile and Pool."""

    tenant: str
    deployment: str
    replicas: int
    isolation: str
    memory: int
    compute_share: float = 0.0
    mig_profile: str | None = None
    pool: str = "default"
    selector: tuple[tuple[str, str], ...] = ()
    tenancy: str = "shared"
    disallow_migration: bool = False
    memory_headroom: int = 0  # the pool's: kept free on each of its devices


@dataclass(frozen=True)
class Holder:
    """One replica: the slice placed on an instance or a GPU."""

    workload: Workload
    replica: int


@dataclass
class GpuPlan:
    """One GPU after planning: its MIG layout (instances added by the plan marked) and slices."""

    device: Device
    instances: list[MigInstance]
    added: set[int] = field(default_factory=set)
    holders: dict[int, Holder] = field(default_factory=dict)
    slices: list[Holder] = field(default_factory=list)
    tenants: set[str] = field(default_factory=set)
    memory_used: int = 0
    share_used: float = 0.0
    exclusive: bool = False
    dedicated_to: str | None = None  # the tenant a dedicated pool's replica gave it to

    @property
    def geometry(self) -> MigGeometry | None:
        return geometry_for(self.device.model) if self.device.mig_mode else None

    def hold(self, start: int, workload: Workload, replica: int) -> None:
        """Put one partition-tier replica on the instance starting at ``start``."""
        self.holders[start] = Holder(workload, replica)
        self._take(workload)

    def add_slice(self, workload: Workload, replica: int) -> None:
        """Put one replica of another tier on this GPU."""
        self.slices.append(Holder(workload, replica))
        self._take(workload)
        self.memory_used += workload.memory
        self.share_used += workload.compute_share
        self.exclusive = self.exclusive or workload.isolation == "exclusive"

    def _take(self, workload: Workload) -> None:
        self.tenants.add(workload.tenant)
        if workload.tenancy == "dedicated":
            self.dedicated_to = workload.tenant


@dataclass(frozen=True)
class Pending:
    """Replicas of one deployment that fit nowhere, with the reasons (and a defrag proposal)."""

    workload: Workload
    replicas: int
    reasons: tuple[str, ...]
    defrag: str = ""


@dataclass
class FleetPlan:
    gpus: list[GpuPlan]
    pending: list[Pending]
    requested_profiles: set[str]

    def unusable(self, gpu: GpuPlan) -> list[int]:
        """Free memory slices of a MIG GPU that no requested profile can use (none when no
        profile of this GPU is requested: there is nothing to fit, so nothing to measure)."""
        geometry = gpu.geometry
        if geometry is None or not gpu.instances:
            return []
        if not any(geometry.profile(p) is not None for p in self.requested_profiles):
            return []
        return unusable_slices(geometry, gpu.instances, self.requested_profiles)


def _tenancy_allows(gpu: GpuPlan, workload: Workload) -> bool:
    """A dedicated pool's GPU holds one tenant, whichever pools the others come from."""
    if workload.tenancy == "dedicated":
        return gpu.tenants <= {workload.tenant}
    return gpu.dedicated_to in (None, workload.tenant)


class _Planner:
    def __init__(self, devices: Sequence[Device], workloads: Sequence[Workload]) -> None:
        self.gpus = [GpuPlan(d, list(d.mig_instances)) for d in devices]
        self.workloads = workloads
        self.left = {w: w.replicas for w in workloads}
        self.next_replica = {w: 0 for w in workloads}
        self._pool_cache: dict[tuple[tuple[str, str], ...], list[GpuPlan]] = {}

    def in_pool(self, workload: Workload) -> list[GpuPlan]:
        key = workload.selector
        if key not in self._pool_cache:
            selector = dict(key)
            self._pool_cache[key] = [
                g for g in self.gpus if g.device.healthy and selector_matches(selector, g.device)
            ]
        return self._pool_cache[key]

    def take(self, workload: Workload) -> int:
        replica = self.next_replica[workload]
        self.next_replica[workload] += 1
        self.left[workload] -= 1
        return replica

    def mig_gpus(self, workload: Workload) -> list[tuple[GpuPlan, MigGeometry, str]]:
        out = []
        for gpu in self.in_pool(workload):
            geometry = gpu.geometry
            profile = geometry.profile(workload.mig_profile or "") if geometry else None
            if geometry is not None and profile is not None and _tenancy_allows(gpu, workload):
                out.append((gpu, geometry, profile.name))
        return out

    def on_existing(self, workload: Workload) -> None:
        candidates = sorted(self.mig_gpus(workload), key=lambda c: -len(c[0].holders))
        for gpu, _, name in candidates:
            for instance in gpu.instances:
                if self.left[workload] == 0:
                    return
                if instance.profile == name and instance.start not in gpu.holders:
                    gpu.hold(instance.start, workload, self.take(workload))

    def into_free_offsets(self, workload: Workload) -> None:
        for gpu, geometry, name in self.mig_gpus(workload):
            if not gpu.instances:
                continue  # GPUs without a layout are laid out as a whole (on_blank_gpus)
            while self.left[workload] > 0:
                instance = add_instance(geometry, gpu.instances, name)
                if instance is None:
                    break
                gpu.instances.append(instance)
                gpu.instances.sort()
                gpu.added.add(instance.start)
                gpu.hold(instance.start, workload, self.take(workload))

    def on_blank_gpus(self, group: list[Workload]) -> None:
        head = group[0]
        blank = [g for g in self.in_pool(head) if g.geometry is not None and not g.instances]
        by_model: dict[str, list[GpuPlan]] = {}
        for gpu in blank:
            by_model.setdefault(gpu.device.model, []).append(gpu)
        for gpus in sorted(by_model.values(), key=len, reverse=True):
            geometry = gpus[0].geometry
            assert geometry is not None
            requests = [
                InstanceRequest(p.name, self.left[w], w.tenant, w.deployment)
                for w in group
                if self.left[w] > 0 and (p := geometry.profile(w.mig_profile or "")) is not None
            ]
            if not requests:
                continue
            by_key = {(w.tenant, w.deployment): w for w in group}
            planned = plan_requests(geometry, requests, dedicated=head.tenancy == "dedicated")
            planned.sort(key=lambda p: -bin(occupied_slices(geometry, p.layout)).count("1"))
            for gpu, layout in zip(gpus, planned):
                for instance, request in layout.instances:
                    workload = by_key[(request.tenant or "", request.deployment or "")]
                    gpu.instances.append(instance)
                    gpu.added.add(instance.start)
                    gpu.hold(instance.start, workload, self.take(workload))
                gpu.instances.sort()

    def process_tier(self, workload: Workload) -> None:
        candidates = [g for g in self.in_pool(workload) if not g.device.mig_mode]
        for gpu in candidates:
            while self.left[workload] > 0 and self._fits(gpu, workload):
                gpu.add_slice(workload, self.take(workload))
            if self.left[workload] == 0:
                return

    @staticmethod
    def _fits(gpu: GpuPlan, workload: Workload) -> bool:
        if gpu.exclusive:
            return False
        if workload.isolation == "exclusive" and gpu.slices:
            return False
        if not _tenancy_allows(gpu, workload):
            return False
        if gpu.memory_used + workload.memory > gpu.device.memory_total - workload.memory_headroom:
            return False
        return gpu.share_used + workload.compute_share <= 1.0 + 1e-9


def _size(workload: Workload, devices: Sequence[Device]) -> int:
    sizes = [
        p.memory_slices
        for model in {d.model for d in devices if d.mig_mode}
        if (g := geometry_for(model)) is not None
        and (p := g.profile(workload.mig_profile or "")) is not None
    ]
    return max(sizes, default=0)


def _merge(reasons: dict[str, str]) -> tuple[str, ...]:
    """Group devices that give the same reason: ``gpu-0, gpu-1: reason``; the most common
    reasons first, then in device order."""
    by_text: dict[str, list[str]] = {}
    for device, text in sorted(reasons.items()):
        by_text.setdefault(text, []).append(device)
    merged = []
    for text, devices in sorted(by_text.items(), key=lambda item: -len(item[1])):
        names = ", ".join(devices[:3]) + (f", … ({len(devices)} GPUs)" if len(devices) > 3 else "")
        merged.append(f"{names}: {text}")
    if len(merged) > MAX_REASONS:
        merged = [*merged[:MAX_REASONS], f"… and {len(merged) - MAX_REASONS} other reasons"]
    return tuple(merged) or ("no device matches this deployment's pool",)


def _as_placed(planner: _Planner) -> tuple[list[Device], list[PlacedSlice]]:
    """Return the devices with their planned layouts and every placed slice, as a node sees them."""
    devices, placed = [], []
    for gpu in planner.gpus:
        device = dataclasses.replace(gpu.device, mig_instances=tuple(gpu.instances))
        devices.append(device)
        holders: list[tuple[Workload, int | None]]  # start of its MIG instance, or None
        holders = [(h.workload, start) for start, h in gpu.holders.items()]
        holders += [(h.workload, None) for h in gpu.slices]
        for w, start in holders:
            placed.append(
                PlacedSlice(
                    "",
                    w.tenant,
                    device.id,
                    w.memory,
                    0.0 if start is not None else w.compute_share,
                    "partition" if start is not None else w.isolation,
                    start,
                    dedicated=w.tenancy == "dedicated",
                )
            )
    return devices, placed


def _explain(
    workload: Workload, devices: list[Device], placed: list[PlacedSlice]
) -> tuple[str, ...]:
    """Ask the node's own placer why one more replica fits nowhere."""
    request = SliceRequest(
        f"{workload.tenant}/{workload.deployment}",
        workload.tenant,
        workload.pool,
        workload.memory,
        workload.compute_share,
        workload.isolation,
        workload.mig_profile,
    )
    result = place_slice(
        request,
        devices,
        placed,
        dict(workload.selector),
        workload.tenancy,
        memory_headroom=workload.memory_headroom,
    )
    return _merge(result.reasons)


def _defrag(planner: _Planner, workload: Workload) -> str:
    layouts = []
    for gpu, geometry, _ in planner.mig_gpus(workload):
        pinned = frozenset(s for s, h in gpu.holders.items() if h.workload.disallow_migration)
        layouts.append(
            GpuLayout(gpu.device.id, geometry, tuple(gpu.instances), pinned, frozenset(gpu.holders))
        )
    proposal = plan_defrag(layouts, workload.mig_profile or "")
    return proposal.describe() if proposal is not None and proposal.moves else ""


def plan_fleet(
    devices: Sequence[Device], workloads: Sequence[Workload], existing_only: bool = False
) -> FleetPlan:
    """Place every workload's replicas on ``devices`` (see the module docstring).

    With ``existing_only`` no instance is added: partition-tier replicas only use the MIG
    instances the devices declare, as a node does.
    """
    planner = _Planner(devices, workloads)
    partition = sorted(
        (w for w in workloads if w.isolation == "partition"), key=lambda w: -_size(w, devices)
    )
    for workload in partition:
        planner.on_existing(workload)
    if not existing_only:
        for workload in partition:
            planner.into_free_offsets(workload)
        groups: dict[tuple[tuple[tuple[str, str], ...], str], list[Workload]] = {}
        for workload in partition:
            if planner.left[workload] > 0:
                groups.setdefault((workload.selector, workload.tenancy), []).append(workload)
        for group in groups.values():
            planner.on_blank_gpus(group)
        for workload in partition:
            # GPUs another group laid out (another pool selecting them too) may have room
            # left at free offsets
            planner.into_free_offsets(workload)
    others = sorted(
        (w for w in workloads if w.isolation != "partition"),
        key=lambda w: (w.isolation != "exclusive", -w.memory, -w.compute_share),
    )
    for workload in others:
        planner.process_tier(workload)
    pending: list[Pending] = []
    waiting = [w for w in workloads if planner.left[w] > 0]
    if waiting:
        devices_now, placed = _as_placed(planner)
        # Replicas of the same shape in the same pool wait for the same reasons: ask once.
        reasons: dict[tuple[object, ...], tuple[str, ...]] = {}
        proposals: dict[tuple[object, ...], str] = {}
        for w in waiting:
            # the tenant too: a device a dedicated pool holds refuses other tenants only
            shape = (
                w.selector,
                w.tenancy,
                w.tenant,
                w.isolation,
                w.memory,
                w.compute_share,
                w.memory_headroom,
            )
            key = (*shape, w.mig_profile)
            if key not in reasons:
                reasons[key] = _explain(w, devices_now, placed)
            defrag = ""
            if w.isolation == "partition":
                if key not in proposals:
                    proposals[key] = _defrag(planner, w)
                defrag = proposals[key]
            pending.append(Pending(w, planner.left[w], reasons[key], defrag))
    requested = {w.mig_profile for w in partition if w.mig_profile}
    return FleetPlan(planner.gpus, pending, requested)
