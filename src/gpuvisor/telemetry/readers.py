"""What the telemetry sampler reads a device with: psutil for the CPU device and worker
processes, NVML for NVIDIA GPUs (utilisation, memory, temperature, power, clock event reasons,
per-process GPU memory, critical Xid events). Every read here blocks; the sampler calls them
from a worker thread."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

from gpuvisor.inventory.device import Device

__all__ = ["THROTTLE_REASONS", "CpuReader", "DeviceReading", "NvmlReader"]

log = logging.getLogger("gpuvisor.telemetry")

#: NVML clock event ("throttle") reasons counted as throttling episodes, by the label they get.
#: GPU idle is left out: an idle GPU lowering its clocks is not throttled.
THROTTLE_REASONS: dict[str, int] = {
    "applications_clocks": 0x2,
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sync_boost": 0x10,
    "sw_thermal": 0x20,
    "hw_thermal": 0x40,
    "hw_power_brake": 0x80,
    "display_clocks": 0x100,
}


@dataclass(frozen=True)
class DeviceReading:
    """One device's state at one sample; None where the device does not report a value."""

    device: str
    utilization: float | None = None  # 0–1
    memory_used: int | None = None  # bytes
    temperature: float | None = None  # °C
    power: float | None = None  # W
    throttle: frozenset[str] = frozenset()
    healthy: bool = True
    xids: tuple[int, ...] = ()
    problem: str = ""  # why the device could not be read, when it could not


class CpuReader:
    """psutil readings of the CPU device: utilisation of the CPUs this node may use, temperature
    where the host exposes one, and the resident memory of worker processes."""

    def __init__(self) -> None:
        self.cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self._processes: dict[int, psutil.Process] = {}
        self._has_sensors = hasattr(psutil, "sensors_temperatures")
        psutil.cpu_percent(percpu=True)  # the first call only starts the interval

    def utilization(self) -> float:
        """Return the mean busy fraction of the usable CPUs since the previous call."""
        per_cpu = psutil.cpu_percent(percpu=True)
        chosen = [per_cpu[i] for i in self.cpus if i < len(per_cpu)] or per_cpu
        return sum(chosen) / len(chosen) / 100.0 if chosen else 0.0

    def temperature(self) -> float | None:
        """Return the CPU package temperature, or None (most VMs expose no sensor: then it stops asking)."""
        if not self._has_sensors:
            return None
        try:
            sensors = psutil.sensors_temperatures()
        except (OSError, RuntimeError):
            sensors = {}
        for name in ("coretemp", "k10temp", "zenpower", "cpu_thermal", "acpitz"):
            for entry in sensors.get(name, []):
                if entry.current:
                    return float(entry.current)
        if not sensors:
            self._has_sensors = False
        return None

    def rss(self, pid: int) -> int | None:
        """Return a process's resident memory in bytes, or None when it is gone."""
        process = self._processes.get(pid)
        try:
            if process is None:
                process = self._processes[pid] = psutil.Process(pid)
            return int(process.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            self._processes.pop(pid, None)
            return None

    def forget_except(self, pids: set[int]) -> None:
        for pid in list(self._processes):
            if pid not in pids:
                del self._processes[pid]


_UNAVAILABLE = (
    "NVMLError_NotSupported",
    "NVMLError_NoPermission",
    "NVMLError_FunctionNotFound",
    "NVMLError_Deprecated",
    "NVMLLibraryMismatchError",
)


class NvmlReader:
    """NVML readings of GPUs: utilisation, memory, temperature, power, clock event reasons,
    per-process GPU memory and critical Xid events. ``nvml`` is the ``pynvml`` module."""

    def __init__(self, nvml: Any, devices: Sequence[Device]) -> None:
        self.nvml = nvml
        nvml.nvmlInit()
        self.handles: dict[str, Any] = {}
        self.problems: dict[str, str] = {}
        for device in devices:
            try:
                self.handles[device.id] = nvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            except nvml.NVMLError as exc:
                self.problems[device.id] = f"NVML has no handle for it: {exc}"
        # what a GPU, its driver or this caller's privileges do not offer: a value left out,
        # not a device that failed (NO_PERMISSION on a MIG GPU, a function an older driver
        # lacks, one a newer NVML removed, a pynvml newer than the driver)
        self._unavailable: tuple[type[BaseException], ...] = tuple(
            kind
            for name in _UNAVAILABLE
            if isinstance(kind := getattr(nvml, name, None), type)
            and issubclass(kind, BaseException)
        )
        self.events: Any = None
        try:
            self.events = nvml.nvmlEventSetCreate()
        except (nvml.NVMLError, AttributeError) as exc:
            log.info("Xid events are not available from NVML here (%s)", exc)
        registered = 0
        for device_id, handle in self.handles.items() if self.events is not None else ():
            try:  # each GPU on its own: one that refuses leaves the others watched
                nvml.nvmlDeviceRegisterEvents(
                    handle, nvml.nvmlEventTypeXidCriticalError, self.events
                )
                registered += 1
            except nvml.NVMLError as exc:
                log.info("Xid events of %s are not available from NVML (%s)", device_id, exc)
        if self.events is not None and not registered:
            with contextlib.suppress(Exception):
                nvml.nvmlEventSetFree(self.events)
            self.events = None
        self._uuid_of: dict[str, str] = {}
        for device_id, handle in self.handles.items():
            with contextlib.suppress(nvml.NVMLError):
                self._uuid_of[_text(nvml.nvmlDeviceGetUUID(handle))] = device_id

    def _optional(self, read: Callable[[], Any]) -> Any:
        """Return what ``read`` returns, None where it is not available here (``_UNAVAILABLE``)."""
        try:
            return read()
        except self._unavailable:
            return None

    def xid_events(self) -> dict[str, list[int]]:
        """Return the critical Xid codes raised since the last call, per device id."""
        found: dict[str, list[int]] = {}
        if self.events is None:
            return found
        nvml = self.nvml
        for _ in range(64):  # bounded: a storm of events must not stall the sampler
            try:
                event = nvml.nvmlEventSetWait_v2(self.events, 0)
            except nvml.NVMLError:  # Timeout: nothing (more) pending
                break
            found.setdefault(self._device_of(event.device), []).append(int(event.eventData))
        return found

    def _device_of(self, handle: Any) -> str:
        """The id of the GPU an event came from: by its UUID, or, for a GPU NVML can no
        longer ask (Xid 79, fallen off the bus), by its handle."""
        try:
            return self._uuid_of.get(_text(self.nvml.nvmlDeviceGetUUID(handle)), "")
        except self.nvml.NVMLError:
            address = _address(handle)
            return next(
                (
                    device_id
                    for device_id, known in self.handles.items()
                    if known is handle or (address is not None and _address(known) == address)
                ),
                "",
            )

    def read(self, device: Device) -> tuple[DeviceReading, dict[int, int]]:
        """Return the GPU's reading and its processes' GPU memory (pid → bytes)."""
        nvml = self.nvml
        handle = self.handles.get(device.id)
        if handle is None:
            problem = self.problems.get(device.id, "not known to NVML")
            return DeviceReading(device.id, healthy=False, problem=problem), {}
        try:
            memory = self._optional(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
            rates = self._optional(lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
            temperature = self._optional(
                lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
            )
            milliwatts = self._optional(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
            reasons = self._optional(lambda: _clock_event_reasons(nvml, handle))
            processes = self._optional(lambda: nvml.nvmlDeviceGetComputeRunningProcesses(handle))
        except nvml.NVMLError as exc:
            return DeviceReading(device.id, healthy=False, problem=f"NVML read failed: {exc}"), {}
        throttle = frozenset(
            name for name, bit in THROTTLE_REASONS.items() if reasons is not None and reasons & bit
        )
        per_process = {
            int(p.pid): int(p.usedGpuMemory)
            for p in processes or []
            if getattr(p, "usedGpuMemory", None) is not None
        }
        reading = DeviceReading(
            device.id,
            utilization=rates.gpu / 100.0 if rates is not None else None,
            memory_used=int(memory.used) if memory is not None else None,
            temperature=float(temperature) if temperature is not None else None,
            power=milliwatts / 1000.0 if milliwatts is not None else None,
            throttle=throttle,
        )
        return reading, per_process

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.events is not None:
                self.nvml.nvmlEventSetFree(self.events)
        with contextlib.suppress(Exception):
            self.nvml.nvmlShutdown()


def _clock_event_reasons(nvml: Any, handle: Any) -> int:
    # NVML renamed "throttle reasons" to "clock event reasons" (same bits) in R535 drivers:
    # pynvml has the new name whatever the driver, so an older driver lacks its function
    read = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
    if read is not None:
        missing = getattr(nvml, "NVMLError_FunctionNotFound", None)
        try:
            return int(read(handle))
        except nvml.NVMLError as exc:
            if missing is None or not isinstance(exc, missing):
                raise
    return int(nvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle))


def _address(handle: Any) -> int | None:
    """The address an NVML device handle (a ctypes pointer) points at, or None."""
    try:
        return ctypes.cast(handle, ctypes.c_void_p).value
    except (TypeError, ctypes.ArgumentError):
        return None


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value
