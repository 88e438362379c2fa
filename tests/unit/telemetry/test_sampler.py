"""The telemetry sampler: psutil readings of real worker processes and the CPU device, NVML
readings of GPUs (a stand-in NVML module where this machine has no GPU; the real one on a GPU),
throttle and Xid counting, and the sampler measuring its own cost."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest

from gpuvisor.inventory.device import Device
from gpuvisor.telemetry.metrics import Metrics
from gpuvisor.telemetry.readers import NvmlReader
from gpuvisor.telemetry.sampler import TelemetrySampler, WorkerTarget, targets_from_slices

MiB = 2**20
CPU = Device("cpu-0", "cpu", "cpu", "test CPU", 8 * 2**30, threads=1)
GPU = Device("gpu-0", "gpu", "nvml", "H100-80GB", 80 * 2**30, index=0)


@pytest.fixture
def worker() -> Iterator[subprocess.Popen[bytes]]:
    """A real process holding 64 MiB, standing in for a slice's worker."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; b = bytearray(64 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
            "print('ready', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
    yield child
    child.terminate()
    child.wait(10)


def _value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_cpu_device_and_worker_memory_come_from_psutil(worker: subprocess.Popen[bytes]) -> None:
    m = Metrics()
    targets = [
        WorkerTarget("retail/a/0", "retail", "a", "cpu-0", worker.pid),
        # a shared worker: two slices, one process; the device counts its memory once
        WorkerTarget("retail/b/0", "retail", "b", "cpu-0", worker.pid),
    ]
    sampler = TelemetrySampler(m, [CPU], lambda: targets)
    sample = sampler.sample(targets)
    rss = sample.slice_memory["retail/a/0"]
    assert rss >= 64 * MiB
    assert sample.slice_memory["retail/b/0"] == rss
    reading = sample.devices["cpu-0"]
    assert reading.memory_used == rss
    assert reading.utilization is not None and 0.0 <= reading.utilization <= 1.0
    assert reading.healthy and reading.power is None
    assert sample.cpu_seconds > 0
    sampler.publish(sample, targets)
    labels = {"device": "cpu-0", "tenant": "retail", "deployment": "a", "slice": "retail/a/0"}
    assert m.registry.get_sample_value("gpuvisor_slice_memory_used_bytes", labels) == rss
    assert _value(m, "gpuvisor_device_memory_used_bytes", device="cpu-0", model="test CPU") == rss
    assert _value(m, "gpuvisor_device_healthy", device="cpu-0") == 1
    assert _value(m, "gpuvisor_device_utilization_ratio", device="cpu-0") is not None
    assert _value(m, "gpuvisor_sampler_samples_total") == 1
    assert (_value(m, "gpuvisor_sampler_cpu_seconds_total") or 0) > 0
    assert sampler.cpu_seconds == _value(m, "gpuvisor_sampler_cpu_seconds_total")


def test_a_worker_that_exited_is_skipped(worker: subprocess.Popen[bytes]) -> None:
    pid = worker.pid
    worker.terminate()
    worker.wait(10)
    targets = [WorkerTarget("retail/a/0", "retail", "a", "cpu-0", pid)]
    sampler = TelemetrySampler(Metrics(), [CPU], lambda: targets)
    sample = sampler.sample(targets)
    assert sample.slice_memory == {}
    assert sample.devices["cpu-0"].memory_used == 0


def test_a_slice_stopped_during_the_sample_does_not_get_its_series_back(
    worker: subprocess.Popen[bytes],
) -> None:
    m = Metrics()
    targets = [WorkerTarget("retail/a/0", "retail", "a", "cpu-0", worker.pid)]
    sampler = TelemetrySampler(m, [CPU], lambda: targets, is_current=lambda _: False)
    sampler.publish(sampler.sample(targets), targets)
    labels = {"device": "cpu-0", "tenant": "retail", "deployment": "a", "slice": "retail/a/0"}
    assert m.registry.get_sample_value("gpuvisor_slice_memory_used_bytes", labels) is None


def test_targets_are_the_placed_slices_with_a_worker() -> None:
    def s(sid: str, device: str | None, pid: int | None) -> Any:
        return SimpleNamespace(id=sid, tenant="t", deployment="d", device_id=device, worker_pid=pid)

    targets = targets_from_slices(
        [s("t/d/0", "cpu-0", 11), s("t/d/1", None, None), s("t/d/2", "cpu-0", None)]
    )
    assert targets == [WorkerTarget("t/d/0", "t", "d", "cpu-0", 11)]


def test_sampler_runs_on_its_period_and_stops() -> None:
    m = Metrics()

    async def scenario() -> tuple[int, int]:
        sampler = TelemetrySampler(m, [CPU], list, period=0.05)
        sampler.start()
        await asyncio.sleep(0.4)
        await sampler.stop()
        stopped_at = sampler.samples
        await asyncio.sleep(0.15)
        return stopped_at, sampler.samples

    samples, later = asyncio.run(scenario())
    # 0.4 s at a 50 ms period: never more than its period allows (8, and one at the start);
    # a loaded machine may delay some, but it samples more than once
    assert 2 <= samples <= 10
    assert later == samples, "no sample after stop()"
    assert _value(m, "gpuvisor_sampler_period_seconds") == 0.05


def test_period_must_be_positive() -> None:
    with pytest.raises(ValueError, match="period must be > 0"):
        TelemetrySampler(Metrics(), [CPU], list, period=0)


# ---- GPUs --------------------------------------------------------------------------------


class StandInNvml:
    """The slice of the pynvml API the sampler uses, for machines without a GPU. Each GPU is a
    dict: used, util, temp, milliwatts (None: not supported), reasons, processes, broken."""

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):  # pynvml's name
        pass

    class NVMLError_NoPermission(NVMLError):  # a MIG GPU to a caller without privileges
        pass

    class NVMLError_FunctionNotFound(NVMLError):  # a driver older than the function
        pass

    class NVMLLibraryMismatchError(Exception):  # pynvml newer than the driver: no NVMLError
        pass

    NVML_TEMPERATURE_GPU = 0
    nvmlEventTypeXidCriticalError = 8

    def __init__(self, gpus: list[dict[str, Any]]) -> None:
        self.gpus = gpus
        self.events: list[SimpleNamespace] = []
        self.registered: list[int] = []
        self.shut_down = False

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shut_down = True

    def _gpu(self, handle: int) -> dict[str, Any]:
        gpu = self.gpus[handle]
        if gpu.get("broken"):
            raise self.NVMLError("GPU is lost")
        return gpu

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        if self.gpus[handle].get("lost"):
            raise self.NVMLError("GPU is lost")
        return f"GPU-{handle}"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        if self._gpu(handle).get("memory_refused"):
            raise self.NVMLError_NoPermission("Insufficient Permissions")
        return SimpleNamespace(used=self._gpu(handle)["used"], total=80 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=self._gpu(handle)["util"], memory=0)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return int(self._gpu(handle)["temp"])

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        milliwatts = self._gpu(handle)["milliwatts"]
        if milliwatts is None:
            raise self.NVMLError_NotSupported("Not Supported")
        return int(milliwatts)

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: int) -> int:
        if self._gpu(handle).get("old_driver"):
            raise self.NVMLError_FunctionNotFound("Function Not Found")
        return int(self._gpu(handle)["reasons"])

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: int) -> int:
        return int(self._gpu(handle)["reasons"])

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[SimpleNamespace]:
        refused = self._gpu(handle).get("processes_refused")
        if refused == "permission":
            raise self.NVMLError_NoPermission("Insufficient Permissions")
        if refused == "mismatch":
            raise self.NVMLLibraryMismatchError("Unversioned function called")
        return [SimpleNamespace(pid=p, usedGpuMemory=b) for p, b in self._gpu(handle)["processes"]]

    def nvmlEventSetCreate(self) -> str:
        return "events"

    def nvmlDeviceRegisterEvents(self, handle: int, kinds: int, events: str) -> None:
        if self.gpus[handle].get("no_events"):
            raise self.NVMLError_NotSupported("Not Supported")
        self.registered.append(handle)

    def nvmlEventSetWait_v2(self, events: str, timeout_ms: int) -> SimpleNamespace:
        if not self.events:
            raise self.NVMLError("Timeout")
        return self.events.pop(0)

    def nvmlEventSetFree(self, events: str) -> None:
        pass


def _real_nvml() -> Any:
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
    except Exception:
        return None
    return pynvml if count else None


def _gpu(**overrides: Any) -> dict[str, Any]:
    return {"used": 10 * 2**30, "util": 37, "temp": 61, "milliwatts": 215_000, "reasons": 0,
            "processes": [], **overrides}  # fmt: skip


@pytest.mark.skipif(_real_nvml() is not None, reason="a GPU is present: the real NVML test runs")
def test_gpu_readings_throttle_episodes_and_xid_errors_from_nvml() -> None:
    nvml = StandInNvml([_gpu(processes=[(4242, 3 * 2**30)])])
    m = Metrics()
    targets = [WorkerTarget("retail/a/0", "retail", "a", "gpu-0", 4242)]
    sampler = TelemetrySampler(m, [GPU], lambda: targets, nvml=nvml)

    sampler.publish(sampler.sample(targets), targets)
    assert nvml.registered == [0]
    assert _value(m, "gpuvisor_device_utilization_ratio", device="gpu-0") == pytest.approx(0.37)
    assert _value(m, "gpuvisor_device_temperature_celsius", device="gpu-0") == 61
    assert _value(m, "gpuvisor_device_power_watts", device="gpu-0") == pytest.approx(215.0)
    assert (
        _value(m, "gpuvisor_device_memory_used_bytes", device="gpu-0", model="H100-80GB")
        == 10 * 2**30
    )
    labels = {"device": "gpu-0", "tenant": "retail", "deployment": "a", "slice": "retail/a/0"}
    assert m.registry.get_sample_value("gpuvisor_slice_memory_used_bytes", labels) == 3 * 2**30

    # thermal slowdown starts (plus the idle bit, which is not throttling), lasts, then a power cap
    nvml.gpus[0]["reasons"] = 0x40 | 0x1
    sampler.publish(sampler.sample(targets), targets)
    sampler.publish(sampler.sample(targets), targets)
    nvml.gpus[0]["reasons"] = 0x40 | 0x4
    nvml.gpus[0]["milliwatts"] = None  # a GPU that does not report power
    nvml.events.append(SimpleNamespace(device=0, eventData=79))
    sample = sampler.sample(targets)
    sampler.publish(sample, targets)
    assert sample.devices["gpu-0"].throttle == {"hw_thermal", "sw_power_cap"}
    assert sample.devices["gpu-0"].power is None

    def throttles(reason: str) -> float | None:
        return _value(m, "gpuvisor_device_throttle_events_total", device="gpu-0", reason=reason)

    assert throttles("hw_thermal") == 1  # one episode, not one per sample
    assert throttles("sw_power_cap") == 1
    assert throttles("gpu_idle") is None
    assert _value(m, "gpuvisor_device_xid_errors_total", device="gpu-0", xid="79") == 1

    nvml.gpus[0]["broken"] = True
    sample = sampler.sample(targets)
    sampler.publish(sample, targets)
    assert not sample.devices["gpu-0"].healthy
    assert "GPU is lost" in sample.devices["gpu-0"].problem
    assert _value(m, "gpuvisor_device_healthy", device="gpu-0") == 0
    sampler.close()
    assert nvml.shut_down


@pytest.mark.skipif(_real_nvml() is not None, reason="a GPU is present: the real NVML test runs")
def test_gpus_read_as_unhealthy_when_nvml_cannot_start() -> None:
    class NoDriver(StandInNvml):
        def nvmlInit(self) -> None:
            raise self.NVMLError("Driver Not Loaded")

    m = Metrics()
    sampler = TelemetrySampler(m, [GPU, CPU], list, nvml=NoDriver([]))
    sample = sampler.sample([])
    assert not sample.devices["gpu-0"].healthy
    assert sample.devices["cpu-0"].healthy


@pytest.mark.gpu
def test_real_gpu_readings() -> None:
    nvml = _real_nvml()
    if nvml is None:
        pytest.skip("no NVIDIA GPU visible to NVML")
    from gpuvisor.inventory.nvml import discover_nvml

    gpus, _ = discover_nvml()
    reader = NvmlReader(nvml, gpus)
    try:
        reading, _ = reader.read(gpus[0])
        assert reading.healthy, reading.problem
        assert reading.memory_used is not None and 0 < reading.memory_used <= gpus[0].memory_total
        assert reading.utilization is not None and 0 <= reading.utilization <= 1
        assert reading.temperature is None or 0 < reading.temperature < 120
    finally:
        reader.close()


def test_what_a_driver_or_privileges_do_not_offer_leaves_a_gpu_healthy() -> None:
    """An R525 driver (no clock event reasons), a MIG GPU read without privileges (no
    memory, no process list), a pynvml newer than the driver: values are missing, the GPU is
    not failed, and its slices do not move."""
    nvml = StandInNvml(
        [
            _gpu(old_driver=True, reasons=0x40),
            _gpu(memory_refused=True, processes_refused="permission"),
            _gpu(processes_refused="mismatch"),
        ]
    )
    gpus = [replace(GPU, id=f"gpu-{i}", index=i) for i in range(3)]
    reader = NvmlReader(nvml, gpus)
    old_driver, mig, mismatch = (reader.read(gpu) for gpu in gpus)
    assert old_driver[0].healthy and old_driver[0].throttle == {"hw_thermal"}
    assert mig[0].healthy and mig[0].memory_used is None and mig[1] == {}
    assert mig[0].utilization == pytest.approx(0.37)
    assert mismatch[0].healthy and mismatch[1] == {}


def test_xid_events_survive_a_lost_gpu_and_a_gpu_that_does_not_offer_them() -> None:
    """gpu-1 does not register for events: gpu-0 is still watched. gpu-0 then falls off the
    bus (Xid 79): NVML cannot tell its UUID any more, and the event is still its."""
    nvml = StandInNvml([_gpu(), _gpu(no_events=True)])
    gpus = [replace(GPU, id=f"gpu-{i}", index=i) for i in range(2)]
    reader = NvmlReader(nvml, gpus)
    assert nvml.registered == [0] and reader.events is not None
    nvml.gpus[0]["lost"] = True
    nvml.events.append(SimpleNamespace(device=0, eventData=79))
    assert reader.xid_events() == {"gpu-0": [79]}
