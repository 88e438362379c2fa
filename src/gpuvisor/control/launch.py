"""Starting an instance of a replica: its state, what placement is asked and shown, the
message that loads its worker, and its queue with the scheduling settings it carries.

Plain functions of the resources and slices they are given: the controller holds the
state and calls them."""

from __future__ import annotations

import time
from collections.abc import Container, Iterable, Sequence

from gpuvisor.control.desired import DesiredSlice, find_pool, find_tenant
from gpuvisor.control.slices import SliceState
from gpuvisor.dispatch.admission import Admission, TenantLimits
from gpuvisor.dispatch.profiles import ExecutionProfile
from gpuvisor.dispatch.queues import SliceQueue
from gpuvisor.inventory.device import Device, Topology
from gpuvisor.placement.framework import (
    Cycle,
    PlacedSlice,
    PlacementResult,
    PoolPolicy,
    SliceRequest,
    Snapshot,
    TenantQuota,
)
from gpuvisor.runtime import protocol as p
from gpuvisor.runtime.pool import SliceLaunch
from gpuvisor.spec.kinds import Deployment, Model, Resource, Tenant

__all__ = [
    "free_instance_id",
    "new_instance",
    "placement_cycle",
    "placement_snapshot",
    "refresh_scheduling",
    "schedule_settings",
    "slice_launch",
    "slice_queue",
    "take_placement",
]


def new_instance(
    want: DesiredSlice,
    instance_id: str,
    memory_failures: int = 0,
    replaces: SliceState | None = None,
) -> SliceState:
    """Return a new (Pending, unplaced) instance of the replica ``want``. ``replaces``: the
    instance that serves the old spec until this one is Ready."""
    dep = want.deployment
    profile = want.profile
    return SliceState(
        id=instance_id,
        tenant=want.tenant,
        deployment=dep.metadata.name,
        replica=want.replica,
        spec_hash=want.spec_hash,
        pool=dep.spec.pool,
        profile=dep.spec.profile,
        memory=profile.spec.memory if profile else 0,
        compute_share=profile.spec.compute_share if profile else 0.0,
        isolation=profile.spec.isolation if profile else "process",
        latency_class=profile.spec.latency_class if profile else "standard",
        model_name=want.model.metadata.name if want.model else dep.spec.model_name,
        model_version=want.model.spec.version if want.model else (dep.spec.model_version or "?"),
        mig_profile=profile.spec.mig_profile if profile else None,
        numa=dep.spec.placement.numa,
        dedicated=want.pool is not None and want.pool.spec.tenancy == "dedicated",
        anti_affinity=dep.spec.placement.anti_affinity,
        disallow_migration=dep.spec.placement.disallow_migration,
        memory_failures=memory_failures,
        replica_id=want.slice_id,
        replaces=replaces.id if replaces is not None else None,
    )


def free_instance_id(replica_id: str, taken: Container[str]) -> str:
    """A free id for a new instance of a replica: the replica's own id, or, while another
    instance holds it (the one a rolling update replaces), ``<replica id>#2``, ``#3``…"""
    if replica_id not in taken:
        return replica_id
    n = 2
    while f"{replica_id}#{n}" in taken:
        n += 1
    return f"{replica_id}#{n}"


def placement_cycle(want: DesiredSlice, state: SliceState, tenant: Tenant | None) -> Cycle:
    """Return what placement is asked for ``state``: the slice, its pool's policy and its
    tenant's quota."""
    pool = want.pool.spec if want.pool else None
    quota = tenant.spec.quota if tenant else None
    return Cycle(
        SliceRequest(
            state.replica_id,
            state.tenant,
            state.pool,
            state.memory,
            state.compute_share,
            state.isolation,
            state.mig_profile,
            state.deployment,
            want.deployment.spec.placement.numa,
            state.anti_affinity,
        ),
        PoolPolicy(
            state.pool,
            dict(pool.selector) if pool else {},
            pool.tenancy if pool else "shared",
            pool.placement if pool else "binpack",
            pool.memory_headroom if pool else 0,
        ),
        TenantQuota(quota.memory, quota.compute) if quota else TenantQuota(),
    )


def placement_snapshot(
    devices: Iterable[Device],
    slices: Iterable[SliceState],
    exclude: str,
    retiring: SliceState | None = None,
) -> Snapshot:
    """The room slices hold, for placing ``exclude``. ``retiring``: the instance that a
    new one will replace once it is Ready: its memory is held until then, but its compute
    share passes to its replacement, and it is the same replica (no quota or
    anti-affinity against itself)."""
    return Snapshot(
        devices,
        [
            PlacedSlice(
                s.replica_id,
                s.tenant,
                s.device_id,
                s.memory,
                0.0 if s is retiring else s.compute_share,
                s.isolation,
                s.mig_start,
                s.deployment,
                s.numa,  # type: ignore[arg-type]
                s.dedicated,
            )
            for s in slices
            # a Failed slice runs nothing: its room goes back to the device
            if s.device_id is not None and s.id != exclude and s.state != "Failed"
        ],
    )


def take_placement(
    state: SliceState, result: PlacementResult, moved: str, topology: Topology
) -> Device | None:
    """Record in ``state`` where placement put it, and return that device: it is Loading
    there. Or, when no device has room, record why and return None: it is Pending.
    ``moved``: why it moved, if it did, said first in its reason."""
    if result.device_id is None:
        state.unplaced = dict(result.reasons)
        state.set_state("Pending", (f"{moved}; " if moved else "") + result.explain())
        return None
    device = topology.get(result.device_id)
    assert device is not None
    state.device_id = device.id
    state.mig_start = result.mig_start
    where = (
        device.id
        if result.mig_start is None
        else (f"{device.id} (MIG {state.mig_profile}@{result.mig_start})")
    )
    state.set_state(
        "Loading", (f"{moved}; " if moved else "") + f"placed on {where}; starting its worker"
    )
    return device


def _profile_batch_sizes(max_batch: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    sizes.append(max_batch)
    return sizes


def slice_launch(
    state: SliceState, model: Model, dep: Deployment, device: Device, batch_nice: int
) -> SliceLaunch:
    """Return what starts ``state``'s worker on ``device`` (and keep its load message in
    ``state.launch``)."""
    pinned = device.backend == "nvml" and bool(device.uuid)
    max_batch = dep.spec.batching.max_batch_size
    if model.spec.max_batch_size:
        max_batch = min(max_batch, model.spec.max_batch_size)
    load = p.LoadModel(
        slice_id=state.id,
        model_name=dep.metadata.name,
        model_version=model.spec.version,
        format=model.spec.format,
        path=model.spec.source,
        sha256=model.spec.sha256,
        device_kind="cuda" if device.backend == "nvml" else "cpu",
        # the worker of a GPU with a known UUID sees that GPU alone (``SliceLaunch.gpu_uuid``)
        device_index=0 if pinned else device.index or 0,
        threads=device.threads,
        memory_limit=state.memory,
        max_batch_size=max_batch,
        batchable=model.spec.batchable,
        declared_inputs=[p.TensorInfo(t.name, t.datatype, list(t.shape)) for t in model.spec.inputs]
        if model.spec.inputs
        else None,
        declared_outputs=[
            p.TensorInfo(t.name, t.datatype, list(t.shape)) for t in model.spec.outputs
        ]
        if model.spec.outputs
        else None,
        profile_batch_sizes=_profile_batch_sizes(max_batch),
        nice=batch_nice if state.latency_class == "batch" else 0,
    )
    state.launch = load
    return SliceLaunch(
        state.id, state.tenant, device.id, state.isolation, load, device.uuid if pinned else None
    )


def slice_queue(
    state: SliceState,
    dep: Deployment | None,
    max_queued: int,
    resources: Sequence[Resource],
) -> SliceQueue:
    """Return a new queue for a loaded instance, with its deployment's batching and its
    tenant's and pool's scheduling settings."""
    batching = dep.spec.batching if dep else None
    max_batch = state.launch.max_batch_size if state.launch else 1
    if state.loaded is not None and not state.loaded.batchable:
        max_batch = 1
    measured = state.loaded.profile if state.loaded is not None else None
    queue = SliceQueue(
        slice_id=state.id,
        tenant=state.tenant,
        deployment=state.deployment,
        pool=state.pool,
        profile_name=state.profile,
        latency_class=state.latency_class,
        max_batch_size=max_batch,
        max_queue_delay=batching.max_queue_delay if batching else 0.0,
        batchable=state.loaded is None or state.loaded.batchable,
        share=state.compute_share,
        profile=ExecutionProfile(measured),
        max_queued=max_queued,
    )
    schedule_settings(queue, resources)
    return queue


def schedule_settings(queue: SliceQueue, resources: Sequence[Resource]) -> None:
    """Set a queue's weight (its tenant's) and scheduler mode (its pool's)."""
    tenant = find_tenant(resources, queue.tenant)
    pool = find_pool(resources, queue.pool)
    queue.weight = tenant.spec.weight if tenant else 1.0
    queue.mode = pool.spec.scheduler if pool else "best-effort"


def refresh_scheduling(
    admission: Admission, resources: Sequence[Resource], slices: Iterable[SliceState]
) -> None:
    """Apply tenants' weights and quotas to running slices and admission (they change
    without restarting anything; a pool's scheduler mode is part of its slices' spec, so
    changing it restarts them and they start with the new mode)."""
    now = time.monotonic()
    tenants = {r.metadata.name: r for r in resources if isinstance(r, Tenant)}
    for name, tenant in tenants.items():
        quota = tenant.spec.quota
        admission.configure(name, TenantLimits(quota.requests_per_second, quota.max_queued), now)
    for state in slices:
        if state.queue is not None:
            schedule_settings(state.queue, resources)
