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


class BatchRunner(Protocol):
    """Runs a granted batch on a slice's worker and returns one outcome per request, in order."""

    async def run_batch(
        self, slice_id: str, batch: Sequence[PendingRequest]
    ) -> tuple[list[Outcome], float]:
        """Return (outcomes, device seconds); raise a GpuvisorError when the worker cannot answer."""
        ...


BatchObserver = Callable[[SliceQueue, Sequence[PendingRequest], float], None]


class DeviceDispatcher:
    """Decides which slice runs next on one device; ``concurrency`` batches may run at once."""

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
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()

    # ---- slices -----------------------------------------------------------------------

    def add_slice(self, queue: SliceQueue) -> None:
        self.queues[queue.slice_id] = queue
        self._wake.set()

    def remove_slice(self, slice_id: str, error: GpuvisorError) -> None:
        """Forget a slice and fail whatever it still had queued with ``error``."""
        queue = self.queues.pop(slice_id, None)
        if queue is not None:
            self.fail_queued(queue, error)

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
        request.future = asyncio.get_running_loop().create_future()
        queue.push(request)
        self._wake.set()
        return request.future

    # ---- the loop ---------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"dispatcher-{self.device_id}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for queue in list(self.queues.values()):
            self.fail_queued(queue, Unavailable("the node is shutting down"))

    async def _run(self) -> None:
        while True:
            timeout = self.dispatch_ready(time.monotonic())
            if timeout is None:
                await self._wake.wait()
            else:
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
            self._wake.clear()

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
                return None if next_ready == float("inf") else max(0.0, next_ready - now)
            self._grant(chosen, take_batch(chosen, self.policy.batch_rows(chosen)), now)
        return None

    def _grant(self, queue: SliceQueue, batch: list[PendingRequest], now: float) -> None:
        queue.busy = True
        self.in_flight += 1
        for request in batch:
            request.granted_at = now
        if self._on_grant is not None:
            self._on_grant(queue, batch, 0.0)
        task = asyncio.create_task(self._execute(queue, batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _execute(self, queue: SliceQueue, batch: list[PendingRequest]) -> None:
        device_seconds = 0.0
        try:
            outcomes, device_seconds = await self.runner.run_batch(queue.slice_id, batch)
            for request, outcome in zip(batch, outcomes):
                if request.future is not None and not request.future.done():
                    request.future.set_result(outcome)
        except GpuvisorError as exc:
            for request in batch:
                if request.future is not None and not request.future.done():
                    request.future.set_exception(exc)
        except Exception as exc:  # never leave a client hanging on a bug
            log.exception("batch on slice %s failed unexpectedly", queue.slice_id)
            for request in batch:
                if request.future is not None and not request.future.done():
                    request.future.set_exception(Unavailable(f"internal error: {exc}"))
        finally:
            queue.busy = False
            self.in_flight -= 1
            self.policy.charge(queue, device_seconds, time.monotonic())
            if self._on_complete is not None:
                self._on_complete(queue, batch, device_seconds)
            self._wake.set()
