"""The placement framework: one cycle places one slice, through plugins at fixed extension points.

It follows the Kubernetes scheduler framework. A cycle runs

1. **PreFilter** plugins once per slice (e.g. the tenant's quota): a refusal there refuses
   every device for the same reason;
2. **Filter** plugins per device, in order, stopping at the first refusal, whose reason is
   the device's answer to "why not here";
3. **Score** plugins on the devices that passed, each giving 0-100, summed with weights;
   the highest total wins and ties go to the device discovered first;
4. **Reserve** plugins on the winner (the snapshot counts the slice from then on, and a
   partition-tier slice takes its MIG instance); a failure calls Unreserve on those that
   reserved, in reverse order;
5. **Bind** plugins, which make it so (the controller starts the worker); a failure unreserves.

Plugins are small classes, one per file under ``placement/plugins``, each with a ``name``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, Protocol

from gpuvisor.inventory.device import Device

__all__ = [
    "BindPlugin",
    "Code",
    "Cycle",
    "DeviceInfo",
    "FilterPlugin",
    "Framework",
    "PlacedSlice",
    "PlacementResult",
    "PoolPolicy",
    "PreFilterPlugin",
    "ReservePlugin",
    "ScorePlugin",
    "SliceRequest",
    "Snapshot",
    "Status",
    "TenantQuota",
]

Numa = Literal["any", "local", "dedicated"]


class Code(StrEnum):
    """How a plugin answered."""

    SUCCESS = "Success"
    UNSCHEDULABLE = "Unschedulable"
    """Not now: it may fit once other slices leave (memory, compute, an exclusive holder)."""
    UNRESOLVABLE = "UnschedulableAndUnresolvable"
    """Not on this device whatever else moves (wrong pool, too small, cordoned)."""
    ERROR = "Error"


@dataclass(frozen=True)
class Status:
    """A plugin's answer: a code, the plugin's name and human-readable reasons."""

    code: Code = Code.SUCCESS
    reasons: tuple[str, ...] = ()
    plugin: str = ""

    @property
    def ok(self) -> bool:
        return self.code is Code.SUCCESS

    @property
    def message(self) -> str:
        return "; ".join(self.reasons)

    @classmethod
    def success(cls) -> Status:
        return _SUCCESS

    @classmethod
    def unschedulable(cls, plugin: str, *reasons: str) -> Status:
        return cls(Code.UNSCHEDULABLE, reasons, plugin)

    @classmethod
    def unresolvable(cls, plugin: str, *reasons: str) -> Status:
        return cls(Code.UNRESOLVABLE, reasons, plugin)

    @classmethod
    def error(cls, plugin: str, *reasons: str) -> Status:
        return cls(Code.ERROR, reasons, plugin)


_SUCCESS = Status()


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
    deployment: str = ""
    numa: Numa = "any"
    anti_affinity: bool = False


@dataclass(frozen=True)
class PlacedSlice:
    """A slice that already holds room on a device."""

    slice_id: str
    tenant: str
    device_id: str
    memory: int
    compute_share: float
    isolation: str
    mig_start: int | None = None
    """The start (memory slice) of the MIG instance a partition-tier slice holds."""
    deployment: str = ""
    numa: Numa = "any"
    dedicated: bool = False
    """Placed through a ``tenancy: dedicated`` pool: its device is its tenant's alone."""


@dataclass(frozen=True)
class PoolPolicy:
    """What the slice's pool asks of placement."""

    name: str = "default"
    selector: Mapping[str, str] = field(default_factory=dict)
    tenancy: Literal["shared", "dedicated"] = "shared"
    strategy: Literal["binpack", "spread"] = "binpack"
    memory_headroom: int = 0
    """Bytes kept free on every device of the pool (driver, CUDA contexts, fragmentation)."""


@dataclass(frozen=True)
class TenantQuota:
    """The tenant's caps on placed memory and guaranteed compute (None: no cap)."""

    memory: int | None = None
    compute: float | None = None


@dataclass
class DeviceInfo:
    """One device and the slices it holds, as a cycle sees them."""

    device: Device
    slices: list[PlacedSlice] = field(default_factory=list)

    @property
    def memory_used(self) -> int:
        return sum(s.memory for s in self.slices)

    @property
    def share_used(self) -> float:
        return sum(s.compute_share for s in self.slices)


class Snapshot:
    """The devices and the slices on them, taken once and updated by Reserve/Unreserve.

    Devices keep their given order: it breaks ties between equal scores.
    """

    def __init__(self, devices: Iterable[Device], placed: Iterable[PlacedSlice] = ()) -> None:
        self.infos: dict[str, DeviceInfo] = {d.id: DeviceInfo(d) for d in devices}
        for s in placed:
            info = self.infos.get(s.device_id)
            if info is not None:
                info.slices.append(s)
        # slices by NUMA domain and by node, built when first asked for and dropped on change
        self._by_domain: dict[tuple[str, int | None], list[PlacedSlice]] | None = None
        self._by_node: dict[str, list[PlacedSlice]] | None = None

    def __iter__(self) -> Any:
        return iter(self.infos.values())

    def get(self, device_id: str) -> DeviceInfo | None:
        return self.infos.get(device_id)

    def slices(self) -> list[PlacedSlice]:
        return [s for info in self.infos.values() for s in info.slices]

    def in_numa_domain(self, device: Device) -> list[PlacedSlice]:
        """Return the slices on every device sharing ``device``'s NUMA node; a device with no
        NUMA node (the host CPU) counts as the whole node."""
        if self._by_domain is None:
            self._by_domain = {}
            for info in self.infos.values():
                key = (info.device.node, info.device.numa_node)
                self._by_domain.setdefault(key, []).extend(info.slices)
        return self._by_domain.get((device.node, device.numa_node), [])

    def on_node(self, node: str) -> list[PlacedSlice]:
        """Return the slices on every device of ``node``."""
        if self._by_node is None:
            self._by_node = {}
            for info in self.infos.values():
                self._by_node.setdefault(info.device.node, []).extend(info.slices)
        return self._by_node.get(node, [])

    def add(self, placed: PlacedSlice) -> None:
        self.infos[placed.device_id].slices.append(placed)
        self._by_domain = self._by_node = None

    def remove(self, slice_id: str) -> None:
        for info in self.infos.values():
            info.slices = [s for s in info.slices if s.slice_id != slice_id]
        self._by_domain = self._by_node = None


@dataclass
class Cycle:
    """One placement attempt: the request, its pool and quota, and data plugins share."""

    request: SliceRequest
    pool: PoolPolicy = field(default_factory=PoolPolicy)
    quota: TenantQuota = field(default_factory=TenantQuota)
    data: dict[str, Any] = field(default_factory=dict)
    """Per-cycle plugin data, e.g. the MIG instance each passing device would give."""


class PreFilterPlugin(Protocol):
    name: str

    def pre_filter(self, cycle: Cycle, snapshot: Snapshot) -> Status: ...


class FilterPlugin(Protocol):
    name: str

    def filter(self, cycle: Cycle, info: DeviceInfo, snapshot: Snapshot) -> Status: ...


class ScorePlugin(Protocol):
    name: str
    weight: float

    def score(self, cycle: Cycle, info: DeviceInfo, snapshot: Snapshot) -> float:
        """Return 0 (worst) to 100 (best) for placing the slice on this device."""
        ...


class ReservePlugin(Protocol):
    name: str

    def reserve(self, cycle: Cycle, device_id: str, snapshot: Snapshot) -> Status: ...

    def unreserve(self, cycle: Cycle, device_id: str, snapshot: Snapshot) -> None: ...


class BindPlugin(Protocol):
    name: str

    def bind(self, cycle: Cycle, device_id: str) -> Status: ...


@dataclass
class PlacementResult:
    """The chosen device, or None with one reason per device explaining the refusal."""

    device_id: str | None
    reasons: dict[str, str] = field(default_factory=dict)
    mig_start: int | None = None
    """For a partition-tier slice: the start of the free MIG instance chosen for it."""
    status: Status = field(default_factory=Status)
    scores: dict[str, float] = field(default_factory=dict)
    """Total score of every device that passed the filters."""

    def explain(self) -> str:
        """Return the reasons in one line; one reason shared by every device is said once."""
        if self.device_id is not None:
            return ""
        if not self.status.ok and not self.reasons:
            return self.status.message
        if not self.reasons:
            return "no device is known to this node"
        distinct = set(self.reasons.values())
        if len(distinct) == 1 and len(self.reasons) > 1:
            return f"all {len(self.reasons)} devices: {distinct.pop()}"
        return "; ".join(f"{device}: {reason}" for device, reason in sorted(self.reasons.items()))


class Framework:
    """Runs the plugins of each extension point in order; see the module docstring."""

    def __init__(
        self,
        pre_filters: Sequence[PreFilterPlugin] = (),
        filters: Sequence[FilterPlugin] = (),
        scores: Sequence[ScorePlugin] = (),
        reserves: Sequence[ReservePlugin] = (),
        binders: Sequence[BindPlugin] = (),
    ) -> None:
        self.pre_filters = list(pre_filters)
        self.filters = list(filters)
        self.scores = list(scores)
        self.reserves = list(reserves)
        self.binders = list(binders)

    def with_binders(self, *binders: BindPlugin) -> Framework:
        """Return a framework with the same plugins and these Bind plugins."""
        return Framework(self.pre_filters, self.filters, self.scores, self.reserves, binders)

    def filter_device(self, cycle: Cycle, info: DeviceInfo, snapshot: Snapshot) -> Status:
        for plugin in self.filters:
            status = plugin.filter(cycle, info, snapshot)
            if not status.ok:
                return status
        return Status.success()

    def place(self, cycle: Cycle, snapshot: Snapshot) -> PlacementResult:
        """Run one cycle: return where the slice went (reserved and bound), or why nowhere."""
        result = PlacementResult(device_id=None)
        for pre in self.pre_filters:
            status = pre.pre_filter(cycle, snapshot)
            if not status.ok:
                result.status = status
                result.reasons = {info.device.id: status.message for info in snapshot}
                return result
        feasible: list[DeviceInfo] = []
        for info in snapshot:
            status = self.filter_device(cycle, info, snapshot)
            if status.ok:
                feasible.append(info)
            else:
                result.reasons[info.device.id] = status.message
        if not feasible:
            result.status = Status.unschedulable("framework", result.explain())
            return result
        best: DeviceInfo | None = None
        for info in feasible:
            total = sum(
                plugin.weight * max(0.0, min(100.0, plugin.score(cycle, info, snapshot)))
                for plugin in self.scores
            )
            result.scores[info.device.id] = total
            if best is None or total > result.scores[best.device.id] + 1e-9:
                best = info
        assert best is not None
        device_id = best.device.id
        status = self._reserve(cycle, device_id, snapshot)
        if status.ok:
            for binder in self.binders:
                status = binder.bind(cycle, device_id)
                if not status.ok:
                    self._unreserve(cycle, device_id, snapshot, len(self.reserves))
                    break
        if not status.ok:
            result.status = status
            result.reasons = {device_id: status.message}
            return result
        result.device_id = device_id
        result.reasons.clear()
        result.mig_start = cycle.data.get("mig_start", {}).get(device_id)
        return result

    def _reserve(self, cycle: Cycle, device_id: str, snapshot: Snapshot) -> Status:
        for n, plugin in enumerate(self.reserves):
            status = plugin.reserve(cycle, device_id, snapshot)
            if not status.ok:
                self._unreserve(cycle, device_id, snapshot, n)
                return status
        return Status.success()

    def _unreserve(self, cycle: Cycle, device_id: str, snapshot: Snapshot, upto: int) -> None:
        for plugin in reversed(self.reserves[:upto]):
            plugin.unreserve(cycle, device_id, snapshot)
