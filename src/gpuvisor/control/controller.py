"""The reconcile loop: make the slices this node runs match the deployments in the store."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from gpuvisor.control.rollout import SERVING, Progress, by_replica, progress, replacing
from gpuvisor.control.slices import Backoff, SliceState, SliceSupervisor, file_stamp
from gpuvisor.dispatch.admission import Admission, TenantLimits
from gpuvisor.dispatch.dispatcher import DeviceDispatcher
from gpuvisor.dispatch.profiles import ExecutionProfile
from gpuvisor.dispatch.queues import SliceQueue
from gpuvisor.inventory.device import Device, Topology
from gpuvisor.placement.defaults import default_framework
from gpuvisor.placement.framework import (
    Cycle,
    Framework,
    PlacedSlice,
    PoolPolicy,
    SliceRequest,
    Snapshot,
    TenantQuota,
)
from gpuvisor.runtime import protocol as p
from gpuvisor.runtime.pool import SliceLaunch, WorkerPool
from gpuvisor.security.signing import SignaturePolicy
from gpuvisor.spec.kinds import DEFAULT_POOL, Deployment, Model, Pool, Profile, Resource, Tenant
from gpuvisor.spec.loader import find_model, resource_from_dict
from gpuvisor.store.repo import Store
from gpuvisor.telemetry.metrics import Metrics

__all__ = ["Controller", "DesiredSlice"]

log = logging.getLogger("gpuvisor.control")

_OLD_SPEC = "serving the previous spec"
_REPLACING = "its replacement "  # in the reason of an instance that serves until then
_IN_LINE = "waiting for its turn"  # in the reason of one whose replacement has not started


def _handed_over(old: SliceState, new: SliceState) -> str:
    """Why ``old`` stops now that ``new``, which replaces it, is Ready."""
    if old.spec_hash == new.spec_hash:
        return f"stopping: moved to {new.device_id} as {new.id}"
    return f"stopping: replaced by {new.id}"


@dataclass(frozen=True)
class DesiredSlice:
    """One replica the store asks for, fully resolved (or with the reason it cannot be)."""

    slice_id: str
    tenant: str
    deployment: Deployment
    replica: int
    spec_hash: str
    model: Model | None
    profile: Profile | None
    pool: Pool | None
    problem: str = ""


def _hash(*parts: object) -> str:
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def _profile_batch_sizes(max_batch: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    sizes.append(max_batch)
    return sizes


def desired_slices(
    resources: Sequence[Resource], unloaded: set[tuple[str, str]]
) -> list[DesiredSlice]:
    """Return every replica the resources ask for, resolving model, profile and pool."""
    models = [r for r in resources if isinstance(r, Model)]
    profiles = {r.metadata.name: r for r in resources if isinstance(r, Profile)}
    pools = {r.metadata.name: r for r in resources if isinstance(r, Pool)}
    tenants = {r.metadata.name for r in resources if isinstance(r, Tenant)}
    out: list[DesiredSlice] = []
    for dep in (r for r in resources if isinstance(r, Deployment)):
        tenant = dep.metadata.tenant or ""
        if (tenant, dep.metadata.name) in unloaded:
            continue
        model = find_model(models, tenant, dep.spec.model_name, dep.spec.model_version)
        profile = profiles.get(dep.spec.profile)
        pool = pools.get(dep.spec.pool)
        problem = ""
        if tenant not in tenants:
            problem = f"tenant '{tenant}' does not exist"
        elif model is None:
            problem = f"model '{dep.spec.model}' not found in tenant '{tenant}'"
        elif profile is None:
            problem = f"profile '{dep.spec.profile}' not found"
        elif pool is None and dep.spec.pool != DEFAULT_POOL:
            problem = f"pool '{dep.spec.pool}' not found"
        # the replica count and the rollout pace are not part of a replica's spec: scaling or
        # changing the pace leaves the running replicas as they are
        spec_hash = _hash(
            dep.spec.model_dump(mode="json", exclude={"replicas", "rollout"}),
            model.spec.model_dump(mode="json") if model else None,
            profile.spec.model_dump(mode="json") if profile else None,
            pool.spec.model_dump(mode="json") if pool else None,
        )
        for replica in range(dep.spec.replicas):
            out.append(
                DesiredSlice(
                    f"{tenant}/{dep.metadata.name}/{replica}",
                    tenant,
                    dep,
                    replica,
                    spec_hash,
                    model,
                    profile,
                    pool,
                    problem,
                )
            )
    return out


class Controller:
    """Reconciles desired slices (from the store) with running ones, on demand and periodically."""

    def __init__(
        self,
        store: Store,
        topology: Topology,
        pool: WorkerPool,
        dispatchers: dict[str, DeviceDispatcher],
        metrics: Metrics,
        cluster: str = "local",
        restart: Backoff = Backoff(0.5, 30.0),
        out_of_memory: Backoff = Backoff(30.0, 600.0),
        admission: Admission | None = None,
        max_queued_per_slice: int = 1024,
        framework: Framework | None = None,
        drain_timeout: float = 5.0,
        batch_nice: int = 0,
    ) -> None:
        self.store = store
        self.framework = framework or default_framework()
        self.drain_timeout = drain_timeout
        self.batch_nice = batch_nice
        self.admission = admission or Admission()
        self.max_queued_per_slice = max_queued_per_slice
        self.topology = topology
        self.pool = pool
        self.dispatchers = dispatchers
        self.metrics = metrics
        self.cluster = cluster
        self.restart = restart
        self.out_of_memory = out_of_memory
        self.slices: dict[str, SliceState] = {}
        self.supervisors: dict[str, SliceSupervisor] = {}
        self.unloaded: set[tuple[str, str]] = set()
        self.model_info: dict[tuple[str, str], p.ModelLoaded] = {}
        self.moved: dict[str, str] = {}  # slice id -> why it was moved, for its next status
        self.resources: list[Resource] = []
        self._deployments: dict[tuple[str, str], Deployment] = {}
        # the replicas asked for, by (tenant, deployment), for the status of an update
        self._desired: dict[tuple[str, str], list[DesiredSlice]] = {}
        # slices by (tenant, deployment): inference looks them up on every request
        self._by_deployment: dict[tuple[str, str], list[SliceState]] = {}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()  # retirements, rollout steps

    # ---- queries used by the API --------------------------------------------------------

    def deployment_slices(self, tenant: str, deployment: str) -> list[SliceState]:
        return list(self._by_deployment.get((tenant, deployment), ()))

    def ready_slices(self, tenant: str, deployment: str) -> list[SliceState]:
        return [
            s for s in self.deployment_slices(tenant, deployment) if s.state == "Ready" and s.queue
        ]

    def find_deployment(self, tenant: str, name: str) -> Deployment | None:
        """Return a deployment by (tenant, name): a dict lookup, since inference calls it per request."""
        return self._deployments.get((tenant, name))

    def deployments(self) -> list[Deployment]:
        return [r for r in self.resources if isinstance(r, Deployment)]

    def tenant_weight(self, tenant: str) -> float:
        found = self._tenant(tenant)
        return found.spec.weight if found else 1.0

    def _tenant(self, name: str) -> Tenant | None:
        return next(
            (r for r in self.resources if isinstance(r, Tenant) and r.metadata.name == name),
            None,
        )

    # ---- the loop -----------------------------------------------------------------------

    def start(self, period: float) -> None:
        self._task = asyncio.create_task(self._loop(period), name="controller")

    async def _loop(self, period: float) -> None:
        while True:
            try:
                await self.reconcile()
            except Exception:
                log.exception("reconcile failed; trying again in %.1fs", period)
            await asyncio.sleep(period)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await asyncio.gather(*self._retiring, return_exceptions=True)
        async with self._lock:
            await asyncio.gather(*(sup.stop() for sup in self.supervisors.values()))
            self.supervisors.clear()

    async def reconcile(self) -> None:
        """Bring running slices in line with the store: stop what is gone, replace what
        changed (the old instance serves until its replacement is Ready), move what sits on a
        cordoned or unhealthy device, start what is new or still Pending."""
        objects = await asyncio.to_thread(self.store.list)
        cordons = await asyncio.to_thread(self.store.list_cordons)
        resources = [resource_from_dict(o.body) for o in objects]
        async with self._lock:
            cordoned = {c.device_id for c in cordons}
            for device in self.topology.devices:
                device.cordoned = device.id in cordoned
            self.resources = resources
            self._deployments = {
                (r.metadata.tenant or "", r.metadata.name): r
                for r in resources
                if isinstance(r, Deployment)
            }
            desired = {d.slice_id: d for d in desired_slices(resources, self.unloaded)}
            self._desired = {}
            for d in desired.values():
                self._desired.setdefault((d.tenant, d.deployment.metadata.name), []).append(d)
            # a deleted or changed slice finishes what it has queued first (new requests
            # already go elsewhere or wait for its successor)
            await asyncio.gather(
                *(
                    self._stop_slice(sid, self.drain_timeout, why)
                    for sid, why in self._outdated(desired)
                )
            )
            await self._move_off_unusable_devices()
            for want in desired.values():
                await self._reconcile_replica(want)
            self.moved.clear()  # the notes of this pass's moves went into their new statuses
            self._refresh_scheduling()
            self._publish_slice_counts()

    def instances(self, replica_id: str) -> list[SliceState]:
        """The instances of one replica: one, or two while a rolling update replaces it."""
        return [s for s in self.slices.values() if s.replica_id == replica_id]

    def _fits(self, state: SliceState, want: DesiredSlice) -> bool:
        """Whether an instance is what its replica asks for: the current spec, on a device it
        may stay on."""
        return state.spec_hash == want.spec_hash and self._leaving(state) is None

    def _leaving(self, state: SliceState) -> str | None:
        """Why an instance must leave its device while it still works (it is cordoned), or
        None. It moves without a gap: its replacement loads elsewhere while it serves. One on
        a failed device is stopped at once instead (``_move_off_unusable_devices``)."""
        if state.device_id is None or state.disallow_migration:
            return None
        device = self.topology.get(state.device_id)
        if device is None or not device.healthy or not device.cordoned:
            return None
        return f"{device.id} is cordoned"

    def _outdated(self, desired: dict[str, DesiredSlice]) -> list[tuple[str, str]]:
        """Return the instances to stop now, with why: those of replicas no longer asked for;
        and of the others, all but what the replica needs: an instance that fits (the current
        spec, on a device it may stay on) and, until that one is Ready, one that serves the
        old spec or from a cordoned device (a rolling update, or a move without a gap). A
        spec that cannot be served (a missing profile, model or tenant) stops the old
        instances at once."""
        out: list[tuple[str, str]] = []
        replicas: dict[str, list[SliceState]] = {}
        for s in self.slices.values():
            replicas.setdefault(s.replica_id, []).append(s)
        for rid, instances in replicas.items():
            want = desired.get(rid)
            if want is None:
                out += [(s.id, "stopping: deleted, scaled down or unloaded") for s in instances]
                continue
            fitting = [s for s in instances if self._fits(s, want)]
            fitting.sort(key=lambda s: s.state != "Ready")  # a Ready one first, else the oldest
            keep = fitting[0] if fitting else None
            if keep is not None:  # two that fit (a move undone by an uncordon): one stays
                out += [(s.id, f"stopping: {keep.id} serves this replica") for s in fitting[1:]]
            servable = not want.problem and want.model is not None and want.profile is not None
            serving = False
            for s in instances:
                if s in fitting:
                    continue
                leaving = self._leaving(s) if s.spec_hash == want.spec_hash else None
                if keep is not None and keep.state == "Ready":
                    out.append((s.id, _handed_over(s, keep)))
                elif not serving and s.state in SERVING and servable:
                    serving = True
                else:
                    out.append(
                        (s.id, f"moving: {leaving}" if leaving else "stopping: spec changed")
                    )
        return out

    async def _reconcile_replica(self, want: DesiredSlice) -> None:
        """Start the replica if it has no instance that fits (beside the one that still
        serves, if any, when its turn in the deployment's rolling update has come), or load
        it again when it is due."""
        instances = self.instances(want.slice_id)
        current = next((s for s in instances if self._fits(s, want)), None)
        serving = next((s for s in instances if s is not current and s.state in SERVING), None)
        if current is None and serving is not None and (ahead := self._ahead_of(want)):
            leaving = self._leaving(serving) if serving.spec_hash == want.spec_hash else None
            surge = want.deployment.spec.rollout.max_surge
            serving.set_state(
                serving.state,
                f"{f'{leaving}: serving' if leaving else _OLD_SPEC}: {_IN_LINE} "
                f"({', '.join(ahead)} first; rollout.maxSurge: {surge})",
            )
            return
        if current is None:
            await self._start(want, self._instance_id(want.slice_id), serving=serving)
        elif (
            current.state == "Pending" and current.id not in self.supervisors
        ) or self._model_file_changed(current):
            await self._start(want, current.id, serving=serving)
        elif self._memory_retry_due(current):
            await self._start(want, current.id, current.memory_failures, serving)
        current = next((s for s in self.instances(want.slice_id) if self._fits(s, want)), None)
        if serving is not None and current is not None and serving.state == "Ready":
            leaving = self._leaving(serving) if serving.spec_hash == want.spec_hash else None
            what = f"{leaving}: serving" if leaving else _OLD_SPEC
            serving.set_state(
                "Ready",
                f"{what}: its replacement {current.id} failed"
                if current.state == "Failed"
                else f"{what} until its replacement {current.id} is Ready",
            )
        elif (
            serving is None
            and current is not None
            and (_REPLACING in current.reason or _IN_LINE in current.reason)
        ):
            current.set_state(current.state)  # nothing replaces it any more: nothing to tell

    def _ahead_of(self, want: DesiredSlice) -> list[str]:
        """The other replicas of ``want``'s deployment whose replacement is under way, when
        they are as many as its ``rollout.maxSurge`` (``want`` waits for its turn); else []."""
        siblings = by_replica(
            s
            for s in self.deployment_slices(want.tenant, want.deployment.metadata.name)
            if s.replica_id != want.slice_id
        )
        busy = replacing(siblings, lambda s: self._fits(s, want))
        return busy if len(busy) >= want.deployment.spec.rollout.max_surge else []

    def rollout(self, tenant: str, deployment: str) -> Progress:
        """How far the deployment's rolling update has come (done when nothing is under way)."""
        wanted = self._desired.get((tenant, deployment), [])
        replicas = by_replica(self.deployment_slices(tenant, deployment))
        if not wanted:
            return progress([], replicas, lambda s: False)
        return progress([d.slice_id for d in wanted], replicas, lambda s: self._fits(s, wanted[0]))

    def moving(self, replica_id: str) -> bool:
        """Whether a replica still has to move off a cordoned device: an instance there
        serves, and its replacement has neither failed nor gone Pending."""
        instances = self.instances(replica_id)
        leaving = [s for s in instances if s.state in SERVING and self._leaving(s)]
        stuck = [s for s in instances if s not in leaving and s.state in ("Failed", "Pending")]
        return bool(leaving) and not stuck

    def _instance_id(self, replica_id: str) -> str:
        """A free id for a new instance of a replica: the replica's own id, or, while another
        instance holds it (the one a rolling update replaces), ``<replica id>#2``, ``#3``…"""
        if replica_id not in self.slices:
            return replica_id
        n = 2
        while f"{replica_id}#{n}" in self.slices:
            n += 1
        return f"{replica_id}#{n}"

    async def _start(
        self,
        want: DesiredSlice,
        instance_id: str,
        memory_failures: int = 0,
        serving: SliceState | None = None,
    ) -> None:
        """Place and load an instance of a replica; beside ``serving`` (the instance with the
        old spec, or on a cordoned device) when a device has room for both, else in its place
        once that one has drained."""
        leaving = self._leaving(serving) if serving is not None else None
        if leaving:
            self.moved[want.slice_id] = f"moved off {leaving}"
        state = self._start_slice(want, instance_id, memory_failures, serving)
        if serving is None:
            return
        if state.device_id is not None:
            log.info(
                "slice %s: %s as %s on %s; %s serves until then",
                want.slice_id,
                f"moving it ({leaving})" if leaving else "loading its new spec",
                state.id,
                state.device_id,
                serving.id,
                extra={"tenant": want.tenant},
            )
            return
        if not state.unplaced:
            return
        log.info(
            "slice %s: no device has room for its %s beside the old one; replacing it in place",
            want.slice_id,
            "move" if leaving else "new spec",
            extra={"tenant": want.tenant},
        )
        await self._stop_slice(
            serving.id,
            self.drain_timeout,
            f"moving: {leaving}"
            if leaving
            else "stopping: spec changed, and no device has room to load the new spec beside it",
        )
        self._forget(state)
        if not leaving:
            self.moved[want.slice_id] = "no device had room for the new spec beside the old one"
        self._start_slice(want, self._instance_id(want.slice_id), memory_failures, took_over=True)

    def _model_file_changed(self, state: SliceState) -> bool:
        """Whether a slice that Failed for its model should be loaded again: its model file was
        replaced, rewritten or created since the attempt that failed."""
        if state.state != "Failed" or not state.failed_on_model or state.launch is None:
            return False
        supervisor = self.supervisors.get(state.id)
        if supervisor is not None and supervisor.task is not None and not supervisor.task.done():
            return False  # still giving back what it held
        if file_stamp(state.launch.path) == state.failed_model_stamp:
            return False
        log.info(
            "slice %s: its model file %s changed; loading it again",
            state.id,
            state.launch.path,
            extra={"tenant": state.tenant},
        )
        return True

    def _memory_retry_due(self, state: SliceState) -> bool:
        """Whether a slice whose model ran out of memory while loading is due to be loaded
        again (others may have given memory back since)."""
        if state.state != "Failed" or state.retry_at is None or time.monotonic() < state.retry_at:
            return False
        supervisor = self.supervisors.get(state.id)
        if supervisor is not None and supervisor.task is not None and not supervisor.task.done():
            return False
        log.info(
            "slice %s: loading it again after running out of memory (%d time(s) in a row)",
            state.id,
            state.memory_failures,
            extra={"tenant": state.tenant},
        )
        return True

    def _refresh_scheduling(self) -> None:
        """Apply tenants' weights and quotas to running slices and admission (they change
        without restarting anything; a pool's scheduler mode is part of its slices' spec, so
        changing it restarts them and they start with the new mode)."""
        now = time.monotonic()
        tenants = {r.metadata.name: r for r in self.resources if isinstance(r, Tenant)}
        for name, tenant in tenants.items():
            quota = tenant.spec.quota
            self.admission.configure(
                name, TenantLimits(quota.requests_per_second, quota.max_queued), now
            )
        for state in self.slices.values():
            if state.queue is not None:
                self._schedule_settings(state.queue)

    def _schedule_settings(self, queue: SliceQueue) -> None:
        tenant = self._tenant(queue.tenant)
        pool = next(
            (r for r in self.resources if isinstance(r, Pool) and r.metadata.name == queue.pool),
            None,
        )
        queue.weight = tenant.spec.weight if tenant else 1.0
        queue.mode = pool.spec.scheduler if pool else "best-effort"

    def _snapshot(self, exclude: str, retiring: SliceState | None = None) -> Snapshot:
        """The room slices hold, for placing ``exclude``. ``retiring``: the instance that a
        new one will replace once it is Ready: its memory is held until then, but its compute
        share passes to its replacement, and it is the same replica (no quota or
        anti-affinity against itself)."""
        return Snapshot(
            self.topology.devices,
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
                )
                for s in self.slices.values()
                # a Failed slice runs nothing: its room goes back to the device
                if s.device_id is not None and s.id != exclude and s.state != "Failed"
            ],
        )

    def _unusable(self, device_id: str) -> str | None:
        """Return why slices must leave this device (cordoned, unhealthy), or None."""
        device = self.topology.get(device_id)
        if device is None:
            return "its device is gone"
        if device.cordoned:
            return f"{device_id} is cordoned"
        if not device.healthy:
            return f"{device_id} is unhealthy" + (
                f" ({device.health_reason})" if device.health_reason else ""
            )
        return None

    async def _move_off_unusable_devices(self) -> None:
        """Stop the slices on failed devices at once, so that this reconcile places them
        elsewhere, or leaves them Pending with reasons (those on cordoned devices move without
        a gap: see ``_leaving``). A ``disallowMigration`` slice stays where it is, with the
        reason in its status."""
        moving: list[Awaitable[None]] = []
        for state in list(self.slices.values()):
            if state.device_id is None:
                continue
            why = self._unusable(state.device_id)
            if why is None:
                if state.reason.startswith("disallowMigration:"):
                    state.set_state(state.state)  # the device is back: drop the note
                continue
            if state.disallow_migration:
                note = f"disallowMigration: stays on {why}"
                if state.reason != note:
                    state.set_state(state.state, note)
                continue
            if self._leaving(state):
                continue  # a cordoned device still works: its replacement loads first
            log.info("moving slice %s: %s", state.id, why, extra={"tenant": state.tenant})
            moving.append(self._stop_slice(state.id, 0.0, f"moving: {why}"))
            self.moved[state.replica_id] = f"moved off {why}"
        await asyncio.gather(*moving)

    def _start_slice(
        self,
        want: DesiredSlice,
        instance_id: str,
        memory_failures: int = 0,
        replaces: SliceState | None = None,
        took_over: bool = False,
    ) -> SliceState:
        """Place and load an instance of a replica anew. ``memory_failures``: how many loads of
        the instance it replaces ran out of memory in a row (the next delay grows with it).
        ``replaces``: the instance that serves the old spec until this one is Ready; when no
        device has room for both, this one is left Pending for the caller to act on."""
        dep = want.deployment
        profile = want.profile
        state = SliceState(
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
            model_version=want.model.spec.version
            if want.model
            else (dep.spec.model_version or "?"),
            mig_profile=profile.spec.mig_profile if profile else None,
            numa=dep.spec.placement.numa,
            anti_affinity=dep.spec.placement.anti_affinity,
            disallow_migration=dep.spec.placement.disallow_migration,
            memory_failures=memory_failures,
            replica_id=want.slice_id,
            replaces=replaces.id if replaces is not None else None,
        )
        replaced = self.slices.get(state.id)
        # a retry (it was Pending: no room) of an instance that took an old one's place
        state.took_over = took_over or (
            replaced is not None and replaced.spec_hash == want.spec_hash and replaced.took_over
        )
        self.slices[state.id] = state
        siblings = self._by_deployment.setdefault((state.tenant, state.deployment), [])
        if replaced is not None and replaced in siblings:
            siblings.remove(replaced)
        siblings.append(state)
        if want.problem or want.model is None or profile is None:
            state.set_state("Pending", want.problem)
            return state
        result = self.framework.place(
            self._cycle(want, state), self._snapshot(state.id, retiring=replaces)
        )
        if result.device_id is None and replaces is not None:
            state.unplaced = dict(result.reasons)
            state.set_state("Pending", result.explain())
            return state
        moved = self.moved.pop(state.replica_id, "")
        if result.device_id is None:
            state.unplaced = dict(result.reasons)
            state.set_state("Pending", (f"{moved}; " if moved else "") + result.explain())
            if replaced is None or replaced.state != "Pending":  # once per episode, not per retry
                self.metrics.allocation_failures.labels(
                    "", state.tenant, state.deployment, "unplaceable"
                ).inc()
            return state
        device = self.topology.get(result.device_id)
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
        launch = self._launch(state, want.model, dep, device)
        policy, model = SignaturePolicy.of(want.pool), want.model
        sup = SliceSupervisor(
            state,
            launch,
            self.pool,
            self.dispatchers[device.id],
            self.metrics,
            self._make_queue,
            self.restart,
            self.out_of_memory,
            on_ready=self._slice_ready,
            verify_model=(lambda: policy.check_file(model).sha256) if policy else None,
        )
        self.supervisors[state.id] = sup
        sup.start()
        return state

    def _cycle(self, want: DesiredSlice, state: SliceState) -> Cycle:
        pool = want.pool.spec if want.pool else None
        tenant = self._tenant(state.tenant)
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

    def _launch(
        self, state: SliceState, model: Model, dep: Deployment, device: Device
    ) -> SliceLaunch:
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
            device_index=device.index or 0,
            threads=device.threads,
            memory_limit=state.memory,
            max_batch_size=max_batch,
            declared_inputs=[
                p.TensorInfo(t.name, t.datatype, list(t.shape)) for t in model.spec.inputs
            ]
            if model.spec.inputs
            else None,
            declared_outputs=[
                p.TensorInfo(t.name, t.datatype, list(t.shape)) for t in model.spec.outputs
            ]
            if model.spec.outputs
            else None,
            profile_batch_sizes=_profile_batch_sizes(max_batch),
            nice=self.batch_nice if state.latency_class == "batch" else 0,
        )
        state.launch = load
        return SliceLaunch(state.id, state.tenant, device.id, state.isolation, load)

    def _make_queue(self, state: SliceState) -> SliceQueue:
        dep = self.find_deployment(state.tenant, state.deployment)
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
            share=state.compute_share,
            profile=ExecutionProfile(measured),
            max_queued=self.max_queued_per_slice,
        )
        self._schedule_settings(queue)
        return queue

    def _remember_model(self, state: SliceState) -> None:
        if state.loaded is not None:
            self.model_info[(state.tenant, state.deployment)] = state.loaded

    async def _stop_slice(self, slice_id: str, drain: float = 0.0, reason: str = "") -> None:
        sup = self.supervisors.pop(slice_id, None)
        if sup is not None:
            await sup.stop(drain, reason)
        gone = self.slices.get(slice_id)
        if gone is not None:
            self._forget(gone)
        if gone is not None and gone.device_id is not None:
            labels = (gone.device_id, gone.tenant, gone.deployment, gone.id)
            for gauge in (self.metrics.slice_memory_limit, self.metrics.slice_memory_used):
                with contextlib.suppress(KeyError):
                    gauge.remove(*labels)

    def _forget(self, state: SliceState) -> None:
        """Drop an instance from the node's books (its supervisor, if any, is already gone)."""
        if self.slices.get(state.id) is state:
            del self.slices[state.id]
        siblings = self._by_deployment.get((state.tenant, state.deployment), [])
        if state in siblings:
            siblings.remove(state)
        if not siblings:
            self._by_deployment.pop((state.tenant, state.deployment), None)

    def _slice_ready(self, state: SliceState) -> None:
        """An instance became Ready: remember its model, and retire the instance it replaces
        at once (new requests go to this one from now; the old one finishes its queue)."""
        self._remember_model(state)
        old = self.slices.get(state.replaces) if state.replaces is not None else None
        state.replaces = None
        if old is not None and old.replica_id == state.replica_id:
            why = _handed_over(old, state)
            old.set_state("Stopping", why)
            log.info("slice %s %s", old.id, why, extra={"tenant": state.tenant})
            self._in_background(self._retire(old, why), f"retire-{old.id}")
        if self.rollout(state.tenant, state.deployment).waiting:
            # the next replica's turn (after the retirement above: the lock is first come,
            # first served, so the old instance's memory is free by then)
            self._in_background(self.reconcile(), f"rollout-{state.replica_id}")

    def _in_background(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, old: SliceState, why: str) -> None:
        async with self._lock:
            if self.slices.get(old.id) is old:
                await self._stop_slice(old.id, self.drain_timeout, why)

    def _publish_slice_counts(self) -> None:
        self.metrics.slices.clear()
        for s in self.slices.values():
            self.metrics.slices.labels(s.tenant, s.deployment, s.state).inc()

    # ---- model repository extension -----------------------------------------------------

    async def unload(self, tenant: str, deployment: str) -> None:
        self.unloaded.add((tenant, deployment))
        await self.reconcile()

    async def load(self, tenant: str, deployment: str) -> None:
        self.unloaded.discard((tenant, deployment))
        await self.reconcile()
