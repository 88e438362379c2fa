"""A fleet plan as data: per GPU layout and slices, pending replicas, utilisation, fragmentation."""

from __future__ import annotations

from typing import Any

from gpuvisor.partition.fleet import FleetPlan, GpuPlan, Holder
from gpuvisor.partition.mig import occupied_slices

__all__ = ["plan_summary", "plan_to_dict"]


def _holder(holder: Holder | None) -> dict[str, Any]:
    if holder is None:
        return {"deployment": None, "tenant": None, "replica": None}
    return {
        "deployment": holder.workload.deployment,
        "tenant": holder.workload.tenant,
        "replica": holder.replica,
    }


def _gpu(plan: FleetPlan, gpu: GpuPlan) -> dict[str, Any]:
    geometry = gpu.geometry
    instances = []
    for instance in gpu.instances:
        profile = geometry.profile(instance.profile) if geometry else None
        instances.append(
            {
                "profile": instance.profile,
                "start": instance.start,
                "size": profile.memory_slices if profile else None,
                **_holder(gpu.holders.get(instance.start)),
                "new": instance.start in gpu.added,
            }
        )
    slices = [
        {
            **_holder(h),
            "isolation": h.workload.isolation,
            "memory": h.workload.memory,
            "computeShare": h.workload.compute_share,
        }
        for h in gpu.slices
    ]
    used = bin(occupied_slices(geometry, gpu.instances)).count("1") if geometry else 0
    return {
        "node": gpu.device.node,
        "id": gpu.device.id,
        "model": gpu.device.model,
        "mig": gpu.device.mig_mode,
        "instances": instances,
        "slices": slices,
        "memorySlicesUsed": used if geometry else None,
        "memorySlices": geometry.memory_slices if geometry else None,
        "unusableSlices": plan.unusable(gpu),
        "memoryUsed": gpu.memory_used,
        "memoryTotal": gpu.device.memory_total,
    }


def plan_summary(plan: FleetPlan) -> dict[str, Any]:
    """Return fleet totals: GPUs used, MIG memory slices and instances in use, whole-GPU memory
    in use, and fragmentation (free MIG slices no requested profile can use)."""
    mig = [g for g in plan.gpus if g.geometry is not None]
    whole = [g for g in plan.gpus if g.geometry is None]
    slices_total = sum(g.geometry.memory_slices for g in mig if g.geometry)
    slices_used = sum(
        bin(occupied_slices(g.geometry, g.instances)).count("1") for g in mig if g.geometry
    )
    unusable = sum(len(plan.unusable(g)) for g in mig)
    free = slices_total - slices_used
    memory_total = sum(g.device.memory_total for g in whole)
    memory_used = sum(g.memory_used for g in whole)
    return {
        "gpus": len(plan.gpus),
        "gpusUsed": sum(1 for g in plan.gpus if g.holders or g.slices),
        "migGpus": len(mig),
        "instances": sum(len(g.instances) for g in mig),
        "instancesHoldingSlices": sum(len(g.holders) for g in mig),
        "instancesAdded": sum(len(g.added) for g in mig),
        "migSlicesUsed": slices_used,
        "migSlices": slices_total,
        "migSliceUtilisation": round(slices_used / slices_total, 4) if slices_total else None,
        "freeMigSlices": free,
        "unusableMigSlices": unusable,
        "fragmentation": round(unusable / free, 4) if free else 0.0,
        "wholeGpuMemoryUsed": memory_used,
        "wholeGpuMemory": memory_total,
        "wholeGpuUtilisation": round(memory_used / memory_total, 4) if memory_total else None,
        "slicesPlaced": sum(len(g.holders) + len(g.slices) for g in plan.gpus),
        "slicesPending": sum(p.replicas for p in plan.pending),
    }


def plan_to_dict(plan: FleetPlan) -> dict[str, Any]:
    """Return the plan as ``gpuvisor plan --output json`` prints it.

    ``{"gpus": [{"node", "id", "model", "instances": [{"profile", "start", "size",
    "deployment", "tenant", ...}], ...}], "pending": [{"deployment", "tenant", "reasons"}],
    "summary": {...}}``, starts and sizes in memory slices.
    """
    return {
        "gpus": [_gpu(plan, gpu) for gpu in plan.gpus],
        "pending": [
            {
                "deployment": p.workload.deployment,
                "tenant": p.workload.tenant,
                "replicas": p.replicas,
                "reasons": list(p.reasons),
                "defrag": p.defrag or None,
            }
            for p in plan.pending
        ],
        "summary": plan_summary(plan),
    }
