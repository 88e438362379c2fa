"""The node: one process that owns the store, the devices, the workers, the dispatchers and
the controller, and answers the request path for the HTTP API."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gpuvisor import __version__
from gpuvisor.client_watch import ClientWatch
from gpuvisor.control.controller import Controller
from gpuvisor.control.health import apply_health
from gpuvisor.control.slices import Backoff, SliceState
from gpuvisor.dispatch.admission import deadline_error
from gpuvisor.dispatch.dispatcher import DeviceDispatcher
from gpuvisor.dispatch.fairshare import FairSharePolicy
from gpuvisor.dispatch.queues import DEFAULT_PRIORITY, Outcome, PendingRequest, SliceQueue
from gpuvisor.errors import (
    ClientGone,
    DeadlineExceeded,
    GpuvisorError,
    InvalidRequest,
    NotFound,
    TooManyRequests,
    Unavailable,
    is_out_of_memory,
)
from gpuvisor.inventory.device import Topology
from gpuvisor.inventory.discovery import discover
from gpuvisor.runtime.pool import WorkerPool
from gpuvisor.security.keys import KeyRing, Principal
from gpuvisor.spec.kinds import Deployment, NodeSpec
from gpuvisor.store.db import default_url
from gpuvisor.store.repo import Store
from gpuvisor.telemetry.metrics import LiveSlice, Metrics
from gpuvisor.telemetry.recent import RecentActivity
from gpuvisor.telemetry.sampler import (
    Sample,
    TelemetrySampler,
    WorkerTarget,
    targets_from_slices,
)

__all__ = ["Node", "NodeOptions"]

log = logging.getLogger("gpuvisor.node")


@dataclass
class NodeOptions:
    """How to run a node: its configuration, where its state lives, where it listens."""

    spec: NodeSpec = field(default_factory=NodeSpec)
    state_dir: Path = field(default_factory=lambda: Path("~/.gpuvisor").expanduser())
    db_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8700
    # devices found by whoever starts the node (`up` checks them before writing anything);
    # None: the node discovers them as it starts
    topology: Topology | None = None


class Node:
    """Composition root of a running node; the HTTP layer calls into it."""

    def __init__(self, options: NodeOptions) -> None:
        self.options = options
        self.spec = options.spec
        self.state_dir = options.state_dir
        self.metrics = Metrics()
        self.metrics.build_info.info({"version": __version__})
        self.store: Store | None = None
        self.keys: KeyRing | None = None
        self.topology = Topology([])
        self.pool: WorkerPool | None = None
        self.dispatchers: dict[str, DeviceDispatcher] = {}
        self.controller: Controller | None = None
        self.recent = RecentActivity()  # the dashboard's recent latencies, waits and device time
        self.sampler: TelemetrySampler | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.admin_key_created: str | None = None
        self.ready = False
        self.stopping = False  # the server is shutting down: no new requests
        self.started_at = 0.0
        self._request_ids = itertools.count(1)

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store, discover devices, start dispatchers and workers; ready when this returns."""
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        url = self.options.db_url or default_url(self.state_dir)
        self.store = await asyncio.to_thread(Store, url)
        self.keys = KeyRing(self.store)
        self.admin_key_created = await asyncio.to_thread(self.keys.ensure_admin_key, self.state_dir)
        given = self.options.topology
        self.topology = given if given is not None else await asyncio.to_thread(discover, self.spec)
        self.topology.devices[:] = [d for d in self.topology.devices if d.backend != "simulated"]
        if not self.topology.devices:
            raise Unavailable(
                "no device to serve on: enable the CPU device (cpu.enabled: true) "
                "or make an NVIDIA GPU visible"
            )
        for device in self.topology.devices:
            self.metrics.device_memory_total.labels(device.id, device.model).set(
                device.memory_total
            )
        self.pool = WorkerPool(start_timeout=self.spec.workers.start_timeout)
        self.pool.start()
        for device in self.topology.devices:
            dispatcher = DeviceDispatcher(
                device.id,
                self.pool,
                FairSharePolicy(device.quantum),
                device.concurrency,
                on_start=self._observe_start,
                on_complete=self._observe_completion,
                lookahead=device.lookahead or 0.0,
                batch_timeout=self.spec.workers.batch_timeout,
                on_hung=self._observe_hung,
            )
            dispatcher.start()
            self.dispatchers[device.id] = dispatcher
        self.controller = Controller(
            self.store,
            self.topology,
            self.pool,
            self.dispatchers,
            self.metrics,
            cluster=self.spec.cluster,
            restart=Backoff(
                self.spec.workers.restart_backoff, self.spec.workers.restart_backoff_max
            ),
            out_of_memory=Backoff(
                self.spec.workers.out_of_memory_retry, self.spec.workers.out_of_memory_retry_max
            ),
            max_queued_per_slice=self.spec.limits.max_queued_per_slice,
            batch_nice=self.spec.workers.batch_nice,
        )
        await self.controller.reconcile()
        self.controller.start(self.spec.reconcile_period)
        self.metrics.live.source = self._live_slices
        self.sampler = TelemetrySampler(
            self.metrics,
            self.topology.devices,
            self._worker_targets,
            self.spec.telemetry.sample_period,
            is_current=self._worker_is_current,
            on_sample=self._on_sample,
        )
        self.sampler.start()
        self.started_at = time.time()
        self.ready = True

    def begin_shutdown(self, grace: float) -> None:
        """The server is stopping (SIGTERM): take no new request, let the queued ones run for
        up to ``grace`` seconds, then answer those still queued with 503, so that they get an
        answer before the server gives up on its connections."""
        if self.stopping:
            return
        self.stopping, self.ready = True, False
        log.info("stopping: queued requests have %gs to run", grace)
        asyncio.get_running_loop().call_later(grace, self._fail_queued_on_stop, grace)

    def _fail_queued_on_stop(self, grace: float) -> None:
        error = Unavailable(
            f"the node is stopping and this request was still queued after {grace:g}s; it did "
            "not run: send it again once the node is back",
            retry_after=5.0,
        )
        for dispatcher in self.dispatchers.values():
            for queue in list(dispatcher.queues.values()):
                dispatcher.fail_queued(queue, error)

    async def stop(self) -> None:
        """Stop serving: controller, dispatchers, workers, store — in that order."""
        self.ready = False
        workers = len(self.pool.workers) if self.pool is not None else 0
        if self.sampler is not None:
            await self.sampler.stop()
        if self.controller is not None:
            await self.controller.stop()
        for dispatcher in self.dispatchers.values():
            await dispatcher.stop()
        if self.pool is not None:
            await self.pool.close()
        if self.store is not None:
            self.store.close()
        log.info("node stopped: %d worker(s) stopped, state kept in %s", workers, self.state_dir)

    async def wait_until_loaded(self, timeout: float) -> list[SliceState]:
        """Wait until no slice is Loading (or timeout); return the slices that are not Ready."""
        deadline = time.monotonic() + timeout
        assert self.controller is not None
        while time.monotonic() < deadline:
            if all(
                s.state not in ("Loading", "Restarting") for s in self.controller.slices.values()
            ):
                break
            await asyncio.sleep(0.1)
        return [s for s in self.controller.slices.values() if s.state != "Ready"]

    async def wait_deployment_loaded(self, dep: Deployment, timeout: float) -> None:
        """Wait until a deployment has a Ready slice; raise Unavailable with the reasons if it fails."""
        assert self.controller is not None
        tenant, name = dep.metadata.tenant or "", dep.metadata.name
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            slices = self.controller.deployment_slices(tenant, name)
            if any(s.state == "Ready" for s in slices):
                return
            if slices and all(s.state in ("Failed", "Pending") for s in slices):
                break
            await asyncio.sleep(0.05)
        raise Unavailable(self._not_ready_reason(tenant, name))

    # ---- the request path ---------------------------------------------------------------

    def authenticate(self, key: str | None) -> Principal:
        assert self.keys is not None
        return self.keys.authenticate(key)

    def find_deployment(
        self, principal: Principal, name: str, version: str | None = None
    ) -> Deployment:
        """Return the caller's deployment ``name``; raise NotFound (never reveal other tenants')."""
        assert self.controller is not None
        dep = self.controller.find_deployment(principal.tenant, name) if principal.tenant else None
        if dep is None:
            if principal.tenant is None:
                raise NotFound(
                    f"model '{name}' not found: the inference protocol's routes (inference, "
                    "metadata, the model repository) take a tenant's key, not an "
                    f"{principal.role} key (create one with 'gpuvisor keys create --tenant NAME')"
                )
            raise NotFound(f"model '{name}' not found")
        if version is not None and version != self.model_version(dep):
            raise NotFound(
                f"model '{name}' has no version '{version}' (it serves version "
                f"'{self.model_version(dep)}')"
            )
        return dep

    def model_version(self, dep: Deployment) -> str:
        """The version the deployment serves: that of the slices requests go to (during a
        rolling update, the old one's until the new one is Ready)."""
        assert self.controller is not None
        info = self.controller.deployment_slices(dep.metadata.tenant or "", dep.metadata.name)
        ready = [s for s in info if s.state == "Ready"]
        if ready or info:
            return (ready or info)[0].model_version
        return dep.spec.model_version or "1"

    def count_request(self, dep: Deployment, outcome: str) -> None:
        """Count one request to ``dep`` that did not reach a slice (refused, or none ready) in
        ``gpuvisor_requests_total``, under the version the deployment serves."""
        m = self.metrics
        tenant, name = dep.metadata.tenant or "", dep.metadata.name
        m.child(m.requests, tenant, name, self.model_version(dep), outcome).inc()

    async def infer(
        self,
        dep: Deployment,
        body: bytes,
        header_length: int,
        trace_id: str,
        priority: int | None = None,
        timeout: float | None = None,
        rows: int = 1,
        client_gone: Callable[[], Awaitable[None]] | None = None,
    ) -> Outcome:
        """Admit a request to the least-loaded ready slice of ``dep`` and wait for its outcome.

        ``priority`` (OIP, 1 highest; None or 0 the default) orders it within its slice;
        ``timeout`` (seconds) and the deployment's ``slo.latency`` bound it: the smaller is its
        deadline. ``rows`` is the request's batch dimension as read from its header.
        Raises Unavailable (503) when no replica is ready, InvalidRequest (400) for more rows
        than the slice runs in one batch, TooManyRequests (429) or DeadlineExceeded (503) when
        it is refused before queueing, DeadlineExceeded when its deadline passes while queued.
        ``client_gone`` waits until the caller has left: if it returns while the request is
        still queued, the request is dropped (ClientGone) and spends no device time.
        """
        assert self.controller is not None
        tenant, name = dep.metadata.tenant or "", dep.metadata.name
        if self.stopping:
            self.count_request(dep, Unavailable.code)
            raise Unavailable("the node is stopping: send the request again once it is back")
        slices = self.controller.ready_slices(tenant, name)
        if not slices:
            self.count_request(dep, Unavailable.code)
            raise Unavailable(self._not_ready_reason(tenant, name), retry_after=1.0)
        chosen = min(slices, key=lambda s: s.queue.queued_rows if s.queue else 0)
        queue, device_id = chosen.queue, chosen.device_id
        assert queue is not None and device_id is not None
        dispatcher = self.dispatchers[device_id]
        m, version = self.metrics, chosen.model_version
        if not queue.batchable:
            rows = 1  # its first dimension is not a batch: a request is one unit of work
        elif rows > queue.max_batch_size:
            m.child(m.requests, tenant, name, version, InvalidRequest.code).inc()
            raise InvalidRequest(
                f"the request has {rows} rows (the largest first dimension among its inputs), more than "
                f"the {queue.max_batch_size} that model '{name}' runs in one batch "
                "(Deployment spec.batching.maxBatchSize, or the Model's maxBatchSize): send "
                f"at most {queue.max_batch_size} rows per request",
                rows=rows,
                max_batch_size=queue.max_batch_size,
            )
        now = time.monotonic()
        budget = _earliest(dep.spec.slo.latency, timeout)
        priority = priority or DEFAULT_PRIORITY
        try:
            self._admit(tenant, queue, dispatcher, budget, now, rows, priority)
        except (TooManyRequests, DeadlineExceeded) as exc:
            m.child(m.admission_rejections, tenant, name, str(exc.fields.get("reason"))).inc()
            self.recent.record_rejection(tenant, str(exc.fields.get("reason")))
            m.child(m.requests, tenant, name, version, exc.code).inc()
            raise
        request = PendingRequest(
            request_id=next(self._request_ids),
            tenant=tenant,
            body=body,
            header_length=header_length,
            arrival=now,
            rows=rows,
            deadline=None if budget is None else now + budget,
            priority=priority,
            trace_id=trace_id,
        )
        future = dispatcher.submit(queue.slice_id, request)
        watch = None
        if client_gone is not None:
            watch = ClientWatch(
                client_gone, lambda: self._drop_abandoned(future, dispatcher, queue, request)
            )
        try:
            if budget is None:
                outcome = await future
            else:
                outcome = await self._await_within(future, budget, dispatcher, queue, request)
        except Exception as exc:
            m.child(m.requests, tenant, name, version, getattr(exc, "code", "error")).inc()
            raise
        finally:
            if watch is not None:
                watch.cancel()
        outcome_label = "ok" if outcome.status == 200 else str(outcome.status)
        m.child(m.requests, tenant, name, version, outcome_label).inc()
        elapsed = time.monotonic() - request.arrival
        m.child(m.request_duration, tenant, name, version).observe(elapsed)
        self.recent.record_latency(tenant, name, elapsed)
        if outcome.status >= 500 and is_out_of_memory(outcome.body):
            m.child(m.allocation_failures, device_id, tenant, name, "out_of_memory").inc()
        return outcome

    def _admit(
        self,
        tenant: str,
        queue: SliceQueue,
        dispatcher: DeviceDispatcher,
        budget: float | None,
        now: float,
        rows: int = 1,
        priority: int = DEFAULT_PRIORITY,
    ) -> None:
        """Refuse a request before it queues: rate, queue caps, then a deadline it cannot meet."""
        assert self.controller is not None
        admission = self.controller.admission
        admission.check_rate(tenant, now)
        try:
            self._check_room(tenant, queue, dispatcher, budget, now, rows, priority)
        except GpuvisorError:
            admission.refund(tenant)
            raise

    def _check_room(
        self,
        tenant: str,
        queue: SliceQueue,
        dispatcher: DeviceDispatcher,
        budget: float | None,
        now: float,
        rows: int,
        priority: int,
    ) -> None:
        """Refuse a request for a full queue or a deadline it cannot meet."""
        assert self.controller is not None
        admission = self.controller.admission
        tenant_cap = admission.limits(tenant).max_queued
        if tenant_cap is not None or len(queue.items) >= queue.max_queued:
            tenant_queued = sum(
                len(q.items)
                for d in self.dispatchers.values()
                for q in d.queues.values()
                if q.tenant == tenant
            )
            if (tenant_cap is not None and tenant_queued >= tenant_cap) or len(
                queue.items
            ) >= queue.max_queued:
                admission.check_queues(
                    tenant,
                    tenant_queued,
                    queue.slice_id,
                    len(queue.items),
                    queue.max_queued,
                    dispatcher.predict_completion(queue, 0, now),
                )
        if budget is not None:
            predicted = dispatcher.predict_completion(queue, rows, now, priority)
            if predicted > budget:
                ahead = queue.ahead_of(priority)[0]
                raise deadline_error(budget, predicted, ahead, queue.profile.predict(rows))

    async def _await_within(
        self,
        future: asyncio.Future[Outcome],
        budget: float,
        dispatcher: DeviceDispatcher,
        queue: SliceQueue,
        request: PendingRequest,
    ) -> Outcome:
        """Wait for a request with a deadline; withdraw it if the deadline passes while queued
        (a request already on the device is answered: its device time is spent)."""
        try:
            return await asyncio.wait_for(asyncio.shield(future), budget)
        except TimeoutError:
            if not dispatcher.withdraw(queue.slice_id, request):
                return await future
        m = self.metrics
        m.child(m.admission_rejections, request.tenant, queue.deployment, "deadline_expired").inc()
        self.recent.record_rejection(request.tenant, "deadline_expired")
        future.cancel()
        raise DeadlineExceeded(
            f"the request's deadline of {budget * 1000:.3g} ms passed while it was queued on "
            f"slice {queue.slice_id} ({len(queue.items)} requests still queued there); it was "
            "dropped without running. Raise Deployment spec.slo.latency or the request's "
            "timeout, or send less",
            reason="deadline_expired",
        )

    @staticmethod
    def _drop_abandoned(
        future: asyncio.Future[Outcome],
        dispatcher: DeviceDispatcher,
        queue: SliceQueue,
        request: PendingRequest,
    ) -> None:
        """The client of ``request`` has left: drop the request if it is still queued (once
        granted, it runs, and its answer goes nowhere)."""
        if future.done() or not dispatcher.withdraw(queue.slice_id, request):
            return
        waited = time.monotonic() - request.arrival
        future.set_exception(
            ClientGone(
                f"the client closed its connection after {waited * 1000:.0f} ms, while its "
                f"request was queued on slice {queue.slice_id}; the request was dropped "
                "without running",
                reason="client_closed",
            )
        )

    def _not_ready_reason(self, tenant: str, name: str) -> str:
        assert self.controller is not None
        states = self.controller.deployment_slices(tenant, name)
        if not states:
            return f"model '{name}' has no replicas (unloaded or scaled to 0)"
        details = "; ".join(
            f"{s.id}: {s.state}{' (' + s.reason + ')' if s.reason else ''}" for s in states
        )
        return f"model '{name}' is not ready: {details}"

    def _observe_hung(self, queue: SliceQueue) -> None:
        device = self._device_of(queue.slice_id)
        self.metrics.hung_batches.labels(device, queue.tenant, queue.deployment).inc()

    def _observe_start(
        self, queue: SliceQueue, batch: Sequence[PendingRequest], started: float
    ) -> None:
        """Observe each request's wait from admission to its batch's turn on the device."""
        m = self.metrics
        wait = m.child(
            m.queue_wait, self.spec.cluster, queue.pool, queue.profile_name, queue.tenant
        )
        for request in batch:
            wait.observe(started - request.arrival)
            self.recent.record_wait(queue.tenant, started - request.arrival)

    def _observe_completion(
        self, queue: SliceQueue, batch: Sequence[PendingRequest], seconds: float
    ) -> None:
        device = queue.slice_id and self._device_of(queue.slice_id)
        m = self.metrics
        m.child(m.device_busy, device, queue.tenant, queue.deployment, queue.slice_id).inc(seconds)
        self.recent.record_busy(device, queue.tenant, queue.slice_id, seconds)
        m.child(m.batch_size, device, queue.tenant, queue.deployment).observe(
            sum(r.rows for r in batch)
        )

    def _live_slices(self) -> list[LiveSlice]:
        """The slices the dispatchers hold now, with their queue depth (read at scrape time)."""
        return [
            LiveSlice(d.device_id, q.tenant, q.deployment, q.slice_id, len(q.items), q.share)
            for d in self.dispatchers.values()
            for q in list(d.queues.values())
        ]

    def _on_sample(self, sample: Sample) -> None:
        """Mark devices healthy or not from a telemetry sample; a change reconciles now."""
        if apply_health(self.topology.devices, sample.devices) and self.controller is not None:
            task = asyncio.create_task(self.controller.reconcile(), name="reconcile-on-health")
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _worker_targets(self) -> list[WorkerTarget]:
        return targets_from_slices(self.controller.slices.values()) if self.controller else []

    def _worker_is_current(self, target: WorkerTarget) -> bool:
        s = self.controller.slices.get(target.slice_id) if self.controller else None
        return s is not None and s.worker_pid == target.pid

    def _device_of(self, slice_id: str) -> str:
        assert self.controller is not None
        s = self.controller.slices.get(slice_id)
        return (s.device_id or "") if s else ""


def _earliest(*limits: float | None) -> float | None:
    """The smallest of the given time limits, None when there is none."""
    present = [x for x in limits if x is not None]
    return min(present) if present else None
