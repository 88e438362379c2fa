"""The reconcile loop: make the slices this node runs match the deployments in the store."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Coroutine
from typing import Any

from gpuvisor.control import moves
from gpuvisor.control.desired import DesiredSlice, desired_slices, find_tenant
from gpuvisor.control.launch import (
    free_instance_id,
    new_instance,
    placement_cycle,
    placement_snapshot,
    refresh_scheduling,
    slice_launch,
    slice_queue,
    take_placement,
)
from gpuvisor.control.rollout import (
    SERVING,
    Progress,
    ahead_of,
    by_replica,
    fits,
    handed_over,
    outdated,
    progress,
    serving_note,
    tells_of_replacement,
    waiting_note,
)
from gpuvisor.control.running import RunningSlices
from gpuvisor.control.served import ServedSpecs, replica_ids
from gpuvisor.control.slices import (
    Backoff,
    SliceState,
    SliceSupervisor,
    memory_retry_due,
    model_file_changed,
)
from gpuvisor.dispatch.admission import Admission
from gpuvisor.dispatch.dispatcher import DeviceDispatcher
from gpuvisor.dispatch.queues import SliceQueue
from gpuvisor.inventory.device import Topology
from gpuvisor.placement.defaults import default_framework
from gpuvisor.placement.framework import Framework, Snapshot
from gpuvisor.runtime.pool import WorkerPool
from gpuvisor.security.model_roots import confining_roots, load_check
from gpuvisor.security.signing import SignaturePolicy
from gpuvisor.spec.kinds import Deployment, Resource, Tenant
from gpuvisor.spec.loader import resource_from_dict
from gpuvisor.store.repo import Store
from gpuvisor.telemetry.metrics import Metrics

# DesiredSlice and desired_slices live in control/desired.py; they stay importable from here
__all__ = ["Controller", "DesiredSlice", "desired_slices"]

log = logging.getLogger("gpuvisor.control")


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
        self.running = RunningSlices(metrics)
        self.served = ServedSpecs(store)  # what each replica served: a restart serves it again
        self.slices = self.running.slices  # the books' own dicts, under their old names
        self.supervisors = self.running.supervisors
        self._by_deployment = self.running.by_deployment
        self.unloaded: set[tuple[str, str]] = set()
        self.moved: dict[str, str] = {}  # slice id -> why it was moved, for its next status
        self.resources: list[Resource] = []
        self._deployments: dict[tuple[str, str], Deployment] = {}
        # the replicas asked for, by (tenant, deployment), for the status of an update
        self._desired: dict[tuple[str, str], list[DesiredSlice]] = {}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()  # retirements, rollout steps

    # ---- queries used by the API --------------------------------------------------------

    def deployment_slices(self, tenant: str, deployment: str) -> list[SliceState]:
        return self.running.of_deployment(tenant, deployment)

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
        return find_tenant(self.resources, name)

    # ---- the loop -----------------------------------------------------------------------

    def start(self, period: float) -> None:
        self._task = asyncio.create_task(self._loop(period), name="controller")

    async def _loop(self, period: float) -> None:
        while True:
            try:
                self.store.file_problem()  # a database file deleted under the node is logged
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
        await self.served.close()
        async with self._lock:
            await asyncio.gather(*(sup.stop() for sup in self.supervisors.values()))
            self.supervisors.clear()

    async def reconcile(self) -> None:
        """Bring running slices in line with the store: stop what is gone, replace what
        changed (the old instance serves until its replacement is Ready), move what sits on a
        cordoned or unhealthy device, start what is new or still Pending."""
        objects = await asyncio.to_thread(self.store.list)
        cordons = await asyncio.to_thread(self.store.list_cordons)
        await self.served.load()
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
            # an unload goes with its deployment: one applied again under the name serves
            self.unloaded &= set(self._deployments)
            desired = {d.slice_id: d for d in desired_slices(resources, self.unloaded)}
            self._desired = {}
            for d in desired.values():
                self._desired.setdefault((d.tenant, d.deployment.metadata.name), []).append(d)
            # a deleted or changed slice finishes what it has queued first (new requests
            # already go elsewhere or wait for its successor)
            stopping = outdated(self.slices.values(), desired, self._leaving)
            for sid, why in stopping:
                state = self.slices.get(sid)
                if state is not None and state.state != "Stopping":  # said once, when it starts
                    log.info("slice %s %s", sid, why, extra={"tenant": state.tenant})
            await asyncio.gather(
                *(self.running.stop(sid, self.drain_timeout, why) for sid, why in stopping)
            )
            await self._move_off_unusable_devices()
            # Replicas that have served are placed before those that never did: after a
            # restart, or once a cordoned device is back, what ran gets its room back before
            # a deployment that waited for room (an exclusive one, say) can take it.
            for want in sorted(
                desired.values(), key=lambda d: not self.served.has_served(d.slice_id)
            ):
                await self._reconcile_replica(want)
            self.served.keep(replica_ids(resources))
            self.served.started()
            self.moved.clear()  # the notes of this pass's moves went into their new statuses
            refresh_scheduling(self.admission, self.resources, self.slices.values())
            self.running.publish_counts()

    def instances(self, replica_id: str) -> list[SliceState]:
        """The instances of one replica: one, or two while a rolling update replaces it."""
        return self.running.of_replica(replica_id)

    def _fits(self, state: SliceState, want: DesiredSlice) -> bool:
        """Whether an instance is what its replica asks for (``rollout.fits``)."""
        return fits(state, want, self._leaving)

    def _leaving(self, state: SliceState) -> str | None:
        """Why an instance must leave its (cordoned) device while it still works, or None
        (``moves.leaving``)."""
        return moves.leaving(state, self.topology)

    async def _reconcile_replica(self, want: DesiredSlice) -> None:
        """Start the replica if it has no instance that fits (beside the one that still
        serves, if any, when its turn in the deployment's rolling update has come), or load
        it again when it is due."""
        instances = self.instances(want.slice_id)
        if not instances and (old := self.served.previous(want, self.resources)) is not None:
            self._restore(want, old)
            return
        current = next((s for s in instances if self._fits(s, want)), None)
        siblings = self.deployment_slices(want.tenant, want.deployment.metadata.name)
        if current is None and any(s.restored and s.state == "Loading" for s in siblings):
            # what the deployment's replicas served before the node restarted loads first;
            # then the update resumes, in replica order
            return
        serving = next((s for s in instances if s is not current and s.state in SERVING), None)
        if current is None and serving is not None and (ahead := self._ahead_of(want)):
            why = self._leaving(serving) if serving.spec_hash == want.spec_hash else None
            surge = want.deployment.spec.rollout.max_surge
            serving.set_state(serving.state, waiting_note(why, ahead, surge))
            return
        if current is None:
            await self._start(want, free_instance_id(want.slice_id, self.slices), serving=serving)
        elif (
            current.state == "Pending" and current.id not in self.supervisors
        ) or model_file_changed(current, self.supervisors.get(current.id)):
            await self._start(want, current.id, serving=serving)
        elif memory_retry_due(current, self.supervisors.get(current.id)):
            await self._start(want, current.id, current.memory_failures, serving)
        current = next((s for s in self.instances(want.slice_id) if self._fits(s, want)), None)
        if serving is not None and current is not None and serving.state == "Ready":
            why = self._leaving(serving) if serving.spec_hash == want.spec_hash else None
            serving.set_state("Ready", serving_note(why, current))
        elif serving is None and current is not None and tells_of_replacement(current.reason):
            current.set_state(current.state)  # nothing replaces it any more: nothing to tell

    def _restore(self, want: DesiredSlice, old: DesiredSlice) -> None:
        """Start an instance of ``want``'s replica with ``old``, the spec it served before the
        node restarted; the update to ``want`` resumes once that instance is Ready (or fails)."""
        self._start_slice(old, free_instance_id(want.slice_id, self.slices)).restored = True
        was, now = _model_of(old), _model_of(want)
        log.info(
            "slice %s: the node restarted during an update to %s; it serves %s again until "
            "its replacement is Ready",
            want.slice_id,
            now if now != was else "a new spec",
            was if now != was else "the previous spec",
            extra={"tenant": want.tenant},
        )

    def _ahead_of(self, want: DesiredSlice) -> list[str]:
        """The replicas ``want`` waits for in its deployment's rolling update (``ahead_of``)."""
        instances = self.deployment_slices(want.tenant, want.deployment.metadata.name)
        return ahead_of(want, instances, self._leaving)

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
            self.moved[want.slice_id] = f"moved: {leaving}"
        before = self.slices.get(instance_id)
        said = before.reason if before is not None else ""  # what a retry has said already
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
        loading = [s.id for s in self.slices.values() if s.state == "Loading" and s is not state]
        if not leaving and loading:
            # Room that slices still loading hold may come back (a load that fails gives it
            # back): the old instance serves on rather than be stopped for room that may be
            # there once they are done. Decided again at every reconcile.
            state.set_state(
                "Pending",
                f"no device has room for the new spec beside the old one while {len(loading)} "
                f"slice(s) load ({serving.id} serves the old spec meanwhile; decided once they "
                "are done)",
            )
            return
        if not leaving and not self._fits_in_place(want, state, serving):
            # Stopping the old instance would not make room now: it serves on, and the new
            # spec stays Pending, placed again at every reconcile (room may free up, as when
            # other deployments' updates under way finish).
            reason = (
                "no device has room for the new spec now, even in the old instance's place "
                f"({serving.id} serves the old spec meanwhile; placed again at every reconcile)"
            )
            if said != reason:
                log.info(
                    "slice %s: %s: %s",
                    want.slice_id,
                    reason,
                    "; ".join(f"{d}: {why}" for d, why in sorted(state.unplaced.items())),
                    extra={"tenant": want.tenant},
                )
            state.set_state("Pending", reason)
            return
        if leaving:
            log.warning(
                "slice %s: no other device has room for it; it stops (%s) and waits Pending "
                "until one has room or its device is uncordoned",
                want.slice_id,
                leaving,
                extra={"tenant": want.tenant},
            )
        else:
            log.info(
                "slice %s: no device has room for its new spec beside the old one; replacing "
                "it in place",
                want.slice_id,
                extra={"tenant": want.tenant},
            )
        await self.running.stop(
            serving.id,
            self.drain_timeout,
            f"moving: {leaving}"
            if leaving
            else "stopping: spec changed, and no device has room to load the new spec beside it",
        )
        self.running.forget(state)
        if not leaving:
            self.moved[want.slice_id] = "no device had room for the new spec beside the old one"
        # a spec update waits while a replica it took down is Pending; a move off a cordoned
        # device does not: every replica must leave it (a drain), room elsewhere or not
        self._start_slice(
            want,
            free_instance_id(want.slice_id, self.slices),
            memory_failures,
            took_over=not leaving,
        )

    def _fits_in_place(self, want: DesiredSlice, state: SliceState, serving: SliceState) -> bool:
        """Whether some device would take instance ``state`` of ``want`` once ``serving`` (the
        old instance of its replica) has stopped and given back all it holds."""
        others = [s for s in self.slices.values() if s is not serving]
        snapshot = placement_snapshot(self.topology.devices, others, state.id)
        cycle = placement_cycle(want, state, self._tenant(state.tenant))
        return self.framework.place(cycle, snapshot).device_id is not None

    def _snapshot(self, exclude: str, retiring: SliceState | None = None) -> Snapshot:
        """The room slices hold, for placing ``exclude`` (``launch.placement_snapshot``)."""
        return placement_snapshot(self.topology.devices, self.slices.values(), exclude, retiring)

    async def _move_off_unusable_devices(self) -> None:
        """Stop the slices on failed devices at once, so that this reconcile places them
        elsewhere, or leaves them Pending with reasons (those on cordoned devices move without
        a gap: see ``_leaving``). A ``disallowMigration`` slice stays where it is, with the
        reason in its status."""
        moving: list[Awaitable[None]] = []
        for state, why in moves.must_leave_now(list(self.slices.values()), self.topology):
            log.info("moving slice %s: %s", state.id, why, extra={"tenant": state.tenant})
            moving.append(self.running.stop(state.id, 0.0, f"moving: {why}"))
            self.moved[state.replica_id] = f"moved: {why}"
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
        state = new_instance(want, instance_id, memory_failures, replaces)
        replaced = self.slices.get(state.id)
        # a retry (it was Pending: no room) of an instance that took an old one's place
        state.took_over = took_over or (
            replaced is not None and replaced.spec_hash == want.spec_hash and replaced.took_over
        )
        self.running.put(state, replaced)
        stale = self.supervisors.get(state.id)
        if stale is not None and stale.task is not None and stale.task.done():
            # the supervisor of the instance this one replaces (it failed): left in place, it
            # would make this one, if Pending, look supervised and never placed again
            del self.supervisors[state.id]
        if want.problem or want.model is None or profile is None:
            state.set_state("Pending", want.problem)
            return state
        result = self.framework.place(
            placement_cycle(want, state, self._tenant(state.tenant)),
            self._snapshot(state.id, retiring=replaces),
        )
        if result.device_id is None and replaces is not None:
            take_placement(state, result, "", self.topology)  # Pending: the caller acts on it
            return state
        # a retry of the same spec that found no room before: one Pending episode, which
        # keeps its start and says why the slice moved, if it did
        retry = (
            replaced
            if replaced is not None
            and replaced.state == "Pending"
            and replaced.spec_hash == want.spec_hash
            else None
        )
        state.moved = self.moved.pop(state.replica_id, "") or (retry.moved if retry else "")
        device = take_placement(state, result, state.moved, self.topology)
        if device is None:
            if retry is None:  # counted once per episode, not per retry
                self.metrics.allocation_failures.labels(
                    "", state.tenant, state.deployment, "unplaceable"
                ).inc()
            else:
                state.since = retry.since
            return state
        launch = slice_launch(state, want.model, dep, device, self.batch_nice)
        policy, model = SignaturePolicy.of(want.pool), want.model
        confined = load_check(model, self._tenant(state.tenant))
        launch.load.roots = confining_roots(model, self._tenant(state.tenant))

        def verify() -> str | None:
            if confined is not None:
                confined()
            return policy.check_file(model).sha256 if policy else model.spec.sha256

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
            verify_model=verify if policy is not None or confined is not None else None,
        )
        self.supervisors[state.id] = sup
        sup.start()
        return state

    def _make_queue(self, state: SliceState) -> SliceQueue:
        dep = self.find_deployment(state.tenant, state.deployment)
        return slice_queue(state, dep, self.max_queued_per_slice, self.resources)

    def _slice_ready(self, state: SliceState) -> None:
        """An instance became Ready: retire the instance it replaces at once (new requests go
        to this one from now; the old one finishes its queue)."""
        wanted = self._desired.get((state.tenant, state.deployment), [])
        want = next((w for w in wanted if w.slice_id == state.replica_id), None)
        if want is not None and want.spec_hash == state.spec_hash:
            self.served.record(want)
        old = self.slices.get(state.replaces) if state.replaces is not None else None
        state.replaces = None
        if old is not None and old.replica_id == state.replica_id:
            why = handed_over(old, state)
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
                await self.running.stop(old.id, self.drain_timeout, why)

    # ---- model repository extension -----------------------------------------------------

    async def unload(self, tenant: str, deployment: str) -> None:
        self.unloaded.add((tenant, deployment))
        await self.reconcile()

    async def load(self, tenant: str, deployment: str) -> None:
        self.unloaded.discard((tenant, deployment))
        await self.reconcile()


def _model_of(want: DesiredSlice) -> str:
    """``name@version`` of the model a replica's spec serves."""
    model = want.model
    return f"{model.metadata.name}@{model.spec.version}" if model else want.deployment.spec.model
