"""The node's request path (a mixin of the Node): a caller's key and deployment, admission
before queueing (rate, queue caps, deadlines), the wait for the outcome, and what is counted
of each request. The HTTP layer calls it; everything here runs on the event loop."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable

from gpuvisor.client_watch import ClientWatch
from gpuvisor.control.controller import Controller
from gpuvisor.control.slices import SliceState
from gpuvisor.dispatch.admission import deadline_error
from gpuvisor.dispatch.dispatcher import DeviceDispatcher
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
from gpuvisor.security.keys import KeyRing, Principal
from gpuvisor.spec.kinds import Deployment
from gpuvisor.telemetry.metrics import Metrics
from gpuvisor.telemetry.recent import RecentActivity

__all__ = ["RequestPath"]


class RequestPath:
    """Inference requests, from a caller's key to the outcome (mixed into ``Node``)."""

    keys: KeyRing | None
    controller: Controller | None
    dispatchers: dict[str, DeviceDispatcher]
    metrics: Metrics
    recent: RecentActivity
    stopping: bool
    _request_ids: itertools.count[int]

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
        if version is not None and version not in self.model_versions(dep):
            served = " and ".join(f"'{v}'" for v in self.model_versions(dep))
            plural = "s" if " and " in served else ""
            raise NotFound(
                f"model '{name}' has no version '{version}' (it serves version{plural} {served})"
            )
        return dep

    def model_versions(self, dep: Deployment) -> list[str]:
        """The versions the deployment serves: those of its Ready instances (two during a
        rolling update of several replicas), else those of the instances on their way, else
        the one it asks for. The first is the one a request without a version is counted under."""
        assert self.controller is not None
        info = self.controller.deployment_slices(dep.metadata.tenant or "", dep.metadata.name)
        ready = [s.model_version for s in info if s.state == "Ready"]
        coming = [s.model_version for s in info if s.state != "Stopping"]
        versions = ready or coming or [s.model_version for s in info]
        return list(dict.fromkeys(versions)) or [dep.spec.model_version or "1"]

    def model_version(self, dep: Deployment) -> str:
        """The version a request without one is counted under: that of the slices requests go
        to (during a rolling update, the old one's until the new one is Ready)."""
        return self.model_versions(dep)[0]

    def serving(self, dep: Deployment, version: str | None) -> list[SliceState]:
        """The Ready instances of ``dep`` a request for ``version`` (None: any) may go to."""
        assert self.controller is not None
        tenant, name = dep.metadata.tenant or "", dep.metadata.name
        slices = self.controller.ready_slices(tenant, name)
        return slices if version is None else [s for s in slices if s.model_version == version]

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
        version: str | None = None,
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
        ``version`` (from ``/versions/N/infer``) sends it only to instances of that version.
        """
        assert self.controller is not None
        tenant, name = dep.metadata.tenant or "", dep.metadata.name
        if self.stopping:
            self.count_request(dep, Unavailable.code)
            raise Unavailable("the node is stopping: send the request again once it is back")
        slices = self.serving(dep, version)
        if not slices:
            self.count_request(dep, Unavailable.code)
            raise Unavailable(self.not_ready_reason(tenant, name, version), retry_after=1.0)
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
        """Refuse a request before it queues: rate, queue caps, then a deadline it cannot meet
        (a request refused after the rate check gives its token back)."""
        assert self.controller is not None
        admission = self.controller.admission
        admission.check_rate(tenant, now)
        try:
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
        except GpuvisorError:
            admission.refund(tenant)
            raise

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

    def not_ready_reason(self, tenant: str, name: str, version: str | None = None) -> str:
        assert self.controller is not None
        states = self.controller.deployment_slices(tenant, name)
        if not states:
            return f"model '{name}' has no replicas (unloaded or scaled to 0)"
        details = "; ".join(
            f"{s.id}: {s.state}{' (' + s.reason + ')' if s.reason else ''}"
            + (f", version '{s.model_version}'" if version is not None else "")
            for s in states
        )
        which = f"model '{name}' version '{version}'" if version is not None else f"model '{name}'"
        return f"{which} is not ready: {details}"


def _earliest(*limits: float | None) -> float | None:
    """The smallest of the given time limits, None when there is none."""
    present = [x for x in limits if x is not None]
    return min(present) if present else None
