"""Read a GPU's MIG geometry from the driver through NVML (profiles and possible placements)."""

from __future__ import annotations

import ctypes
import logging
import math
from typing import Any

from gpuvisor.partition.mig import MigGeometry, MigProfile

__all__ = ["read_geometry"]

logger = logging.getLogger("gpuvisor.partition")

_MAX_PLACEMENTS = 16


class _Placement(ctypes.Structure):
    """NVML's ``nvmlGpuInstancePlacement_t``: a start and a size, in memory slices."""

    _fields_ = (("start", ctypes.c_uint), ("size", ctypes.c_uint))


def _name(nvml: Any, info: Any, enum: int, memory_total: int) -> str:
    raw = getattr(info, "name", b"")
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    text = text.strip().removeprefix("MIG ").strip()
    if text:
        return text
    # Drivers without the v2 profile info leave the name out: rebuild it as NVIDIA's tools do,
    # from the fraction of memory in eighths (rounded up) times the GPU's memory in GB.
    memory = int(info.memorySizeMB) * 2**20
    gib = max(1, round(memory / 2**30))
    if memory_total > 0:
        eighths = math.ceil(memory * 8 / memory_total)
        # half up, as NVIDIA names them (H200: 4/8 of 141 GB is 3g.71gb), not to the even
        gib = math.floor(eighths / 8 * math.ceil(memory_total / 2**30) + 0.5)
    suffix = "+me" if enum == getattr(nvml, "NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1", -1) else ""
    return f"{int(info.sliceCount)}g.{gib}gb{suffix}"


def _placements(nvml: Any, handle: Any, profile_id: int) -> list[tuple[int, int]]:
    array = (_Placement * _MAX_PLACEMENTS)()
    count = ctypes.c_uint(_MAX_PLACEMENTS)
    nvml.nvmlDeviceGetGpuInstancePossiblePlacements(handle, profile_id, array, ctypes.byref(count))
    return [(int(array[i].start), int(array[i].size)) for i in range(count.value)]


def read_geometry(nvml: Any, handle: Any, model: str) -> MigGeometry | None:
    """Return the MIG geometry the driver reports for one GPU, or None when it reports none.

    Asks ``nvmlDeviceGetGpuInstanceProfileInfo`` for every GPU-instance profile NVML knows and
    ``nvmlDeviceGetGpuInstancePossiblePlacements`` for each supported one. Profiles the GPU
    does not support (NVML errors) are skipped; so are profiles with no placement.
    """
    if not hasattr(nvml, "nvmlDeviceGetGpuInstancePossiblePlacements"):
        return None
    try:
        memory_total = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
    except (nvml.NVMLError, AttributeError):
        memory_total = 0
    profiles: list[MigProfile] = []
    memory_slices = 0
    for enum in range(int(getattr(nvml, "NVML_GPU_INSTANCE_PROFILE_COUNT", 0))):
        try:
            info = nvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, enum)
            placements = _placements(nvml, handle, int(info.id))
        except nvml.NVMLError:
            continue
        if not placements or int(info.instanceCount) < 1:
            continue
        size = placements[0][1]
        memory_slices = max(memory_slices, *(start + size for start, _ in placements))
        profiles.append(
            MigProfile(
                name=_name(nvml, info, enum, memory_total),
                profile_id=int(info.id),
                compute_slices=int(info.sliceCount),
                memory_slices=size,
                max_count=int(info.instanceCount),
                starts=tuple(sorted(start for start, _ in placements)),
            )
        )
    if not profiles:
        return None
    profiles.sort(key=lambda p: (p.compute_slices, p.memory_slices, "+" in p.name, p.profile_id))
    compute_slices = max(p.compute_slices for p in profiles)
    logger.info("MIG geometry of %s read from the driver: %d profiles", model, len(profiles))
    return MigGeometry(
        model,
        tuple(profiles),
        memory_slices=memory_slices,
        compute_slices=compute_slices,
        source="nvml",
    )
