"""One dispatcher loop per device: grants ready batches to slices' workers, one decision at a time."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from gpuvisor.dispatch.batching import ready_at, take_batch
from gpuvisor.dispatch.policy import DispatchPolicy, FifoPolicy
from gpuvisor.dispatch.queues import Outcome, PendingRequest, SliceQueue
from gpuvisor.errors import GpuvisorError, NotFound, Unavailable

__all__ = ["BatchRunner", "DeviceDispatcher"]

log = logging.getLogger("gpuvisor.dispatch")


BatchCallback = Callable[[Sequence[Outcome] | GpuvisorError, float], None]


class BatchRunner(Protocol):
    """Runs a granted batch on a slice's worker and reports back through a callback."""

    def start_batch(
        self, slice_id: str, batch: Sequence[PendingRequest], done: BatchCallback
    ) -> None:
        """Send the batch; later call ``done`` exactly once, from the event loop, with one
        outcome per request in order and the device seconds the batch used, or with the error
        that failed the whole batch. Raise a GpuvisorError when the batch cannot be sent."""
        ...


BatchObserver = Callable[[SliceQueue, Sequence[PendingRequest], float], None]


class DeviceDispatcher:
    """Decides which slice runs next on one device; ``concurrency`` batches may run at once.

    Decisions are made synchronously, on the event loop, at the moments they can change: a
    request arrives, a batch completes, or a batching delay expires (a timer). No task sits
    between a decision and the worker, so a grant costs no extra loop iteration.
    """

    def __init__(
        self,
        device_id: str,
        runner: BatchRunner,
        policy: DispatchPolicy | None = None,
        concurrency: int = 1,
        on_grant: BatchObserver | None = None,
        on_complete: BatchObserver | None = None,
    ) -> None:
        self.device_id = device_id
        self.runner = runner
        self.policy: DispatchPolicy = policy or FifoPolicy()
        self.concurrency = max(1, concurrency)
        self.queues: dict[str, SliceQueue] = {}
        self.in_flight = 0
        self._on_grant = on_grant
        self._on_complete = on_complete
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._running = False
        self._pumping = False
        self._pump_soon = False
        self._batch_ends: dict[int, float] = {}  # predicted end of each batch on the device

    # ---- slices -----------------------------------------------------------------------

    def add_slice(self, queue: SliceQueue) -> None:
        self.queues[queue.slice_id] = queue
        self._pump()

    def remove_slice(self, slice_id: str, error: GpuvisorError) -> None:
        """Forget a slice and fail whatever it still had queued with ``error``."""
        queue = self.queues.pop(slice_id, None)
        if queue is not None:
            self.fail_queued(queue, error)
            self.policy.forget(slice_id)

    def fail_queued(self, queue: SliceQueue, error: GpuvisorError) -> None:
        for request in queue.drain():
            if request.future is not None and not request.future.done():
                request.future.set_exception(error)

    # ---- requests ---------------------------------------------------------------------

    def submit(self, slice_id: str, request: PendingRequest) -> asyncio.Future[Outcome]:
        """Queue a request on a slice and return the future its outcome will resolve."""
        queue = self.queues.get(slice_id)
        if queue is None:
            raise NotFound(f"slice {slice_id} is not on device {self.device_id}")
        if not self._running:
            raise Unavailable(f"device {self.device_id} is not dispatching (the node is stopping)")
        request.future = asyncio.get_running_loop().create_future()
        queue.push(request)
        if not self._pump_soon:
            # Decide once the loop has run what is ready now: requests that arrived together
            # (one read of several connections) then share one batch and one trip to a worker.
            self._pump_soon = True
            asyncio.get_running_loop().call_soon(self._deferred_pump)
        return request.future

    # ---- decisions --------------------------------------------------------------------

    def start(self) -> None:
        """Start dispatching (on the running event loop)."""
        self._loop = asyncio.get_running_loop()
        self._running = True
        self._pump()

    async def stop(self) -> None:
        """Stop granting and fail everything still queued; batches on workers finish or fail."""
        self._running = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for queue in list(self.queues.values()):
            self.fail_queued(queue, Unavailable("the node is shutting down"))

    def _pump(self) -> None:
        """Grant what may start now and arm the timer for what may start later."""
        if not self._running or self._pumping:
            return
        self._pumping = True
        try:
            delay = self.dispatch_ready(time.monotonic())
        finally:
            self._pumping = False
        if delay is None:
            return
        assert self._loop is not None
        at = self._loop.time() + delay
        if self._timer is not None:
            if self._timer_at <= at:
                return
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._on_timer)

    def _deferred_pump(self) -> None:
        self._pump_soon = False
        self._pump()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        self._pump()

    def dispatch_ready(self, now: float) -> float | None:
        """Grant every batch that may start now; return seconds until the next may, or None."""
        while self.in_flight < self.concurrency:
            candidates = []
            next_ready = float("inf")
            for queue in self.queues.values():
                if queue.busy or not queue.items:
                    continue
                at = ready_at(queue)
                if at <= now:
                    candidates.append(queue)
                elif at < next_ready:
                    next_ready = at
            chosen = self.policy.choose(candidates, now) if candidates else None
            if chosen is None:
                if candidates:  # held back (a fixed share used up): look again when it may run
                    eligible = self.policy.next_eligible(candidates, now)
                    if eligible is not None:
                        next_ready = min(next_ready, eligible)
                return None if next_ready == float("inf") else max(0.0, next_ready - now)
            self._grant(chosen, take_batch(chosen, self.policy.batch_rows(chosen)), now)
        return None

    def predict_completion(self, queue: SliceQueue, rows: int, now: float) -> float:
        """Predict the seconds until a request of ``rows`` queued now on ``queue`` is answered.

        What runs on the device first, then this slice's queue in batches of the size the
        policy grants it, each possibly preceded by one batch of another backlogged slice
        (its predicted cost, at most one quantum's worth as the policy sizes them).
        """
        running = max((end - now for end in self._batch_ends.values()), default=0.0)
        size = max(1, self.policy.batch_rows(queue))
        ahead = queue.queued_rows + rows
        full, rest = divmod(ahead, size)
        own = full * queue.profile.predict(size) + (queue.profile.predict(rest) if rest else 0.0)
        batches = full + (1 if rest else 0)
        others = [
            q.profile.predict(max(1, self.policy.batch_rows(q)))
            for q in self.queues.values()
            if q is not queue and q.items
        ]
        interleave = (batches - 1) * max(others) if others and batches > 1 else 0.0
        # a batch that will not be full waits for its batching delay first
        delay = queue.max_queue_delay if ahead < size else 0.0
        return max(0.0, running) + delay + own + interleave

    def withdraw(self, slice_id: str, request: PendingRequest) -> bool:
        """Take a request that is still queued out of its slice (its deadline passed): it will
        spend no device time. False when it was already granted (or is gone)."""
        queue = self.queues.get(slice_id)
        return queue is not None and queue.remove(request)

    def _grant(self, queue: SliceQueue, batch: list[PendingRequest], now: float) -> None:
        queue.busy = True
        self.in_flight += 1
        self._batch_ends[id(batch)] = now + queue.profile.predict(sum(r.rows for r in batch))
        for request in batch:
            request.granted_at = now
        if self._on_grant is not None:
            self._on_grant(queue, batch, 0.0)

        def done(result: Sequence[Outcome] | GpuvisorError, device_seconds: float) -> None:
            self._settle(queue, batch, result, device_seconds)
            self._pump()

        try:
            self.runner.start_batch(queue.slice_id, batch, done)
        except GpuvisorError as exc:
            self._settle(queue, batch, exc, 0.0)

    def _settle(
        self,
        queue: SliceQueue,
        batch: list[PendingRequest],
        result: Sequence[Outcome] | GpuvisorError,
        device_seconds: float,
    ) -> None:
        """Resolve the batch's requests, free the device and charge the slice."""
        queue.busy = False
        self.in_flight -= 1
        self._batch_ends.pop(id(batch), None)
        if isinstance(result, GpuvisorError):
            for request in batch:
                if request.future is not None and not request.future.done():
                    request.future.set_exception(result)
        else:
            for request, outcome in zip(batch, result):
                if request.future is not None and not request.future.done():
                    request.future.set_result(outcome)
        try:
            if device_seconds > 0 and not isinstance(result, GpuvisorError):
                queue.profile.observe(sum(r.rows for r in batch), device_seconds)
            self.policy.charge(queue, device_seconds, time.monotonic())
            if self._on_complete is not None:
                self._on_complete(queue, batch, device_seconds)
        except Exception:  # an observer's bug must not stall the device
            log.exception("accounting the batch of slice %s failed", queue.slice_id)
