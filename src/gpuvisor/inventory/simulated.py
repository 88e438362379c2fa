"""Simulated GPUs described by a Fleet document, and the catalogue of GPU models they come from."""

from __future__ import annotations

import difflib
import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpuvisor.errors import SpecError
from gpuvisor.inventory.device import Device
from gpuvisor.partition.mig import MigInstance, check_layout, geometry_for

if TYPE_CHECKING:
    from gpuvisor.spec.fleet_nodes import MigInstanceSpec
    from gpuvisor.spec.kinds import Fleet

__all__ = ["GPU_CATALOGUE", "GpuModel", "devices_from_fleet", "lookup_gpu_model", "match_nvml_name"]

_GIB = 2**30


@dataclass(frozen=True)
class GpuModel:
    """A GPU product: nominal memory (bytes), streaming multiprocessors, MIG support.

    ``nvml_pattern`` recognises the product in the name NVML reports (``NVIDIA H100 80GB HBM3``).
    Memory is the nominal capacity; a real device reports slightly less to NVML.
    """

    name: str
    memory: int
    sm_count: int
    mig_capable: bool
    nvml_pattern: str


GPU_CATALOGUE: dict[str, GpuModel] = {
    m.name: m
    for m in (
        GpuModel("H100-80GB", 80 * _GIB, 132, True, r"H100 (80GB HBM3|SXM)"),
        GpuModel("H100-94GB", 94 * _GIB, 132, True, r"H100 NVL"),
        GpuModel("H200-141GB", 141 * _GIB, 132, True, r"H200"),
        GpuModel("A100-40GB", 40 * _GIB, 108, True, r"A100.*40GB"),
        GpuModel("A100-80GB", 80 * _GIB, 108, True, r"A100.*80GB"),
        GpuModel("L4", 24 * _GIB, 58, False, r"\bL4$"),
        GpuModel("T4", 16 * _GIB, 40, False, r"\bT4$"),
        GpuModel("L40S", 48 * _GIB, 142, False, r"\bL40S$"),
    )
}


def lookup_gpu_model(name: str) -> GpuModel | None:
    """Return the catalogue entry for ``name`` (case-insensitive), or None."""
    wanted = name.strip().lower()
    for model in GPU_CATALOGUE.values():
        if model.name.lower() == wanted:
            return model
    return None


def match_nvml_name(nvml_name: str) -> GpuModel | None:
    """Return the catalogue entry whose pattern matches a name NVML reports, or None."""
    for model in GPU_CATALOGUE.values():
        if re.search(model.nvml_pattern, nvml_name.strip()):
            return model
    return None


def _unknown_model_message(name: str) -> str:
    known = ", ".join(GPU_CATALOGUE)
    close = difflib.get_close_matches(name, list(GPU_CATALOGUE), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown GPU model '{name}'{hint}; known models: {known}"


def _simulated_uuid(fleet_name: str, device_id: str) -> str:
    # Stable across runs so that placements recorded against a simulated device survive restarts.
    return f"GPU-{uuid.uuid5(uuid.NAMESPACE_URL, f'gpuvisor-sim:{fleet_name}/{device_id}')}"


def _mig_layout(
    model: str, instances: list[MigInstanceSpec], path: str, problems: list[dict[str, str]]
) -> tuple[MigInstance, ...]:
    """Return a group's declared MIG instances, adding a problem for each invalid one."""
    if not instances:
        return ()
    geometry = geometry_for(model)
    if geometry is None:
        problems.append({"path": path, "message": f"{model} has no MIG geometry"})
        return ()
    layout = [MigInstance(i.start, i.profile) for i in instances]
    found = check_layout(geometry, layout)
    for problem in found:
        where = f"{path}[{problem.index}]" + (f".{problem.field}" if problem.field else "")
        problems.append({"path": where, "message": problem.message})
    if found:
        return ()
    names = {name.lower(): name for name in geometry.profile_names}
    return tuple(sorted(MigInstance(i.start, names[i.profile.strip().lower()]) for i in layout))


def devices_from_fleet(fleet: Fleet) -> list[Device]:
    """Return the simulated GPUs a Fleet describes, ids ``<node>/gpu-<i>`` numbered per node.

    Raises SpecError listing every problem (one per line): an unknown model (naming the known
    ones), MIG enabled on a model without MIG, or declared MIG instances that break the model's
    geometry (unknown profile, invalid start, overlap, too many of a profile). NUMA ranges and unique node names are the
    Fleet model's own validation.
    """
    fleet_name = fleet.metadata.name
    devices: list[Device] = []
    problems: list[dict[str, str]] = []
    for n, node in enumerate(fleet.spec.nodes):
        index = 0
        for g, group in enumerate(node.devices):
            path = f"spec.nodes[{n}].devices[{g}]"
            model = lookup_gpu_model(group.model)
            if model is None:
                problems.append(
                    {"path": f"{path}.model", "message": _unknown_model_message(group.model)}
                )
                continue
            if group.mig.enabled and not model.mig_capable:
                problems.append(
                    {"path": f"{path}.mig.enabled", "message": f"{model.name} does not support MIG"}
                )
            layout = _mig_layout(model.name, group.mig.instances, f"{path}.mig.instances", problems)
            for _ in range(group.count):
                device_id = f"{node.name}/gpu-{index}"
                devices.append(
                    Device(
                        id=device_id,
                        kind="gpu",
                        backend="simulated",
                        model=model.name,
                        memory_total=model.memory,
                        uuid=_simulated_uuid(fleet_name, device_id),
                        sm_count=model.sm_count,
                        numa_node=group.numa,
                        mig_mode=group.mig.enabled,
                        node=node.name,
                        index=index,
                        mig_instances=layout,
                    )
                )
                index += 1
    if problems:
        # Same line format as the spec loader: "<file> doc <n> Fleet/<name>: <path>: <message>".
        origin = getattr(fleet, "_origin", "")
        where = f"{origin} Fleet/{fleet_name}" if origin else f"Fleet/{fleet_name}"
        lines = [f"{where}: {p['path']}: {p['message']}" for p in problems]
        raise SpecError(
            "\n".join(lines),
            problems=[
                {"source": origin, "kind": "Fleet", "name": fleet_name, **p} for p in problems
            ],
        )
    return devices
