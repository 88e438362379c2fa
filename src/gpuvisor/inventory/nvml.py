"""Real NVIDIA GPUs found through NVML (the nvidia-ml-py ``pynvml`` module)."""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any

from gpuvisor.inventory.device import Device
from gpuvisor.inventory.simulated import match_nvml_name
from gpuvisor.partition.mig import use_driver_geometry
from gpuvisor.partition.nvml_geometry import read_geometry

__all__ = ["discover_nvml", "sysfs_bus_id", "visible_gpus"]

logger = logging.getLogger("gpuvisor.inventory")

# CUDA cores per streaming multiprocessor by compute capability major version, used to derive
# the SM count when NVML cannot report device attributes (it only does on some drivers/devices).
_CORES_PER_SM = {6: 64, 7: 64, 8: 64, 9: 128, 10: 128, 12: 128}
# Compute capabilities whose SMs differ from their major version's default.
_CORES_PER_SM_EXACT = {(6, 1): 128, (8, 6): 128, (8, 7): 128, (8, 9): 128}


def sysfs_bus_id(nvml_bus_id: str) -> str:
    """Return NVML's bus id (``00000000:3B:00.0``) in the sysfs form (``0000:3b:00.0``)."""
    domain, _, rest = nvml_bus_id.strip().partition(":")
    if not rest:
        return nvml_bus_id.strip().lower()
    return f"{int(domain, 16):04x}:{rest.lower()}"


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _reason_for(nvml: Any, error: Exception) -> str:
    code = getattr(error, "value", None)
    if code == nvml.NVML_ERROR_LIBRARY_NOT_FOUND:
        return "NVML library not found"
    if code == nvml.NVML_ERROR_DRIVER_NOT_LOADED:
        return "NVIDIA driver not loaded"
    if code == nvml.NVML_ERROR_NO_PERMISSION:
        return "no permission to use NVML"
    return f"NVML initialisation failed: {error}"


def _sm_count(nvml: Any, handle: Any, nvml_name: str) -> int | None:
    try:
        count = int(nvml.nvmlDeviceGetAttributes(handle).multiprocessorCount)
        if count > 0:
            return count
    except (nvml.NVMLError, AttributeError):
        pass
    try:
        cores = int(nvml.nvmlDeviceGetNumGpuCores(handle))
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
        per_sm = _CORES_PER_SM_EXACT.get((major, minor), _CORES_PER_SM.get(major))
        if per_sm and cores > 0:
            return cores // per_sm
    except (nvml.NVMLError, AttributeError):
        pass
    catalogued = match_nvml_name(nvml_name)
    return catalogued.sm_count if catalogued else None


def _numa_node(nvml: Any, handle: Any, bus_id: str | None, sysfs_root: Path) -> int | None:
    if hasattr(nvml, "nvmlDeviceGetNumaNodeId"):
        try:
            node = int(nvml.nvmlDeviceGetNumaNodeId(handle))
            return node if node >= 0 else None
        except nvml.NVMLError:
            pass
    if bus_id is None:
        return None
    try:
        node = int((sysfs_root / "bus/pci/devices" / bus_id / "numa_node").read_text().strip())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


def _describe_gpu(nvml: Any, index: int, sysfs_root: Path) -> Device:
    """Return one GPU's device; a GPU NVML cannot describe comes back unhealthy."""
    device_id = f"gpu-{index}"
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        nvml_name = _text(nvml.nvmlDeviceGetName(handle))
        gpu_uuid = _text(nvml.nvmlDeviceGetUUID(handle))
    except nvml.NVMLError as error:
        logger.warning(
            "GPU %d cannot be described by NVML (%s); marking %s unhealthy", index, error, device_id
        )
        return Device(device_id, "gpu", "nvml", "unknown", 0, healthy=False, index=index)
    try:
        memory_total = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
    except nvml.NVMLError as error:
        # A MIG-enabled GPU answers NO_PERMISSION to a caller without privileges (a
        # container, say): its product's nominal memory stands in
        known = match_nvml_name(nvml_name)
        memory_total = known.memory if known is not None else 0
        logger.warning(
            "NVML does not tell the memory of GPU %d (%s): %s",
            index,
            error,
            f"taking the {known.name}'s nominal {memory_total} bytes"
            if known is not None
            else "it counts as 0 bytes, so nothing is placed on it",
        )
    bus_id: str | None
    try:
        bus_id = sysfs_bus_id(_text(nvml.nvmlDeviceGetPciInfo(handle).busId))
    except nvml.NVMLError:
        bus_id = None
    try:
        mig_mode = nvml.nvmlDeviceGetMigMode(handle)[0] == nvml.NVML_DEVICE_MIG_ENABLE
    except nvml.NVMLError:
        mig_mode = False  # NOT_SUPPORTED on GPUs without MIG
    catalogued = match_nvml_name(nvml_name)
    if mig_mode:  # the driver's MIG profiles and placements win over the built-in tables
        geometry = read_geometry(nvml, handle, catalogued.name if catalogued else nvml_name)
        if geometry is not None:
            use_driver_geometry(geometry)
    return Device(
        id=device_id,
        kind="gpu",
        backend="nvml",
        # The catalogue name lets one Pool selector match real and simulated GPUs alike.
        model=catalogued.name if catalogued else nvml_name,
        memory_total=memory_total,
        uuid=gpu_uuid,
        sm_count=_sm_count(nvml, handle, nvml_name),
        numa_node=_numa_node(nvml, handle, bus_id, sysfs_root),
        pci_bus_id=bus_id,
        mig_mode=mig_mode,
        index=index,
    )


def visible_gpus(devices: list[Device], setting: str) -> list[Device]:
    """Return the GPUs a ``CUDA_VISIBLE_DEVICES`` value names, in its order.

    Entries are indices as NVML and ``nvidia-smi`` number the GPUs, or UUIDs (``GPU-…``, a
    unique prefix is enough). As CUDA does, the list ends at the first entry that names no
    GPU (``-1``, say, hides every GPU), which is logged; a GPU named twice counts once.
    """
    chosen: list[Device] = []
    for entry in (part.strip() for part in setting.split(",")):
        if entry.isdigit():
            found = [d for d in devices if d.index == int(entry)]
        elif entry.upper().startswith("GPU-"):
            found = [d for d in devices if d.uuid and d.uuid.upper().startswith(entry.upper())]
        else:
            found = []
        if len(found) != 1:
            if entry not in ("", "-1"):  # those two hide the GPUs on purpose
                why = "matches several GPUs" if found else "names no GPU NVML reports"
                logger.warning(
                    "CUDA_VISIBLE_DEVICES=%r: entry %r %s; it and the entries after it are "
                    "ignored, as CUDA ignores them (give nvidia-smi indices or GPU UUIDs)",
                    setting,
                    entry,
                    why,
                )
            break
        if found[0] not in chosen:
            chosen.append(found[0])
    return chosen


def discover_nvml(sysfs_root: Path = Path("/sys")) -> tuple[list[Device], str | None]:
    """Return the GPUs NVML reports (ids ``gpu-<nvml index>``) and, when none, the reason why.

    Where ``CUDA_VISIBLE_DEVICES`` is set, only the GPUs it names (``visible_gpus``): an
    operator sets it to keep a node off some GPUs, and NVML itself ignores it.

    Never raises for a missing library, driver or GPU: the reason says which (e.g. "NVML
    library not found"). NVML is always shut down again before returning.
    """
    try:
        nvml: Any = importlib.import_module("pynvml")
    except ImportError:
        return [], "nvidia-ml-py (pynvml) is not installed"
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as error:
        return [], _reason_for(nvml, error)
    try:
        count = int(nvml.nvmlDeviceGetCount())
        devices = [_describe_gpu(nvml, index, sysfs_root) for index in range(count)]
    except nvml.NVMLError as error:
        return [], f"NVML could not list GPUs: {error}"
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError as error:
            logger.debug("nvmlShutdown failed: %s", error)
    if not devices:
        return [], "NVML reports no GPUs"
    setting = os.environ.get("CUDA_VISIBLE_DEVICES")
    if setting is not None:
        devices = visible_gpus(devices, setting)
        if not devices:
            return [], f"CUDA_VISIBLE_DEVICES={setting!r} hides every GPU"
        logger.info("CUDA_VISIBLE_DEVICES=%r: using %s", setting, ", ".join(d.id for d in devices))
    return devices, None
