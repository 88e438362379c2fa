"""NVML discovery against a fake ``pynvml`` (no GPU here) and, where one exists, the real one."""

from __future__ import annotations

import ctypes
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pynvml
import pytest

from gpuvisor.inventory.nvml import discover_nvml, sysfs_bus_id

NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED


def nvml_error(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)


@dataclass
class FakeGpu:
    """What the fake NVML reports for one GPU; an int in a field means 'raise that NVML error'."""

    name: str | int = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-11111111-2222-3333-4444-555555555555"
    memory_total: int = 81559 * 2**20
    memory_error: int | None = None  # e.g. NO_PERMISSION: a MIG GPU read without privileges
    bus_id: str | int = "00000000:3B:00.0"
    numa: int = 0
    mig_current: int | None = 0  # None: NOT_SUPPORTED
    sm_attribute: int | None = 132  # None: NOT_SUPPORTED
    cores: int | None = None
    compute_capability: tuple[int, int] = (9, 0)


@dataclass
class FakeNvml:
    """A stand-in for the ``pynvml`` module with the real module's error classes and constants."""

    gpus: list[FakeGpu] = field(default_factory=list)
    init_error: int | None = None
    count_error: int | None = None
    numa_api: bool = True
    calls: list[str] = field(default_factory=list)

    def module(self) -> types.ModuleType:
        module = types.ModuleType("pynvml")
        for name in dir(pynvml):
            if name.startswith(("NVML_", "NVMLError")):
                setattr(module, name, getattr(pynvml, name))
        for name in dir(self):
            if name.startswith("nvml") and (self.numa_api or name != "nvmlDeviceGetNumaNodeId"):
                setattr(module, name, getattr(self, name))
        return module

    def _gpu(self, handle: int) -> FakeGpu:
        return self.gpus[handle]

    def nvmlInit(self) -> None:
        self.calls.append("init")
        if self.init_error is not None:
            raise nvml_error(self.init_error)

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlDeviceGetCount(self) -> int:
        if self.count_error is not None:
            raise nvml_error(self.count_error)
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:
        name = self._gpu(handle).name
        if isinstance(name, int):
            raise nvml_error(name)
        return name

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return self._gpu(handle).uuid

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        if self._gpu(handle).memory_error is not None:
            raise nvml_error(self._gpu(handle).memory_error)  # type: ignore[arg-type]
        return types.SimpleNamespace(total=self._gpu(handle).memory_total, free=0, used=0)

    def nvmlDeviceGetPciInfo(self, handle: int) -> Any:
        bus_id = self._gpu(handle).bus_id
        if isinstance(bus_id, int):
            raise nvml_error(bus_id)
        return types.SimpleNamespace(busId=bus_id.encode())  # ctypes char arrays are bytes

    def nvmlDeviceGetNumaNodeId(self, handle: int) -> int:
        return self._gpu(handle).numa

    def nvmlDeviceGetMigMode(self, handle: int) -> list[int]:
        current = self._gpu(handle).mig_current
        if current is None:
            raise nvml_error(NOT_SUPPORTED)
        return [current, current]

    def nvmlDeviceGetAttributes(self, handle: int) -> Any:
        count = self._gpu(handle).sm_attribute
        if count is None:
            raise nvml_error(NOT_SUPPORTED)
        return types.SimpleNamespace(multiprocessorCount=count)

    def nvmlDeviceGetNumGpuCores(self, handle: int) -> int:
        cores = self._gpu(handle).cores
        if cores is None:
            raise nvml_error(NOT_SUPPORTED)
        return cores

    def nvmlDeviceGetCudaComputeCapability(self, handle: int) -> tuple[int, int]:
        return self._gpu(handle).compute_capability


@pytest.fixture
def install(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def install_fake(fake: FakeNvml) -> FakeNvml:
        monkeypatch.setitem(sys.modules, "pynvml", fake.module())
        return fake

    return install_fake


def test_two_gpus_are_described_from_nvml(install: Any) -> None:
    fake = install(
        FakeNvml(
            gpus=[
                FakeGpu(),
                FakeGpu(
                    name="NVIDIA A100-SXM4-40GB",
                    uuid="GPU-aaaa",
                    memory_total=40 * 2**30,
                    bus_id="00000001:AF:00.0",
                    numa=1,
                    mig_current=pynvml.NVML_DEVICE_MIG_ENABLE,
                    sm_attribute=108,
                ),
            ]
        )
    )
    devices, reason = discover_nvml()
    assert reason is None
    assert fake.calls == ["init", "shutdown"]
    first, second = devices
    assert first.to_dict() == {
        "id": "gpu-0",
        "kind": "gpu",
        "backend": "nvml",
        "model": "H100-80GB",
        "memory_total": 81559 * 2**20,
        "uuid": "GPU-11111111-2222-3333-4444-555555555555",
        "sm_count": 132,
        "numa_node": 0,
        "pci_bus_id": "0000:3b:00.0",
        "mig_mode": False,
        "threads": None,
        "concurrency": 1,
        "quantum": 0.002,
        "lookahead": 0.001,
        "node": "local",
        "healthy": True,
        "index": 0,
        "mig_instances": (),
        "cordoned": False,
        "health_reason": "",
    }
    assert (second.id, second.model, second.index) == ("gpu-1", "A100-40GB", 1)
    assert (second.numa_node, second.pci_bus_id, second.mig_mode) == (1, "0001:af:00.0", True)


def test_an_uncatalogued_gpu_keeps_the_name_nvml_reports(install: Any) -> None:
    install(FakeNvml(gpus=[FakeGpu(name="NVIDIA GeForce RTX 4090", sm_attribute=128)]))
    devices, _ = discover_nvml()
    assert (devices[0].model, devices[0].sm_count) == ("NVIDIA GeForce RTX 4090", 128)


@pytest.mark.parametrize(
    ("gpu", "sm_count"),
    [
        (FakeGpu(sm_attribute=None, cores=16896, compute_capability=(9, 0)), 132),  # H100 SXM
        (FakeGpu(sm_attribute=None, cores=6912, compute_capability=(8, 0)), 108),  # A100
        (FakeGpu(sm_attribute=None, cores=7424, compute_capability=(8, 9)), 58),  # L4
        (FakeGpu(sm_attribute=None, cores=2560, compute_capability=(7, 5)), 40),  # T4
        (FakeGpu(sm_attribute=None, cores=None), 132),  # the catalogue knows the H100
        (FakeGpu(name="NVIDIA Mystery", sm_attribute=None, cores=None), None),
    ],
)
def test_sm_count_falls_back_to_cores_then_catalogue(
    install: Any, gpu: FakeGpu, sm_count: int | None
) -> None:
    install(FakeNvml(gpus=[gpu]))
    devices, _ = discover_nvml()
    assert devices[0].sm_count == sm_count


@pytest.mark.parametrize(("sysfs_value", "numa_node"), [("1\n", 1), ("-1\n", None), (None, None)])
def test_numa_node_falls_back_to_sysfs(
    install: Any, tmp_path: Path, sysfs_value: str | None, numa_node: int | None
) -> None:
    install(FakeNvml(gpus=[FakeGpu(bus_id="00000000:3B:00.0")], numa_api=False))
    if sysfs_value is not None:
        device_dir = tmp_path / "bus/pci/devices/0000:3b:00.0"
        device_dir.mkdir(parents=True)
        (device_dir / "numa_node").write_text(sysfs_value)
    devices, _ = discover_nvml(sysfs_root=tmp_path)
    assert devices[0].numa_node == numa_node


def test_no_pci_info_means_no_bus_id_and_no_sysfs_numa(install: Any, tmp_path: Path) -> None:
    install(FakeNvml(gpus=[FakeGpu(bus_id=NOT_SUPPORTED)], numa_api=False))
    devices, _ = discover_nvml(sysfs_root=tmp_path)
    assert (devices[0].pci_bus_id, devices[0].numa_node) == (None, None)


def test_mig_not_supported_means_mig_off(install: Any) -> None:
    install(FakeNvml(gpus=[FakeGpu(name="NVIDIA L4", mig_current=None)]))
    devices, _ = discover_nvml()
    assert (devices[0].model, devices[0].mig_mode) == ("L4", False)


def test_a_gpu_whose_memory_nvml_will_not_tell_keeps_what_it_does_tell(install: Any) -> None:
    """A MIG-enabled GPU answers NO_PERMISSION for its memory to a caller without privileges
    (a container): it is still the H100 with its UUID, with its nominal memory."""
    install(FakeNvml(gpus=[FakeGpu(memory_error=pynvml.NVML_ERROR_NO_PERMISSION)]))
    [device], _ = discover_nvml()
    assert (device.healthy, device.model, device.uuid) == (
        True,
        "H100-80GB",
        "GPU-11111111-2222-3333-4444-555555555555",
    )
    assert device.memory_total == 80 * 2**30  # the catalogue's nominal 80 GB


def test_a_lost_gpu_is_listed_unhealthy_next_to_working_ones(install: Any) -> None:
    fake = install(FakeNvml(gpus=[FakeGpu(name=pynvml.NVML_ERROR_GPU_IS_LOST), FakeGpu()]))
    devices, reason = discover_nvml()
    assert reason is None
    assert [(d.id, d.healthy, d.index) for d in devices] == [
        ("gpu-0", False, 0),
        ("gpu-1", True, 1),
    ]
    assert fake.calls == ["init", "shutdown"]


@pytest.mark.parametrize(
    ("init_error", "reason"),
    [
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "NVML library not found"),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "NVIDIA driver not loaded"),
        (pynvml.NVML_ERROR_NO_PERMISSION, "no permission to use NVML"),
        (pynvml.NVML_ERROR_UNKNOWN, "NVML initialisation failed: Unknown Error"),
    ],
)
def test_init_failures_become_reasons(install: Any, init_error: int, reason: str) -> None:
    fake = install(FakeNvml(init_error=init_error))
    assert discover_nvml() == ([], reason)
    assert fake.calls == ["init"]  # nothing to shut down


def test_no_gpus_is_a_reason_and_nvml_is_shut_down(install: Any) -> None:
    fake = install(FakeNvml(gpus=[]))
    assert discover_nvml() == ([], "NVML reports no GPUs")
    assert fake.calls == ["init", "shutdown"]


def test_a_failing_device_count_still_shuts_nvml_down(install: Any) -> None:
    fake = install(FakeNvml(count_error=pynvml.NVML_ERROR_UNKNOWN))
    assert discover_nvml() == ([], "NVML could not list GPUs: Unknown Error")
    assert fake.calls == ["init", "shutdown"]


def _three_gpus() -> FakeNvml:
    return FakeNvml(
        gpus=[
            FakeGpu(uuid="GPU-aaaa0000-0000"),
            FakeGpu(uuid="GPU-bbbb0000-0000", bus_id="00000000:5E:00.0"),
            FakeGpu(uuid="GPU-bbbc0000-0000", bus_id="00000000:86:00.0"),
        ]
    )


@pytest.mark.parametrize(
    ("setting", "ids"),
    [
        ("2", ["gpu-2"]),
        ("2,0", ["gpu-2", "gpu-0"]),  # CUDA's order, not NVML's
        (" 1 , GPU-aaaa ", ["gpu-1", "gpu-0"]),  # a unique UUID prefix names its GPU
        ("gpu-bbbc0000-0000", ["gpu-2"]),
        ("0,0,1", ["gpu-0", "gpu-1"]),  # named twice, counted once
        ("1,7,0", ["gpu-1"]),  # the list ends at the first entry that names no GPU
        ("0,GPU-bbb,2", ["gpu-0"]),  # ... or names several
    ],
)
def test_cuda_visible_devices_keeps_the_node_on_the_gpus_it_names(
    install: Any, monkeypatch: pytest.MonkeyPatch, setting: str, ids: list[str]
) -> None:
    install(_three_gpus())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", setting)
    devices, reason = discover_nvml()
    assert reason is None
    assert [d.id for d in devices] == ids
    # the ids stay NVML's (nvidia-smi's) numbers, whatever the order CUDA would give
    assert [d.index for d in devices] == [int(i.split("-")[1]) for i in ids]


@pytest.mark.parametrize("setting", ["", "-1", "7", "NoDevFiles"])
def test_cuda_visible_devices_that_hides_every_gpu_is_the_reason_for_none(
    install: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, setting: str
) -> None:
    install(_three_gpus())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", setting)
    with caplog.at_level("WARNING", logger="gpuvisor.inventory"):
        assert discover_nvml() == ([], f"CUDA_VISIBLE_DEVICES={setting!r} hides every GPU")
    # hiding them on purpose ("" or -1) is not worth a warning; a typo is
    warned = [r.getMessage() for r in caplog.records]
    if setting in ("", "-1"):
        assert warned == []
    else:
        assert len(warned) == 1 and f"entry {setting!r} names no GPU NVML reports" in warned[0]


def test_missing_pynvml_is_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    assert discover_nvml() == ([], "nvidia-ml-py (pynvml) is not installed")


def _nvml_library_present() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def test_real_pynvml_on_this_machine() -> None:
    devices, reason = discover_nvml()
    if not _nvml_library_present():
        assert (devices, reason) == ([], "NVML library not found")
        return
    # A GPU machine: the real NVML path must describe every GPU.
    assert reason is None or reason == "NVML reports no GPUs"
    for index, device in enumerate(devices):
        assert device.id == f"gpu-{index}"
        assert device.uuid.startswith(("GPU-", "MIG-"))
        assert device.memory_total > 0
        assert device.sm_count is None or device.sm_count > 0


@pytest.mark.parametrize(
    ("nvml_form", "sysfs_form"),
    [
        ("00000000:3B:00.0", "0000:3b:00.0"),
        ("00000001:AF:00.0", "0001:af:00.0"),
        ("0000:3b:00.0", "0000:3b:00.0"),
        ("  00000000:C1:00.0 ", "0000:c1:00.0"),
    ],
)
def test_sysfs_bus_id(nvml_form: str, sysfs_form: str) -> None:
    assert sysfs_bus_id(nvml_form) == sysfs_form
