"""One dispatcher loop per device: grants ready batches to slices' workers, one decision at a time."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from gpuvisor.dispatch.batching import ready_at, take_batch
from gpuvisor.dispatch.policy import DispatchPolicy, FifoPolicy
from gpuvisor.dispatch.queues import DEFAULT_PRIORITY, Outcome, PendingRequest, SliceQueue
from gpuvisor.dispatch.staging import Grant, may_follow, may_stage, may_take_back, staging_base
from gpuvisor.errors import GpuvisorError, NotFound, Unavailable

__all__ = ["BatchRunner", "DeviceDispatcher"]

log = logging.getLogger("gpuvisor.dispatch")


#: A batch's result: one outcome per request, the error that failed the whole batch, or None
#: when the batch was revoked before it started (nothing ran); and the device seconds it used.
BatchCallback = Callable[[Sequence[Outcome] | GpuvisorError | None, float], None]


class BatchRunner(Protocol):
    """Runs a granted batch on a slice's worker and reports back through a callback."""

    def start_batch(
        self,
        slice_id: str,
        batch: Sequence[PendingRequest],
        done: BatchCallback,
        after: int | None = None,
    ) -> int:
        """Send the batch and return a handle for it; later call ``done`` exactly once, from the
        event loop, with one outcome per request in order and the device seconds the batch
        used, or with the error that failed the whole batch. With ``after`` (the handle of a
        batch still on the device) the batch must not start before that one is done. Raise a
        GpuvisorError when the batch cannot be sent."""
        ...

    def revoke(self, handle: int) -> None:
        """Take back a batch that has not started: it keeps its place in the device's order but
        runs nothing, and its ``done`` gets None. A batch that started completes as usual."""
        ...

    def abort(self, handle: int, reason: str) -> None:
        """A batch holds the device far longer than any batch may (its model hangs): stop its
        worker. Its ``done`` then gets an error that gives ``reason``."""
        ...


BatchObserver = Callable[[SliceQueue, Sequence[PendingRequest], float], None]
"""Told of a batch: its slice's queue, its requests and a time (``on_start``: the monotonic
time its turn on the device came; ``on_complete``: the device seconds it used)."""


class DeviceDispatcher:
    """Decides which slice runs next on one device; ``concurrency`` batches may run at once.

    Decisions are made synchronously, on the event loop, at the moments they can change: a
    request arrives, a batch completes, or a timer (a batching delay, a fixed share's
    release, the lookahead) expires. No task sits between a decision and the worker.

    Lookahead: with ``lookahead`` > 0, once a running batch is predicted to end within
    ``lookahead`` seconds the next batch is decided and sent at once, to start the moment the
    running one is done (its worker hands the device straight to the next; see
    ``BatchRunner.start_batch``). The device then does not idle between batches for the
    round trip through the node. Each running batch has at most one batch staged behind it,
    so work that was decided early is bounded by one batch (one quantum for non-critical
    slices). Without lookahead, the next batch is decided when the device is free.

    Batch timeout: a batch that holds the device ``batch_timeout`` seconds (counted from when
    its turn came) is taken as hung, and its worker is stopped (``BatchRunner.abort``), so
    one tenant's stuck model cannot hold every other tenant's requests on the device.
    """

    def __init__(
        self,
        device_id: str,
        runner: BatchRunner,
        policy: DispatchPolicy | None = None,
        concurrency: int = 1,
        on_start: BatchObserver | None = None,
        on_complete: BatchObserver | None = None,
        lookahead: float = 0.0,
        batch_timeout: float = 60.0,
        on_hung: Callable[[SliceQueue], None] | None = None,
    ) -> None:
        if lookahead < 0:
            raise ValueError(f"the dispatch lookahead cannot be negative, got {lookahead}")
        if batch_timeout <= 0:
            raise ValueError(f"the batch timeout must be positive, got {batch_timeout}")
        self.batch_timeout = batch_timeout
        self._on_hung = on_hung
        self.device_id = device_id
        self.runner = runner
        self.policy: DispatchPolicy = policy or FifoPolicy()
        self.concurrency = max(1, concurrency)
        self.lookahead = lookahead
        self.queues: dict[str, SliceQueue] = {}
        self._on_start = on_start
        self._on_complete = on_complete
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._running = False
        self._pumping = False
        self._pump_soon = False
        self._grants: set[Grant] = set()  # batches on the device (running or staged)
        self._watchdog: asyncio.TimerHandle | None = None
        self._watchdog_at = float("inf")

    @property
    def in_flight(self) -> int:
        """Batches granted and not yet done, staged ones included."""
        return len(self._grants)

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
        _fail(queue.drain(), error)

    def fail_running(self, error: GpuvisorError) -> None:
        """Answer the requests of every batch on the device (running or staged) with
        ``error`` now; the batches go on, and what they answer later goes nowhere."""
        for grant in self._grants:
            _fail(grant.batch, error)

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
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
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
        """Grant every batch that may start (or be staged) now; return seconds until the next
        decision may grant one, or None when only a completion or an arrival can."""
        while True:
            base = None  # the running batch a staged batch would follow
            if len(self._grants) >= self.concurrency:
                base = staging_base(self._grants) if self.lookahead > 0 else None
                if base is None:
                    if self._preempt_staged(now):
                        continue
                    return None
            candidates = []
            next_ready = float("inf")
            for queue in self.queues.values():
                if not queue.items:
                    continue
                if queue.in_flight and not (
                    base is not None
                    and may_follow(self._grants, queue, base)
                    and may_stage(queue, self.policy.batch_rows(queue))
                ):
                    continue
                at = ready_at(queue)
                if at <= now:
                    candidates.append(queue)
                elif at < next_ready:
                    next_ready = at
            if base is not None:
                stage_at = base.end - self.lookahead
                if stage_at > now:  # too early to decide what follows the running batch
                    if candidates:
                        return stage_at - now
                    if next_ready == float("inf"):
                        return None
                    return max(next_ready, stage_at) - now
            chosen = self._choose(candidates, now) if candidates else None
            if chosen is None:
                if candidates:  # held back (a fixed share used up): look again when it may run
                    eligible = self.policy.next_eligible(candidates, now)
                    if eligible is not None:
                        next_ready = min(next_ready, eligible)
                return None if next_ready == float("inf") else max(0.0, next_ready - now)
            self._grant(chosen, take_batch(chosen, self.policy.batch_rows(chosen)), now, base)

    def _choose(self, candidates: list[SliceQueue], now: float) -> SliceQueue | None:
        try:
            return self.policy.choose(candidates, now)
        except Exception:  # a policy's bug must not stall every tenant on the device
            log.exception(
                "the dispatch policy failed on device %s: granting the oldest request instead",
                self.device_id,
            )
            return min(candidates, key=lambda q: (q.head_arrival, q.slice_id))

    def _preempts(self, critical: SliceQueue, staged: SliceQueue, now: float) -> bool:
        try:
            return self.policy.preempts(critical, staged, now)
        except Exception:  # a policy's bug must not stall the device: critical goes first
            log.exception("the dispatch policy failed on device %s", self.device_id)
            return True

    def _preempt_staged(self, now: float) -> bool:
        """A critical request is ready while a non-critical batch waits (staged) for the device:
        take that batch back (it keeps its place but runs nothing, and its requests return to
        the head of their queue), so the critical request waits for the running batch only.
        Return whether a batch was taken back."""
        for staged in self._grants:
            ahead = staged.after
            if (
                ahead is None
                or not may_take_back(staged)
                or staged.queue.latency_class == "critical"
            ):
                continue
            if not any(
                queue.latency_class == "critical"
                and queue.items
                and (not queue.in_flight or (queue.in_flight == 1 and ahead.queue is queue))
                and ready_at(queue) <= now
                and self._preempts(queue, staged.queue, now)
                for queue in self.queues.values()
            ):
                return False
            self._take_back(staged)
            return True
        return False

    def predict_completion(
        self, queue: SliceQueue, rows: int, now: float, priority: int = DEFAULT_PRIORITY
    ) -> float:
        """Predict the seconds until a request of ``rows`` and ``priority`` queued now on
        ``queue`` is answered.

        What runs on the device first, then the part of this slice's queue that goes before
        the request (the same or a higher priority) in batches of the size the policy grants
        it, each possibly preceded by one batch of another backlogged slice (its predicted
        cost, at most one quantum's worth as the policy sizes them). Not the batching delay:
        a request with a deadline does not wait for its batch to fill past the time its
        deadline leaves (``batching.ready_at``).
        """
        running = max((grant.end - now for grant in self._grants), default=0.0)
        size = max(1, self.policy.batch_rows(queue))
        predict = queue.profile.predict
        full, rest = divmod(queue.ahead_of(priority)[1], size)
        own, batches = full * predict(size), full
        if rest + rows <= size:  # it joins the last batch ahead of it, or one of its own
            own, batches = own + predict(rest + rows), batches + 1
        else:  # a request is never split: its rows run as one batch, however many
            own += (predict(rest) if rest else 0.0) + predict(rows)
            batches += 2 if rest else 1
        others = [
            q.profile.predict(max(1, self.policy.batch_rows(q)))
            for q in self.queues.values()
            if q is not queue and q.items
        ]
        interleave = (batches - 1) * max(others) if others and batches > 1 else 0.0
        return max(0.0, running) + own + interleave

    def withdraw(self, slice_id: str, request: PendingRequest) -> bool:
        """Take a request out before it runs (its deadline passed, or its client left): out of
        its slice's queue, or out of a batch staged behind the running one, which is taken back
        (its other requests queue again, first). It will spend no device time. False when it
        runs already (or is gone)."""
        queue = self.queues.get(slice_id)
        if queue is None:
            return False
        if queue.remove(request):
            return True
        staged = next((g for g in self._grants if any(r is request for r in g.batch)), None)
        if staged is None or not may_take_back(staged):
            return False
        request.withdrawn = True
        self._take_back(staged)
        return True

    def _take_back(self, staged: Grant) -> None:
        """Take a staged batch back: it keeps its place but runs nothing, and its requests
        return to the head of their queue when its worker reports it."""
        assert staged.after is not None
        staged.revoking = True
        staged.end = staged.after.end
        self.runner.revoke(staged.handle)

    def _grant(
        self,
        queue: SliceQueue,
        batch: list[PendingRequest],
        now: float,
        after: Grant | None = None,
    ) -> None:
        cost = queue.profile.predict(sum(r.rows for r in batch))
        grant = Grant(
            queue, cost, (after.end if after is not None else now) + cost, after, batch=batch
        )
        grant.started = now if after is None else None
        if after is not None:
            after.followed = True
        queue.in_flight += 1
        self._grants.add(grant)
        # Charged now, corrected by the measured time when the batch completes: a decision
        # made before then must already see this batch's device time.
        self._charge(queue, cost, now)
        if grant.started is not None:
            self._observe_start(grant)

        def done(result: Sequence[Outcome] | GpuvisorError | None, device_seconds: float) -> None:
            self._settle(grant, batch, result, device_seconds)
            self._pump()

        try:
            grant.handle = self.runner.start_batch(
                queue.slice_id, batch, done, after.handle if after is not None else None
            )
        except GpuvisorError as exc:
            self._settle(grant, batch, exc, 0.0, sent=False)
            return
        self._arm_watchdog(grant)

    # ---- the batch timeout ------------------------------------------------------------

    def _arm_watchdog(self, grant: Grant) -> None:
        """Look at ``grant`` again when it will have held the device for the batch timeout."""
        if grant.started is None or self._loop is None or not self._running:
            return
        at = grant.started + self.batch_timeout
        if at >= self._watchdog_at:
            return
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog_at = at
        delay = max(0.0, at - time.monotonic())
        self._watchdog = self._loop.call_later(delay, self._on_watchdog)

    def _on_watchdog(self) -> None:
        self._watchdog, self._watchdog_at = None, float("inf")
        now = time.monotonic()
        for grant in list(self._grants):
            if grant.started is None or grant.aborted or grant.revoking:
                continue
            held = now - grant.started
            if held < self.batch_timeout:
                self._arm_watchdog(grant)
                continue
            grant.aborted = True
            reason = (
                f"a batch of slice {grant.queue.slice_id} held device {self.device_id} for "
                f"{held:.3g}s, longer than the batch timeout ({self.batch_timeout:g}s, "
                "workers.batchTimeout)"
            )
            log.warning("%s: stopping its worker", reason, extra={"tenant": grant.queue.tenant})
            self.runner.abort(grant.handle, reason)
            if self._on_hung is not None:
                try:
                    self._on_hung(grant.queue)
                except Exception:  # an observer's bug must not stall the device
                    log.exception(
                        "counting the hung batch of slice %s failed", grant.queue.slice_id
                    )

    def _observe_start(self, grant: Grant) -> None:
        """Tell ``on_start`` that a batch's turn came: a staged batch's turn comes when the
        node learns that the batch before it is done, not when it was staged."""
        if self._on_start is None or grant.started is None:
            return
        try:
            self._on_start(grant.queue, grant.batch, grant.started)
        except Exception:  # an observer's bug must not stall the device
            log.exception("observing the batch of slice %s failed", grant.queue.slice_id)

    def _charge(self, queue: SliceQueue, seconds: float, now: float) -> None:
        try:
            self.policy.charge(queue, seconds, now)
        except Exception:  # a policy's bug must not stall the device
            log.exception("charging slice %s failed", queue.slice_id)

    def _settle(
        self,
        grant: Grant,
        batch: list[PendingRequest],
        result: Sequence[Outcome] | GpuvisorError | None,
        device_seconds: float,
        sent: bool = True,
    ) -> None:
        """Resolve the batch's requests (or queue them again when it was revoked), free the
        device and charge the slice. ``sent``: False when the batch never reached a worker."""
        if grant not in self._grants:
            return
        queue = grant.queue
        queue.in_flight -= 1
        self._grants.discard(grant)
        now = time.monotonic()
        if grant.after is not None:
            if sent:
                # Its turn came, so the batch it followed is off the device even if that one's
                # reply is still on its way (replies of two workers can cross): nothing may be
                # staged behind it any more.
                grant.after.ended = True
            else:
                grant.after.followed = False
        for other in list(self._grants):  # what waited behind this batch starts now
            if other.after is grant:
                other.after = None
                other.end = now + (0.0 if other.revoking else other.cost)
                other.started = now
                if not other.revoking:  # a batch taken back runs nothing
                    self._observe_start(other)
                self._arm_watchdog(other)
        ran = result is not None and not isinstance(result, GpuvisorError)
        if grant.started is None and sent and ran:
            # Its reply overtook that of the batch it followed (two workers' replies can
            # cross): its turn came before now, when it started running.
            grant.started = now - device_seconds
            self._observe_start(grant)
        removed = self.queues.get(queue.slice_id) is not queue  # its slice left the device
        if result is None:  # revoked before it started: the requests queue again, first
            if removed:  # no queue will run them: they are answered now
                _fail(batch, Unavailable(f"slice {queue.slice_id} left device {self.device_id}"))
                return
            queue.requeue([r for r in batch if not r.withdrawn])
            self._charge(queue, -grant.cost, now)
            return
        failed = isinstance(result, GpuvisorError)
        if isinstance(result, GpuvisorError):
            # No measurement came back, but the batch held the device from its turn until now
            # (a worker that crashed or hung): its slice is charged for that time.
            started = grant.started if sent else None
            device_seconds = now - started if started is not None else 0.0
            _fail(batch, result)
        else:
            for request, outcome in zip(batch, result):
                if request.future is not None and not request.future.done():
                    request.future.set_result(outcome)
        if not removed:  # a slice the policy forgot is not brought back by a late charge
            self._charge(queue, device_seconds - grant.cost, now)
        try:
            if device_seconds > 0 and not failed:
                queue.profile.observe(sum(r.rows for r in batch), device_seconds)
            if self._on_complete is not None:
                self._on_complete(queue, batch, device_seconds)
        except Exception:  # an observer's bug must not stall the device
            log.exception("accounting the batch of slice %s failed", queue.slice_id)


def _fail(requests: Iterable[PendingRequest], error: GpuvisorError) -> None:
    """Answer each request not answered yet with ``error``."""
    for request in requests:
        if request.future is not None and not request.future.done():
            request.future.set_exception(error)
