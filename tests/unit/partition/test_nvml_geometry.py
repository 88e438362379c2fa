"""MIG geometry read from the driver: a fake NVML here, the real one where a MIG GPU exists."""

from __future__ import annotations

import ctypes
import sys
import types
from typing import Any

import pynvml
import pytest

from gpuvisor.inventory.nvml import discover_nvml
from gpuvisor.partition.mig import GEOMETRIES, geometry_for
from gpuvisor.partition.nvml_geometry import read_geometry

# What an H100 80GB driver reports: NVML profile enum -> (id, slices, count, MiB, name, starts, size)
H100_PROFILES = {
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE: (19, 1, 7, 9856, "MIG 1g.10gb", range(7), 1),
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1: (20, 1, 1, 9856, "MIG 1g.10gb+me", range(7), 1),
    pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2: (
        15,
        1,
        4,
        20096,
        "MIG 1g.20gb",
        (0, 2, 4, 6),
        2,
    ),
    pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE: (14, 2, 3, 20096, "MIG 2g.20gb", (0, 2, 4), 2),
    pynvml.NVML_GPU_INSTANCE_PROFILE_3_SLICE: (9, 3, 2, 40448, "MIG 3g.40gb", (0, 4), 4),
    pynvml.NVML_GPU_INSTANCE_PROFILE_4_SLICE: (5, 4, 1, 40448, "MIG 4g.40gb", (0,), 4),
    pynvml.NVML_GPU_INSTANCE_PROFILE_7_SLICE: (0, 7, 1, 81152, "MIG 7g.80gb", (0,), 8),
}


class FakeMigNvml:
    """Profile info and possible placements the way pynvml returns them (ctypes out-params)."""

    NVMLError = pynvml.NVMLError

    def __init__(self, names: bool = True) -> None:
        self.names = names
        for name in dir(pynvml):
            if name.startswith("NVML_"):
                setattr(self, name, getattr(pynvml, name))

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any:
        return types.SimpleNamespace(total=81559 * 2**20)

    def nvmlDeviceGetGpuInstanceProfileInfo(self, handle: Any, profile: int) -> Any:
        if profile not in H100_PROFILES:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        pid, slices, count, mib, name, _, _ = H100_PROFILES[profile]
        return types.SimpleNamespace(
            id=pid,
            sliceCount=slices,
            instanceCount=count,
            memorySizeMB=mib,
            name=name.encode() if self.names else b"",
        )

    def nvmlDeviceGetGpuInstancePossiblePlacements(
        self, handle: Any, profile_id: int, array: Any, count: Any
    ) -> int:
        spec = next(v for v in H100_PROFILES.values() if v[0] == profile_id)
        starts, size = list(spec[5]), spec[6]
        for i, start in enumerate(starts):
            array[i].start, array[i].size = start, size
        ctypes.cast(count, ctypes.POINTER(ctypes.c_uint)).contents.value = len(starts)
        return 0


@pytest.mark.parametrize("names", [True, False])
def test_the_driver_geometry_of_an_h100_equals_the_tables(names: bool) -> None:
    geometry = read_geometry(FakeMigNvml(names), handle=0, model="H100-80GB")
    assert geometry is not None and geometry.source == "nvml"
    table = GEOMETRIES["H100-80GB"]
    assert (geometry.memory_slices, geometry.compute_slices) == (8, 7)
    assert geometry.profiles == table.profiles


def test_names_rebuilt_from_memory_round_half_up_as_nvidia_names_them() -> None:
    """An H200 (141 GB) driver that leaves names out: 4/8 of 141 GB is 70.5, which NVIDIA
    names 3g.71gb and 4g.71gb (Python's round() would say 70, to the even number)."""
    import gpuvisor.partition.nvml_geometry as geometry_module

    info = types.SimpleNamespace(name=b"", memorySizeMB=70 * 1024, sliceCount=3)  # 4/8
    name = geometry_module._name(FakeMigNvml(), info, 0, 143771 * 2**20)
    assert name == "3g.71gb"


def test_no_mig_api_means_no_geometry() -> None:
    assert read_geometry(types.SimpleNamespace(NVMLError=pynvml.NVMLError), 0, "H100-80GB") is None


def test_discovery_of_a_mig_gpu_registers_the_driver_geometry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeMigNvml()
    module = types.ModuleType("pynvml")
    for name in dir(pynvml):
        if name.startswith(("NVML_", "NVMLError")):
            setattr(module, name, getattr(pynvml, name))
    calls = {
        "nvmlInit": lambda: None,
        "nvmlShutdown": lambda: None,
        "nvmlDeviceGetCount": lambda: 1,
        "nvmlDeviceGetHandleByIndex": lambda i: i,
        "nvmlDeviceGetName": lambda h: "NVIDIA H100 80GB HBM3",
        "nvmlDeviceGetUUID": lambda h: "GPU-11111111-2222-3333-4444-555555555555",
        "nvmlDeviceGetMemoryInfo": fake.nvmlDeviceGetMemoryInfo,
        "nvmlDeviceGetPciInfo": lambda h: types.SimpleNamespace(busId=b"00000000:3B:00.0"),
        "nvmlDeviceGetMigMode": lambda h: [1, 1],
        "nvmlDeviceGetAttributes": lambda h: types.SimpleNamespace(multiprocessorCount=132),
        "nvmlDeviceGetGpuInstanceProfileInfo": fake.nvmlDeviceGetGpuInstanceProfileInfo,
        "nvmlDeviceGetGpuInstancePossiblePlacements": fake.nvmlDeviceGetGpuInstancePossiblePlacements,
    }
    for name, fn in calls.items():
        setattr(module, name, fn)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    devices, reason = discover_nvml()
    assert reason is None and devices[0].mig_mode
    geometry = geometry_for("H100-80GB")
    assert geometry is not None and geometry.source == "nvml"


@pytest.mark.gpu
def test_the_real_driver_agrees_with_the_tables() -> None:
    """On a MIG-enabled GPU of a catalogued model, the driver's profiles match the tables'."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pytest.skip("no NVIDIA driver")
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            try:
                if pynvml.nvmlDeviceGetMigMode(handle)[0] != pynvml.NVML_DEVICE_MIG_ENABLE:
                    continue
            except pynvml.NVMLError:
                continue
            from gpuvisor.inventory.simulated import match_nvml_name

            name = pynvml.nvmlDeviceGetName(handle)
            model = match_nvml_name(name.decode() if isinstance(name, bytes) else name)
            if model is None or model.name not in GEOMETRIES:
                continue
            geometry = read_geometry(pynvml, handle, model.name)
            assert geometry is not None
            table = {(p.name, p.memory_slices, p.starts) for p in GEOMETRIES[model.name].profiles}
            driver = {(p.name, p.memory_slices, p.starts) for p in geometry.profiles}
            assert table <= driver, driver - table
            return
    finally:
        pynvml.nvmlShutdown()
    pytest.skip("no MIG-enabled GPU of a catalogued model")
