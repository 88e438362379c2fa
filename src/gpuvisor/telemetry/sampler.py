"""The telemetry sampler: every ``period`` seconds, each device's utilisation, memory,
temperature, power, clock throttling and health (NVML on a GPU, psutil on the CPU device),
and each worker's memory (its GPU memory from NVML on a GPU, its resident memory on the CPU).

The reads block (NVML calls, /proc), so they run on a worker thread; only the publishing of
the results into the metrics runs on the event loop. The sampler measures its own CPU time
(both parts) and exports it as ``gpuvisor_sampler_cpu_seconds_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from gpuvisor.inventory.device import Device
from gpuvisor.telemetry.metrics import Metrics
from gpuvisor.telemetry.readers import CpuReader, DeviceReading, NvmlReader

__all__ = [
    "DEFAULT_SAMPLE_PERIOD",
    "Sample",
    "TelemetrySampler",
    "WorkerTarget",
    "targets_from_slices",
]

log = logging.getLogger("gpuvisor.telemetry")

DEFAULT_SAMPLE_PERIOD = 1.0


@dataclass(frozen=True)
class WorkerTarget:
    """One slice's worker process, whose memory the sampler reads."""

    slice_id: str
    tenant: str
    deployment: str
    device: str
    pid: int


class _SliceLike(Protocol):
    id: str
    tenant: str
    deployment: str
    device_id: str | None
    worker_pid: int | None


def targets_from_slices(slices: Iterable[_SliceLike]) -> list[WorkerTarget]:
    """Return the workers of the placed slices that have a running worker."""
    return [
        WorkerTarget(s.id, s.tenant, s.deployment, s.device_id, s.worker_pid)
        for s in slices
        if s.device_id is not None and s.worker_pid is not None
    ]


@dataclass
class Sample:
    """One sampling pass: device readings, per-slice memory, and what the pass cost."""

    at: float  # wall-clock seconds
    devices: dict[str, DeviceReading] = field(default_factory=dict)
    slice_memory: dict[str, int] = field(default_factory=dict)
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0


class TelemetrySampler:
    """Samples ``devices`` and the workers ``targets()`` names every ``period`` seconds and
    publishes the readings into ``metrics``; ``latest`` holds the last sample for the dashboard.

    ``nvml`` is the ``pynvml`` module to use (imported on first need when None). Raises
    ValueError for a period that is not positive.
    """

    def __init__(
        self,
        metrics: Metrics,
        devices: Sequence[Device],
        targets: Callable[[], list[WorkerTarget]],
        period: float = DEFAULT_SAMPLE_PERIOD,
        nvml: Any = None,
        is_current: Callable[[WorkerTarget], bool] | None = None,
        on_sample: Callable[[Sample], None] | None = None,
    ) -> None:
        if not period > 0:
            raise ValueError(f"the sampling period must be > 0 seconds, got {period}")
        self.metrics = metrics
        self.devices = list(devices)
        self.targets = targets
        self.period = period
        self.is_current = is_current or (lambda _: True)
        self.on_sample = on_sample  # e.g. the node marking devices unhealthy
        self.latest: Sample | None = None
        self.cpu_seconds = 0.0  # the sampler's own CPU time, all passes
        self.samples = 0
        self._nvml_module = nvml
        self._nvml: NvmlReader | None = None
        self._cpu: CpuReader | None = None
        self._throttled: dict[str, frozenset[str]] = {}
        self._task: asyncio.Task[None] | None = None
        metrics.sampler_period.set(period)

    # ---- the blocking part (a worker thread) -------------------------------------------

    def open(self) -> None:
        """Prepare the readers (NVML is initialised here, once); safe to call again."""
        if self._cpu is None:
            self._cpu = CpuReader()
        gpus = [d for d in self.devices if d.backend == "nvml"]
        if gpus and self._nvml is None:
            try:
                module = self._nvml_module or importlib.import_module("pynvml")
                self._nvml = NvmlReader(module, gpus)
            except Exception as exc:  # no library, no driver: GPUs read as unhealthy
                log.warning("GPU telemetry is unavailable: %s", exc)

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.close()
            self._nvml = None

    def sample(self, targets: Sequence[WorkerTarget]) -> Sample:
        """Read every device and worker once (blocking); the sample records its own CPU cost."""
        started_cpu, started_wall = time.thread_time(), time.perf_counter()
        self.open()
        assert self._cpu is not None
        cpu = self._cpu
        out = Sample(at=time.time())
        gpu_memory: dict[int, int] = {}
        xids = self._nvml.xid_events() if self._nvml is not None else {}
        for device in self.devices:
            if device.backend == "nvml":
                if self._nvml is None:
                    reading = DeviceReading(device.id, healthy=False, problem="NVML unavailable")
                else:
                    reading, per_process = self._nvml.read(device)
                    gpu_memory.update(per_process)
                if device.id in xids:
                    reading = dataclasses.replace(reading, xids=tuple(xids[device.id]))
                out.devices[device.id] = reading
        rss: dict[int, int] = {}
        for target in targets:
            if target.pid not in rss:
                value = cpu.rss(target.pid)
                if value is not None:
                    rss[target.pid] = value
        cpu.forget_except(set(rss))
        backends = {d.id: d.backend for d in self.devices}
        for target in targets:
            if backends.get(target.device) == "nvml":
                if target.pid in gpu_memory:
                    out.slice_memory[target.slice_id] = gpu_memory[target.pid]
            elif target.pid in rss:
                out.slice_memory[target.slice_id] = rss[target.pid]
        for device in self.devices:
            if device.backend != "cpu":
                continue
            pids = {t.pid for t in targets if t.device == device.id and t.pid in rss}
            out.devices[device.id] = DeviceReading(
                device.id,
                utilization=cpu.utilization(),
                memory_used=sum(rss[pid] for pid in pids),
                temperature=cpu.temperature(),
            )
        out.wall_seconds = time.perf_counter() - started_wall
        out.cpu_seconds = time.thread_time() - started_cpu
        return out

    # ---- the event-loop part --------------------------------------------------------------

    def publish(self, sample: Sample, targets: Sequence[WorkerTarget]) -> None:
        """Put a sample into the metrics and ``latest``; counts the publishing CPU time too."""
        started = time.thread_time()
        m = self.metrics
        models = {d.id: d.model for d in self.devices}
        for device_id, r in sample.devices.items():
            m.device_healthy.labels(device_id).set(1 if r.healthy else 0)
            if r.utilization is not None:
                m.device_utilization.labels(device_id).set(r.utilization)
            if r.memory_used is not None:
                m.device_memory_used.labels(device_id, models.get(device_id, "")).set(r.memory_used)
            if r.temperature is not None:
                m.device_temperature.labels(device_id).set(r.temperature)
            if r.power is not None:
                m.device_power.labels(device_id).set(r.power)
            previous = self._throttled.get(device_id, frozenset())
            for reason in sorted(r.throttle - previous):
                m.device_throttle_events.labels(device_id, reason).inc()
            self._throttled[device_id] = r.throttle
            for xid in r.xids:
                m.device_xid_errors.labels(device_id, str(xid)).inc()
        for target in targets:
            used = sample.slice_memory.get(target.slice_id)
            # a slice stopped while the sample was taken must not get its series back
            if used is not None and self.is_current(target):
                m.slice_memory_used.labels(
                    target.device, target.tenant, target.deployment, target.slice_id
                ).set(used)
        self.latest = sample
        self.samples += 1
        spent = sample.cpu_seconds + (time.thread_time() - started)
        self.cpu_seconds += spent
        m.sampler_cpu.inc(spent)
        m.sampler_samples.inc()

    async def sample_now(self) -> Sample:
        """Take and publish one sample (the reads on a worker thread)."""
        targets = self.targets()
        sample = await asyncio.to_thread(self.sample, targets)
        self.publish(sample, targets)
        if self.on_sample is not None:
            self.on_sample(sample)
        return sample

    def start(self) -> None:
        """Sample every ``period`` seconds on the running loop until ``stop``."""
        self._task = asyncio.create_task(self._run(), name="telemetry-sampler")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                await self.sample_now()
            except Exception:
                log.exception("telemetry sample failed; trying again in %.1fs", self.period)
            next_at += self.period
            now = loop.time()
            if next_at < now:  # fell behind (a long pass, a busy loop): skip, do not burst
                next_at = now + self.period
            await asyncio.sleep(next_at - now)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await asyncio.to_thread(self.close)
