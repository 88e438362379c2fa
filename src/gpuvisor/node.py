"""The node: one process that owns the store, the devices, the workers, the dispatchers and
the controller, and answers the request path for the HTTP API."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gpuvisor import __version__
from gpuvisor.control.controller import Controller
from gpuvisor.control.health import apply_health
from gpuvisor.control.slices import Backoff, SliceState
from gpuvisor.dispatch.dispatcher import DeviceDispatcher
from gpuvisor.dispatch.fairshare import FairSharePolicy
from gpuvisor.dispatch.queues import PendingRequest, SliceQueue
from gpuvisor.errors import Unavailable
from gpuvisor.inventory.device import Topology
from gpuvisor.inventory.discovery import discover
from gpuvisor.request_path import RequestPath
from gpuvisor.runtime.pool import WorkerPool
from gpuvisor.security.keys import KeyRing
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


class Node(RequestPath):
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
        # One write to the stored objects and keys at a time (api/admin.py says why); a key
        # created for a tenant holds it too, or a delete could miss it and leave it valid.
        self.writes = asyncio.Lock()

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

    def begin_shutdown(self, grace: float, running_grace: float) -> None:
        """The server is stopping (SIGTERM): take no new request, let the queued ones run for
        up to ``grace`` seconds, then answer those still queued with 503, and those still
        running after ``running_grace`` seconds too, so that every one gets an answer before
        the server gives up on its connections."""
        if self.stopping:
            return
        self.stopping, self.ready = True, False
        log.info("stopping: queued requests have %gs to run", grace)
        loop = asyncio.get_running_loop()
        loop.call_later(grace, self._fail_on_stop, grace, False)
        loop.call_later(running_grace, self._fail_on_stop, running_grace, True)

    def _fail_on_stop(self, grace: float, running: bool) -> None:
        error = Unavailable(
            f"the node is stopping and this request was still running after {grace:g}s: send "
            "it again once the node is back"
            if running
            else f"the node is stopping and this request was still queued after {grace:g}s; it "
            "did not run: send it again once the node is back",
            retry_after=5.0,
        )
        for dispatcher in self.dispatchers.values():
            for queue in list(dispatcher.queues.values()):
                dispatcher.fail_queued(queue, error)
            if running:
                dispatcher.fail_running(error)

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
            # none (no replicas, or deleted meanwhile), or none that will be Ready on its own
            if all(s.state in ("Failed", "Pending") for s in slices):
                break
            await asyncio.sleep(0.05)
        raise Unavailable(self.not_ready_reason(tenant, name))

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
