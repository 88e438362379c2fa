"""The devices a node can place work on (host CPU, NVIDIA GPUs, simulated GPUs) and their topology."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from gpuvisor.errors import NotFound
from gpuvisor.partition.mig import MigInstance

__all__ = [
    "DEFAULT_CPU_LOOKAHEAD",
    "DEFAULT_CPU_QUANTUM",
    "DEFAULT_GPU_LOOKAHEAD",
    "DEFAULT_GPU_QUANTUM",
    "Device",
    "DeviceBackend",
    "DeviceKind",
    "Topology",
]

DeviceKind = Literal["cpu", "gpu"]
DeviceBackend = Literal["cpu", "nvml", "simulated"]

#: Seconds of device time one slice may hold before the dispatcher considers switching.
#: A CPU context switch between workers is cheap but CPU kernels are slow, so slices are longer.
DEFAULT_CPU_QUANTUM = 0.010
#: GPU kernels for small inference batches finish in well under a millisecond or two.
DEFAULT_GPU_QUANTUM = 0.002

_DEFAULT_QUANTUM: dict[str, float] = {"cpu": DEFAULT_CPU_QUANTUM, "gpu": DEFAULT_GPU_QUANTUM}

#: How long before a running batch's predicted end the dispatcher sends the next one, which its
#: worker starts the moment the device is handed over. It must cover the trip from the node to
#: a worker (0.1-0.5 ms here) plus the event loop's timer granularity (about 1 ms).
DEFAULT_CPU_LOOKAHEAD = 0.002
DEFAULT_GPU_LOOKAHEAD = 0.001

_DEFAULT_LOOKAHEAD: dict[str, float] = {"cpu": DEFAULT_CPU_LOOKAHEAD, "gpu": DEFAULT_GPU_LOOKAHEAD}


@dataclass
class Device:
    """One schedulable device.

    ``quantum`` left at ``0.0`` takes the kind's default (``DEFAULT_CPU_QUANTUM`` or
    ``DEFAULT_GPU_QUANTUM``), ``lookahead`` left at None the kind's default lookahead (0
    turns the lookahead off). ``index`` is the NVML (``nvidia-smi``) index of a real GPU, not
    necessarily CUDA's: its workers are pinned to it by ``uuid`` (``SliceLaunch.gpu_uuid``).
    ``pci_bus_id`` uses the sysfs form ``0000:3b:00.0``.

    Raises ValueError when a field is out of range (a programming error, not user input).
    """

    id: str
    kind: DeviceKind
    backend: DeviceBackend
    model: str
    memory_total: int
    uuid: str = ""
    sm_count: int | None = None
    numa_node: int | None = None
    pci_bus_id: str | None = None
    mig_mode: bool = False
    threads: int | None = None
    concurrency: int = 1
    quantum: float = 0.0
    lookahead: float | None = None
    node: str = "local"
    healthy: bool = True
    index: int | None = None
    cordoned: bool = False
    """An operator took the device out of placement: its slices move elsewhere."""
    health_reason: str = ""
    """Why the device is unhealthy (e.g. an Xid error NVML reported)."""
    mig_instances: tuple[MigInstance, ...] = ()
    """The GPU instances that exist on a MIG-enabled GPU (profile and start memory slice)."""

    def __post_init__(self) -> None:
        self.mig_instances = tuple(
            i if isinstance(i, MigInstance) else MigInstance(int(i["start"]), str(i["profile"]))
            for i in self.mig_instances
        )
        if not self.id:
            raise ValueError("a device needs a non-empty id")
        if self.kind not in get_args(DeviceKind):
            raise ValueError(f"device {self.id}: kind must be 'cpu' or 'gpu', got {self.kind!r}")
        if self.backend not in get_args(DeviceBackend):
            raise ValueError(
                f"device {self.id}: backend must be 'cpu', 'nvml' or 'simulated', got {self.backend!r}"
            )
        if self.memory_total < 0:
            raise ValueError(f"device {self.id}: memory_total cannot be negative")
        if self.concurrency < 1:
            raise ValueError(f"device {self.id}: concurrency must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"device {self.id}: threads must be at least 1")
        if self.quantum < 0:
            raise ValueError(f"device {self.id}: quantum cannot be negative")
        if self.quantum == 0:
            self.quantum = _DEFAULT_QUANTUM[self.kind]
        if self.lookahead is None:
            self.lookahead = _DEFAULT_LOOKAHEAD[self.kind]
        if self.lookahead < 0:
            raise ValueError(f"device {self.id}: lookahead cannot be negative")

    @property
    def labels(self) -> dict[str, str]:
        """Return the labels a Pool selector matches against: kind, backend, model, id, node."""
        return {
            "kind": self.kind,
            "backend": self.backend,
            "model": self.model,
            "id": self.id,
            "node": self.node,
        }

    def to_dict(self) -> dict[str, Any]:
        """Return every field as a JSON-ready dict; ``Device.from_dict`` reverses it."""
        return dataclasses.asdict(self)

    def document(self) -> dict[str, Any]:
        """Return the device as the API and the CLI show it: every field, camelCase as every
        other object of the API (``memoryTotal``, ``migInstances``)."""
        return {_camel(name): value for name, value in self.to_dict().items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Device:
        """Rebuild a device from ``to_dict`` output; unknown keys (e.g. ``labels``) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Topology:
    """Every device a node (or a simulated fleet) offers, in discovery order.

    Raises ValueError when two devices share an id.
    """

    devices: list[Device] = field(default_factory=list)

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for device in self.devices:
            if device.id in seen:
                raise ValueError(f"duplicate device id {device.id!r} in topology")
            seen.add(device.id)

    def get(self, device_id: str) -> Device | None:
        """Return the device with this id, or None."""
        for device in self.devices:
            if device.id == device_id:
                return device
        return None

    def require(self, device_id: str) -> Device:
        """Return the device with this id; raise NotFound naming the devices there are."""
        device = self.get(device_id)
        if device is None:
            ids = ", ".join(d.id for d in self.devices)
            raise NotFound(f"device '{device_id}' not found (this node has: {ids})")
        return device

    @property
    def gpus(self) -> list[Device]:
        """Return the GPU devices (real and simulated)."""
        return [d for d in self.devices if d.kind == "gpu"]

    @property
    def cpus(self) -> list[Device]:
        """Return the CPU devices."""
        return [d for d in self.devices if d.kind == "cpu"]

    def __iter__(self) -> Iterator[Device]:
        return iter(self.devices)

    def __len__(self) -> int:
        return len(self.devices)

    def to_dict(self) -> dict[str, Any]:
        """Return ``{"devices": [...]}`` with each device's ``to_dict``."""
        return {"devices": [d.to_dict() for d in self.devices]}


def _camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(part.capitalize() for part in rest)
