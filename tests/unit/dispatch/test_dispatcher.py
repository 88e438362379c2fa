"""The device dispatcher loop: one batch at a time, oldest first, batching what waits."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from typing import Any

import pytest

from gpuvisor.dispatch.dispatcher import BatchCallback, DeviceDispatcher
from gpuvisor.dispatch.policy import FifoPolicy
from gpuvisor.dispatch.profiles import ExecutionProfile
from gpuvisor.dispatch.queues import Outcome, PendingRequest, SliceQueue
from gpuvisor.errors import Unavailable, WorkerCrashed


class RecordingRunner:
    """A BatchRunner that takes ``seconds`` per batch and records what ran, and how many at once.

    A batch sent ``after`` another starts the moment that one is done, as a worker waiting
    for the device's handoff would; one taken back (``revoke``) before then runs nothing.
    """

    def __init__(self, seconds: float = 0.01, fail_slice: str | None = None) -> None:
        self.seconds = seconds
        self.fail_slice = fail_slice
        self.batches: list[tuple[str, list[int]]] = []  # in the order they started
        self.sent_after: list[int | None] = []
        self.revoked: list[int] = []  # batches taken back before they started
        self.running = 0
        self.max_running = 0
        self._handles = itertools.count(1)
        self._finished: dict[int, asyncio.Event] = {}
        self._started: set[int] = set()
        self._taken_back: set[int] = set()
        self._waiting: dict[int, list[tuple[int, str, list[int]]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def revoke(self, handle: int) -> None:
        if handle not in self._started:
            self._taken_back.add(handle)

    def start_batch(
        self,
        slice_id: str,
        batch: Sequence[PendingRequest],
        done: BatchCallback,
        after: int | None = None,
    ) -> int:
        handle = next(self._handles)
        self._finished[handle] = asyncio.Event()
        self.sent_after.append(after)
        ids = [r.request_id for r in batch]
        if after is None or self._finished[after].is_set():
            self._start(handle, slice_id, ids)
        else:
            self._waiting.setdefault(after, []).append((handle, slice_id, ids))
        task = asyncio.get_running_loop().create_task(
            self._run(handle, slice_id, batch, done, after)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return handle

    def _start(self, handle: int, slice_id: str, ids: list[int]) -> None:
        if handle in self._taken_back:
            return
        self._started.add(handle)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        self.batches.append((slice_id, ids))

    async def _run(
        self,
        handle: int,
        slice_id: str,
        batch: Sequence[PendingRequest],
        done: BatchCallback,
        after: int | None,
    ) -> None:
        if after is not None:
            await self._finished[after].wait()
        if handle in self._taken_back:
            self.revoked.append(handle)
            self._finish(handle)
            done(None, 0.0)
            return
        await asyncio.sleep(self.seconds)
        self.running -= 1
        self._finish(handle)
        if slice_id == self.fail_slice:
            done(WorkerCrashed("worker exited"), 0.0)
        else:
            done([Outcome(200, f"{slice_id}:{r.request_id}".encode()) for r in batch], self.seconds)

    def _finish(self, handle: int) -> None:
        """The device passes at once to what waited behind this batch."""
        self._finished[handle].set()
        for waiter in self._waiting.pop(handle, []):
            if waiter[0] in self._taken_back:
                self._finish(waiter[0])  # an empty batch hands straight on
            else:
                self._start(*waiter)


def _queue(name: str, max_batch: int = 8, delay: float = 0.0) -> SliceQueue:
    return SliceQueue(
        name, name, name, "default", "p", max_batch_size=max_batch, max_queue_delay=delay
    )


def _request(i: int) -> PendingRequest:
    return PendingRequest(
        request_id=i, tenant="t", body=b"", header_length=-1, arrival=time.monotonic()
    )


async def _run(dispatcher: DeviceDispatcher, submissions: list[tuple[str, int]]) -> list[Outcome]:
    dispatcher.start()
    try:
        futures = [dispatcher.submit(s, _request(i)) for s, i in submissions]
        return list(await asyncio.gather(*futures))
    finally:
        await dispatcher.stop()


@pytest.mark.parametrize("concurrency", [1, 2])
def test_concurrency_bounds_batches_on_the_device(concurrency: int) -> None:
    runner = RecordingRunner()
    dispatcher = DeviceDispatcher("cpu-0", runner, concurrency=concurrency)
    for name in ("a", "b", "c"):
        dispatcher.add_slice(_queue(name, max_batch=1))
    outcomes = asyncio.run(_run(dispatcher, [(n, i) for i in range(3) for n in ("a", "b", "c")]))
    assert len(outcomes) == 9 and all(o.status == 200 for o in outcomes)
    assert runner.max_running == concurrency


def test_requests_waiting_behind_a_batch_are_batched_together() -> None:
    runner = RecordingRunner(seconds=0.02)
    dispatcher = DeviceDispatcher("cpu-0", runner)
    dispatcher.add_slice(_queue("a", max_batch=8))
    outcomes = asyncio.run(_run(dispatcher, [("a", i) for i in range(9)]))
    assert [o.body for o in outcomes] == [f"a:{i}".encode() for i in range(9)]
    assert [ids for _, ids in runner.batches] == [[0, 1, 2, 3, 4, 5, 6, 7], [8]]


def test_max_queue_delay_waits_to_fill_a_batch() -> None:
    runner = RecordingRunner(seconds=0.001)
    dispatcher = DeviceDispatcher("cpu-0", runner)
    dispatcher.add_slice(_queue("a", max_batch=4, delay=0.05))

    async def scenario() -> None:
        dispatcher.start()
        first = dispatcher.submit("a", _request(0))
        await asyncio.sleep(0.01)
        second = dispatcher.submit("a", _request(1))
        await asyncio.gather(first, second)
        await dispatcher.stop()

    asyncio.run(scenario())
    assert [ids for _, ids in runner.batches] == [[0, 1]]


def test_fifo_across_slices() -> None:
    runner = RecordingRunner()
    dispatcher = DeviceDispatcher("cpu-0", runner)
    for name in ("a", "b"):
        dispatcher.add_slice(_queue(name, max_batch=1))
    asyncio.run(_run(dispatcher, [("b", 0), ("a", 1), ("b", 2)]))
    assert [ids[0] for _, ids in runner.batches] == [0, 1, 2]


def test_a_failing_worker_fails_only_its_own_requests() -> None:
    runner = RecordingRunner(fail_slice="a")
    dispatcher = DeviceDispatcher("cpu-0", runner)
    for name in ("a", "b"):
        dispatcher.add_slice(_queue(name, max_batch=1))

    async def scenario() -> list[object]:
        dispatcher.start()
        futures = [dispatcher.submit(s, _request(i)) for i, s in enumerate(["a", "b", "a", "b"])]
        results = await asyncio.gather(*futures, return_exceptions=True)
        await dispatcher.stop()
        return list(results)

    results = asyncio.run(scenario())
    assert isinstance(results[0], WorkerCrashed) and isinstance(results[2], WorkerCrashed)
    assert isinstance(results[1], Outcome) and isinstance(results[3], Outcome)


def test_removing_a_slice_fails_what_it_had_queued() -> None:
    runner = RecordingRunner(seconds=0.05)
    dispatcher = DeviceDispatcher("cpu-0", runner)
    dispatcher.add_slice(_queue("a", max_batch=1))

    async def scenario() -> list[object]:
        dispatcher.start()
        futures = [dispatcher.submit("a", _request(i)) for i in range(3)]
        await asyncio.sleep(0.01)  # request 0 is running, 1 and 2 wait
        dispatcher.remove_slice("a", WorkerCrashed("gone"))
        results = await asyncio.gather(*futures, return_exceptions=True)
        await dispatcher.stop()
        return list(results)

    results = asyncio.run(scenario())
    assert isinstance(results[0], Outcome)
    assert all(isinstance(r, WorkerCrashed) for r in results[1:])


def test_withdraw_takes_out_a_queued_request_but_not_a_running_one() -> None:
    runner = RecordingRunner(seconds=0.05)
    dispatcher = DeviceDispatcher("cpu-0", runner)
    dispatcher.add_slice(_queue("a", max_batch=1))

    async def scenario() -> tuple[bool, bool, list[object]]:
        dispatcher.start()
        first, second = _request(0), _request(1)
        futures = [dispatcher.submit("a", first), dispatcher.submit("a", second)]
        await asyncio.sleep(0.01)  # request 0 runs, 1 waits
        running = dispatcher.withdraw("a", first)
        queued = dispatcher.withdraw("a", second)
        futures[1].cancel()
        done = await asyncio.gather(futures[0], return_exceptions=True)
        await asyncio.sleep(0.08)
        await dispatcher.stop()
        return running, queued, list(done)

    running, queued, done = asyncio.run(scenario())
    assert not running and queued
    assert isinstance(done[0], Outcome)
    assert [ids for _, ids in runner.batches] == [[0]], "a withdrawn request never runs"


class HoldingPolicy(FifoPolicy):
    """Holds every slice back until ``release_at`` (as a used-up fixed share would)."""

    def __init__(self, release_at: float) -> None:
        self.release_at = release_at

    def choose(self, candidates: Sequence[SliceQueue], now: float) -> SliceQueue | None:
        return super().choose(candidates, now) if now >= self.release_at else None

    def next_eligible(self, candidates: Sequence[SliceQueue], now: float) -> float | None:
        return self.release_at if now < self.release_at else None


def test_a_held_back_slice_runs_when_the_policy_says_it_may() -> None:
    runner = RecordingRunner(seconds=0.001)

    async def scenario() -> float:
        release = time.monotonic() + 0.05
        dispatcher = DeviceDispatcher("cpu-0", runner, HoldingPolicy(release))
        dispatcher.add_slice(_queue("a", max_batch=1))
        dispatcher.start()
        await dispatcher.submit("a", _request(0))
        finished = time.monotonic()
        await dispatcher.stop()
        return finished - release

    late = asyncio.run(scenario())
    assert 0 <= late < 0.5, "granted once released, by the dispatcher's own timer"


def test_completions_keep_the_execution_profile_current() -> None:
    runner = RecordingRunner(seconds=0.02)
    dispatcher = DeviceDispatcher("cpu-0", runner)
    queue = _queue("a", max_batch=4)
    dispatcher.add_slice(queue)
    asyncio.run(_run(dispatcher, [("a", i) for i in range(4)]))
    assert queue.profile.predict(4) == pytest.approx(0.02)


def test_predicted_completion_counts_what_waits_ahead() -> None:
    dispatcher = DeviceDispatcher("cpu-0", RecordingRunner())
    queue = _queue("a", max_batch=2)
    queue.profile = ExecutionProfile({1: 0.001, 2: 0.002})
    dispatcher.add_slice(queue)
    for i in range(3):
        queue.push(_request(i))
    # 3 queued + 1 new = two full batches of 2 rows
    assert dispatcher.predict_completion(queue, 1, time.monotonic()) == pytest.approx(0.004)


def test_a_request_larger_than_a_quantums_batch_is_predicted_as_the_one_batch_it_runs_in() -> None:
    """A request is never split: 16 rows where the quantum fits 1 run as one 16-row batch
    (12 ms), not as 16 one-row batches (55 ms, refused as infeasible)."""
    from gpuvisor.dispatch.fairshare import FairSharePolicy

    dispatcher = DeviceDispatcher("cpu-0", RecordingRunner(), FairSharePolicy(quantum=0.002))
    queue = _queue("a", max_batch=16)
    queue.profile = ExecutionProfile({1: 0.0034, 16: 0.0121})
    dispatcher.add_slice(queue)
    now = time.monotonic()
    assert dispatcher.policy.batch_rows(queue) == 1
    assert dispatcher.predict_completion(queue, 16, now) == pytest.approx(0.0121)
    queue.push(_request(0))  # one row ahead: its own batch, then the request's
    assert dispatcher.predict_completion(queue, 16, now) == pytest.approx(0.0034 + 0.0121)


def test_predicted_completion_counts_only_what_goes_before_the_request() -> None:
    """A priority-1 request waits behind priority-1 requests only; the batching delay is not
    counted (a batch with a deadline in it does not wait past it)."""
    dispatcher = DeviceDispatcher("cpu-0", RecordingRunner())
    queue = _queue("a", max_batch=2, delay=0.1)
    queue.profile = ExecutionProfile({1: 0.001, 2: 0.002})
    dispatcher.add_slice(queue)
    for i in range(40):
        queue.push(_request(i))
    now = time.monotonic()
    assert dispatcher.predict_completion(queue, 1, now) == pytest.approx(0.041)  # 20 × 2 + 1
    assert dispatcher.predict_completion(queue, 1, now, priority=1) == pytest.approx(0.001)


def test_a_failing_policy_does_not_stall_the_device(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(FifoPolicy):
        def choose(self, candidates: Sequence[SliceQueue], now: float) -> SliceQueue | None:
            raise ZeroDivisionError("float division by zero")

    runner = RecordingRunner(seconds=0.001)
    dispatcher = DeviceDispatcher("cpu-0", runner, Broken())
    dispatcher.add_slice(_queue("a"))
    dispatcher.add_slice(_queue("b"))
    asyncio.run(_run(dispatcher, [("a", 0), ("b", 1), ("a", 2)]))
    assert sorted(i for _, ids in runner.batches for i in ids) == [0, 1, 2]
    assert "the dispatch policy failed on device cpu-0" in caplog.text


# ---- lookahead ----------------------------------------------------------------------------


def _profiled(name: str, seconds: float, **settings: object) -> SliceQueue:
    queue = SliceQueue(name, name, name, "default", "p", max_batch_size=1, **settings)  # type: ignore[arg-type]
    queue.profile = ExecutionProfile({1: seconds})
    return queue


async def _gather(dispatcher: DeviceDispatcher, futures: list[asyncio.Future[Outcome]]) -> None:
    try:
        outcomes = await asyncio.gather(*futures)
        assert all(o.status == 200 for o in outcomes)
    finally:
        await dispatcher.stop()


@pytest.mark.parametrize("lookahead", [0.0, 0.02])
def test_lookahead_sends_the_next_batch_before_the_running_one_ends(lookahead: float) -> None:
    runner = RecordingRunner(seconds=0.03)
    most = 0
    start_batch = runner.start_batch

    def sent(*args: Any, **kwargs: Any) -> int:
        nonlocal most
        most = max(most, dispatcher.in_flight)
        return start_batch(*args, **kwargs)

    runner.start_batch = sent  # type: ignore[method-assign]
    dispatcher = DeviceDispatcher("cpu-0", runner, lookahead=lookahead)
    dispatcher.add_slice(_profiled("a", 0.03))

    async def scenario() -> None:
        dispatcher.start()
        await _gather(dispatcher, [dispatcher.submit("a", _request(i)) for i in range(6)])

    asyncio.run(scenario())
    assert len(runner.batches) == 6 and runner.max_running == 1
    staged = [after for after in runner.sent_after if after is not None]
    if lookahead:
        # every batch but the first was sent while the one before it still ran, and never
        # more than one batch waited behind a running one
        assert len(staged) == 5 and most == 2
    else:
        assert staged == [] and most == 1


@pytest.mark.parametrize("lookahead", [0.0, 0.05])
def test_a_batch_is_observed_when_its_turn_comes_not_when_it_is_staged(
    lookahead: float,
) -> None:
    """The queue-wait metric runs from admission to the batch's turn on the device: a batch
    staged early behind a running one has not started waiting less."""
    runner = RecordingRunner(seconds=0.03)
    observed: list[tuple[list[int], float]] = []

    def started(queue: SliceQueue, batch: Sequence[PendingRequest], at: float) -> None:
        observed.append(([r.request_id for r in batch], at - batch[0].arrival))

    dispatcher = DeviceDispatcher("cpu-0", runner, lookahead=lookahead, on_start=started)
    dispatcher.add_slice(_profiled("a", 0.03))

    async def scenario() -> None:
        dispatcher.start()
        await _gather(dispatcher, [dispatcher.submit("a", _request(i)) for i in range(3)])

    asyncio.run(scenario())
    assert [ids for ids, _ in observed] == [[0], [1], [2]], "each batch is observed once"
    waits = [wait for _, wait in observed]
    assert waits[0] < 0.02
    # the second and third waited behind one and two 30 ms batches, staged or not
    assert waits[1] >= 0.025 and waits[2] >= 0.055, waits


def test_a_staged_batch_whose_reply_comes_first_is_observed_all_the_same() -> None:
    """Two workers' replies can cross: the batch staged behind another one may be answered
    before it. Its requests still waited, and the queue-wait metric still sees them."""
    from gpuvisor.dispatch.fairshare import FairSharePolicy

    runner = ManualRunner()
    observed: list[int] = []
    dispatcher = DeviceDispatcher(
        "cpu-0",
        runner,
        FairSharePolicy(quantum=0.01),
        lookahead=10.0,
        on_start=lambda q, batch, at: observed.extend(r.request_id for r in batch),
    )
    dispatcher.add_slice(_profiled("a", 0.001))
    dispatcher.add_slice(_profiled("b", 0.001))

    async def scenario() -> None:
        dispatcher.start()
        first, second = dispatcher.submit("a", _request(1)), dispatcher.submit("b", _request(2))
        await asyncio.sleep(0.01)
        assert [(h, s, after) for h, s, _, after in runner.sent] == [(1, "a", None), (2, "b", 1)]
        runner.finish(2)  # b's reply first
        runner.finish(1)
        assert (await first).status == 200 and (await second).status == 200
        await dispatcher.stop()

    asyncio.run(scenario())
    assert sorted(observed) == [1, 2]


def _one_slice_of_four(name: str, latency_class: str) -> tuple[RecordingRunner, DeviceDispatcher]:
    """A dispatcher with a 30 ms lookahead and one slice whose batches of 1-4 rows take 30 ms."""
    runner = RecordingRunner(seconds=0.03)
    dispatcher = DeviceDispatcher("cpu-0", runner, lookahead=0.03)
    queue = SliceQueue(
        name, name, name, "default", "p", max_batch_size=4, latency_class=latency_class
    )  # type: ignore[arg-type]
    queue.profile = ExecutionProfile({1: 0.03, 2: 0.03, 4: 0.03})
    dispatcher.add_slice(queue)
    return runner, dispatcher


def test_a_slice_stages_behind_its_own_batch_only_a_full_batch() -> None:
    """Staged behind its own running batch, a part-filled batch would cost the requests that
    arrive meanwhile a trip of their own: the slice waits for the running batch instead."""
    runner, dispatcher = _one_slice_of_four("a", "standard")

    async def scenario() -> None:
        dispatcher.start()
        futures = [dispatcher.submit("a", _request(0))]  # runs alone
        await asyncio.sleep(0.005)
        futures += [dispatcher.submit("a", _request(i)) for i in (1, 2)]  # 2 of 4: not staged
        await asyncio.sleep(0.005)
        assert runner.sent_after == [None]
        futures += [dispatcher.submit("a", _request(i)) for i in (3, 4, 5, 6, 7)]  # 4 and more
        await asyncio.sleep(0.005)
        assert runner.sent_after == [None, 1], "a full batch is staged behind the running one"
        await _gather(dispatcher, futures)

    asyncio.run(scenario())
    assert [ids for _, ids in runner.batches] == [[0], [1, 2, 3, 4], [5, 6, 7]]


def test_a_critical_slice_stages_behind_its_own_batch_at_once() -> None:
    runner, dispatcher = _one_slice_of_four("c", "critical")

    async def scenario() -> None:
        dispatcher.start()
        futures = [dispatcher.submit("c", _request(0))]
        await asyncio.sleep(0.005)
        futures.append(dispatcher.submit("c", _request(1)))  # 1 of 4, staged all the same
        await asyncio.sleep(0.005)
        assert runner.sent_after == [None, 1]
        await _gather(dispatcher, futures)

    asyncio.run(scenario())
    assert [ids for _, ids in runner.batches] == [[0], [1]]


def test_a_critical_request_takes_the_place_of_a_staged_batch() -> None:
    from gpuvisor.dispatch.fairshare import FairSharePolicy

    runner = RecordingRunner(seconds=0.02)
    # a bulk batch is staged behind the running one for all but its first 2 ms, so that
    # most arrivals find one to take back even on a busy machine
    dispatcher = DeviceDispatcher("cpu-0", runner, FairSharePolicy(quantum=0.02), lookahead=0.018)
    dispatcher.add_slice(_profiled("bulk", 0.02, latency_class="batch"))
    dispatcher.add_slice(_profiled("chat", 0.02, latency_class="critical", share=0.5))
    started_before: list[int] = []

    async def scenario() -> None:
        dispatcher.start()
        futures = [dispatcher.submit("bulk", _request(i)) for i in range(12)]
        for i in range(4):
            await asyncio.sleep(0.045 + 0.007 * i)  # land at different points of a bulk batch
            started_before.append(len(runner.batches))
            futures.append(dispatcher.submit("chat", _request(100 + i)))
        await _gather(dispatcher, futures)

    asyncio.run(scenario())
    starts = [name for name, _ in runner.batches]
    chat_starts = [i for i, name in enumerate(starts) if name == "chat"]
    assert len(chat_starts) == 4
    for before, at in zip(started_before, chat_starts, strict=True):
        # what had started when the request arrived (the running batch), then the critical
        # request: a bulk batch staged behind the running one is taken back, not run first.
        # Only one that starts in the same instant as the request arrives (the device was
        # handed over before the revoke could reach it) goes ahead of it.
        assert at <= before + 1, (starts, started_before)
    assert runner.revoked, "no staged batch was taken back: the test did not exercise it"
    # the batches taken back ran later, whole: every bulk request was answered exactly once
    bulk = [i for name, ids in runner.batches if name == "bulk" for i in ids]
    assert sorted(bulk) == list(range(12))


def test_a_critical_request_behind_its_own_running_batch_also_preempts_a_staged_one() -> None:
    from gpuvisor.dispatch.fairshare import FairSharePolicy

    runner = RecordingRunner(seconds=0.03)
    dispatcher = DeviceDispatcher("cpu-0", runner, FairSharePolicy(quantum=0.03), lookahead=0.02)
    dispatcher.add_slice(_profiled("bulk", 0.03, latency_class="batch"))
    dispatcher.add_slice(_profiled("chat", 0.03, latency_class="critical", share=0.5))

    async def scenario() -> None:
        dispatcher.start()
        futures = [dispatcher.submit("chat", _request(100))]  # runs at once: the device is idle
        await asyncio.sleep(0.002)
        futures += [dispatcher.submit("bulk", _request(i)) for i in range(4)]
        await asyncio.sleep(0.018)  # bulk is staged behind the running chat batch by now
        assert [after for after in runner.sent_after if after is not None], "nothing staged"
        futures.append(dispatcher.submit("chat", _request(101)))
        await _gather(dispatcher, futures)

    asyncio.run(scenario())
    assert [ids for _, ids in runner.batches[:2]] == [[100], [101]], runner.batches
    assert runner.revoked


class ManualRunner:
    """A BatchRunner whose batches complete when the test says, in the order it chooses."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, str, list[int], int | None]] = []  # handle, slice, ids, after
        self.pending: dict[int, tuple[Sequence[PendingRequest], BatchCallback]] = {}
        self.revoked: list[int] = []
        self.aborted: list[tuple[int, str]] = []
        self._handles = itertools.count(1)

    def start_batch(
        self,
        slice_id: str,
        batch: Sequence[PendingRequest],
        done: BatchCallback,
        after: int | None = None,
    ) -> int:
        handle = next(self._handles)
        self.sent.append((handle, slice_id, [r.request_id for r in batch], after))
        self.pending[handle] = (batch, done)
        return handle

    def revoke(self, handle: int) -> None:
        self.revoked.append(handle)

    def abort(self, handle: int, reason: str) -> None:
        self.aborted.append((handle, reason))

    def finish(self, handle: int, revoked: bool = False) -> None:
        batch, done = self.pending.pop(handle)
        done(None if revoked else [Outcome(200, b"") for _ in batch], 0.0 if revoked else 0.001)


def _bulk_and_chat() -> tuple[ManualRunner, DeviceDispatcher]:
    """A batch slice and a critical one (share 0.5) on a fair-share device whose lookahead
    stages a batch behind every running one at once."""
    from gpuvisor.dispatch.fairshare import FairSharePolicy

    runner = ManualRunner()
    dispatcher = DeviceDispatcher("cpu-0", runner, FairSharePolicy(quantum=0.01), lookahead=10.0)
    dispatcher.add_slice(_profiled("bulk", 0.001, latency_class="batch"))
    dispatcher.add_slice(_profiled("chat", 0.001, latency_class="critical", share=0.5))
    return runner, dispatcher


def test_nothing_is_staged_behind_a_batch_whose_successor_already_replied() -> None:
    """Replies of two workers can cross: the successor of a batch may report before the batch
    itself. The batch is off the device by then, so nothing may be staged behind it (that would
    start at once, beside whatever followed it)."""
    runner, dispatcher = _bulk_and_chat()

    async def scenario() -> None:
        dispatcher.start()
        futures = [dispatcher.submit("bulk", _request(i)) for i in range(4)]
        await asyncio.sleep(0)  # the deferred decision: R runs, S is staged behind it
        assert [(h, s, a) for h, s, _, a in runner.sent] == [(1, "bulk", None), (2, "bulk", 1)]
        futures.append(dispatcher.submit("chat", _request(100)))
        await asyncio.sleep(0)  # S is taken back, the critical batch C waits behind it
        assert runner.revoked == [2]
        assert runner.sent[2][1:] == ("chat", [100], 2)
        runner.finish(2, revoked=True)  # S's reply comes before R's
        assert all(after != 1 for *_, after in runner.sent[3:]), runner.sent
        for _ in range(20):  # then everything completes in order
            if not runner.pending:
                break
            runner.finish(min(runner.pending))
            await asyncio.sleep(0)
        await _gather(dispatcher, futures)

    asyncio.run(scenario())
    ran = sorted(i for h, _, ids, _ in runner.sent if h not in runner.revoked for i in ids)
    assert ran == [0, 1, 2, 3, 100]  # each request ran once; the taken-back ones later


def test_a_batch_is_staged_behind_one_that_waits_only_for_a_taken_back_batch() -> None:
    """The critical batch C that took the place of a taken-back batch S is next on the device
    (S will run nothing): what follows C is decided and sent without waiting for S's reply."""
    runner, dispatcher = _bulk_and_chat()

    async def scenario() -> None:
        dispatcher.start()
        futures = [dispatcher.submit("bulk", _request(i)) for i in range(4)]
        await asyncio.sleep(0)  # R (1) runs, S (2) is staged behind it
        futures.append(dispatcher.submit("chat", _request(100)))
        await asyncio.sleep(0)  # S is taken back; C (3) waits behind it; the next bulk batch
        # (4) is staged behind C at once, before any reply has come
        assert runner.revoked == [2]
        assert [(h, s, a) for h, s, _, a in runner.sent[2:]] == [(3, "chat", 2), (4, "bulk", 3)]
        while runner.pending:
            runner.finish(min(runner.pending), revoked=min(runner.pending) == 2)
            await asyncio.sleep(0)
        await _gather(dispatcher, futures)

    asyncio.run(scenario())


def test_withdrawing_a_request_of_a_staged_batch_takes_the_batch_back() -> None:
    """A request whose deadline passes (or whose client leaves) while its batch is staged
    behind the running one never runs: the staged batch is taken back, the request is left
    out, and the batch's other requests queue again and run. A request of the running batch
    cannot be withdrawn."""
    runner, dispatcher = _bulk_and_chat()
    requests = [_request(i) for i in range(3)]

    async def scenario() -> tuple[bool, bool]:
        dispatcher.start()
        futures = [dispatcher.submit("bulk", r) for r in requests]
        await asyncio.sleep(0)  # R (1: request 0) runs, S (2: request 1) is staged behind it
        assert [(h, ids, a) for h, _, ids, a in runner.sent] == [(1, [0], None), (2, [1], 1)]
        running = dispatcher.withdraw("bulk", requests[0])
        staged = dispatcher.withdraw("bulk", requests[1])
        futures[1].cancel()  # as the node answers it
        assert runner.revoked == [2]
        runner.finish(1)
        runner.finish(2, revoked=True)
        for _ in range(20):  # what is left runs, in order
            if not runner.pending:
                break
            runner.finish(min(runner.pending))
            await asyncio.sleep(0)
        await _gather(dispatcher, [futures[0], futures[2]])
        return running, staged

    running, staged = asyncio.run(scenario())
    assert not running and staged
    ran = [i for h, _, ids, _ in runner.sent if h not in runner.revoked for i in ids]
    assert ran == [0, 2], runner.sent  # request 1 never ran, and never queued again


def test_a_batch_that_holds_the_device_past_the_timeout_has_its_worker_stopped() -> None:
    """The batch timeout counts from when a batch's turn came: the batch staged behind a hung
    one is not blamed for the wait, and goes on once the hung one's worker is gone."""
    from gpuvisor.dispatch.fairshare import FairSharePolicy

    runner = ManualRunner()
    charged: list[tuple[str, float]] = []
    dispatcher = DeviceDispatcher(
        "cpu-0",
        runner,
        FairSharePolicy(quantum=0.01),
        lookahead=10.0,
        batch_timeout=0.2,
        on_complete=lambda queue, _, seconds: charged.append((queue.slice_id, seconds)),
    )
    dispatcher.add_slice(_profiled("bulk", 0.001, latency_class="batch"))
    dispatcher.add_slice(_profiled("chat", 0.001, latency_class="critical", share=0.5))

    async def scenario() -> None:
        dispatcher.start()
        hung = dispatcher.submit("bulk", _request(1))
        await asyncio.sleep(0.01)
        chat = dispatcher.submit("chat", _request(2))
        await asyncio.sleep(0.01)
        assert [(h, s, after) for h, s, _, after in runner.sent] == [
            (1, "bulk", None),
            (2, "chat", 1),
        ]
        await asyncio.sleep(0.1)
        assert runner.aborted == []  # 0.12 s: not yet
        await asyncio.sleep(0.15)
        [(handle, reason)] = runner.aborted
        assert handle == 1
        assert reason.startswith("a batch of slice bulk held device cpu-0 for 0.2")
        assert reason.endswith("longer than the batch timeout (0.2s, workers.batchTimeout)")
        # the pool kills the worker: its batch fails; the staged one's turn comes now
        _, done = runner.pending.pop(1)
        done(WorkerCrashed(reason), 0.0)
        with pytest.raises(WorkerCrashed):
            await hung
        # no measurement came back, but the hung batch held the device: its slice pays for it
        [(slice_id, seconds)] = charged
        assert slice_id == "bulk" and 0.2 <= seconds < 1.0, charged
        await asyncio.sleep(0.1)
        assert len(runner.aborted) == 1  # chat waited 0.27 s in all, but ran for 0.1 s only
        runner.finish(2)
        assert (await chat).status == 200
        await asyncio.sleep(0.3)
        assert len(runner.aborted) == 1
        await dispatcher.stop()

    asyncio.run(scenario())


def test_the_batch_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="the batch timeout must be positive, got 0"):
        DeviceDispatcher("cpu-0", ManualRunner(), batch_timeout=0)


def test_failing_the_running_batches_answers_their_requests_now() -> None:
    """A stopping node answers what still runs before its server gives up on it: the batch
    goes on, and its late answer goes nowhere."""
    runner = RecordingRunner(seconds=0.05)
    dispatcher = DeviceDispatcher("cpu-0", runner)
    dispatcher.add_slice(_queue("a"))

    async def scenario() -> None:
        dispatcher.start()
        future = dispatcher.submit("a", _request(0))
        await asyncio.sleep(0.01)  # running
        dispatcher.fail_running(Unavailable("the node is stopping"))
        with pytest.raises(Unavailable, match="the node is stopping"):
            await future
        await asyncio.sleep(0.08)  # the batch ends; nothing breaks on its late answer
        assert dispatcher.in_flight == 0
        await dispatcher.stop()

    asyncio.run(scenario())
    assert [ids for _, ids in runner.batches] == [[0]]


def test_a_critical_flood_over_its_share_does_not_starve_a_guaranteed_slice() -> None:
    """With lookahead, a critical slice with no share took back every batch staged for a
    standard slice with half the device guaranteed: the standard slice ran once in 3 s."""
    from gpuvisor.dispatch.fairshare import FairSharePolicy

    runner = RecordingRunner(seconds=0.005)
    dispatcher = DeviceDispatcher("cpu-0", runner, FairSharePolicy(0.005), lookahead=0.002)
    critical = _profiled("crit", 0.005, latency_class="critical")
    standard = _profiled("std", 0.005, share=0.5)
    dispatcher.add_slice(critical)
    dispatcher.add_slice(standard)
    done = {"crit": 0, "std": 0}

    async def client(slice_id: str, stop: float) -> None:
        i = 0
        while time.monotonic() < stop:
            i += 1
            await dispatcher.submit(slice_id, _request(i))
            done[slice_id] += 1

    async def scenario() -> None:
        dispatcher.start()
        stop = time.monotonic() + 1.0
        await asyncio.gather(*(client("crit", stop) for _ in range(20)), client("std", stop))
        await dispatcher.stop()

    asyncio.run(scenario())
    # one standard client, one request at a time: it gets a batch about every other turn
    assert done["std"] >= 0.25 * (done["crit"] + done["std"]), done


def test_a_slice_removed_while_its_batches_are_on_the_device_leaves_nothing_behind() -> None:
    """Its running batch's late charge does not bring it back into the policy (where a
    fixed-share slice would shrink the others' 1/N cap for good), and the requests of a
    batch of it that was taken back are answered, not left waiting for a queue that is gone."""
    from gpuvisor.dispatch.fairshare import FairSharePolicy

    policy = FairSharePolicy(0.03)
    runner = RecordingRunner(seconds=0.03)
    dispatcher = DeviceDispatcher("cpu-0", runner, policy, lookahead=0.03)
    std = _profiled("std", 0.03)
    crit = _profiled("crit", 0.001, latency_class="critical", share=0.5)
    capped = [_profiled(f"f{i}", 0.001, mode="fixed-share") for i in (1, 2)]
    for queue in (std, crit, *capped):
        dispatcher.add_slice(queue)

    async def scenario() -> None:
        dispatcher.start()
        await asyncio.gather(*(dispatcher.submit(q.slice_id, _request(9)) for q in capped))
        running = dispatcher.submit("std", _request(0))  # runs
        staged = dispatcher.submit("std", _request(1))  # staged behind it
        await asyncio.sleep(0.005)
        critical = dispatcher.submit("crit", _request(2))  # takes the staged batch back
        dispatcher.remove_slice("std", Unavailable("slice std is stopping"))
        dispatcher.remove_slice("f1", Unavailable("slice f1 is stopping"))
        await critical
        with pytest.raises(Unavailable):
            await asyncio.wait_for(staged, 1.0)
        await asyncio.wait_for(running, 1.0)  # a running batch is answered as it ends
        await asyncio.sleep(0.05)
        await dispatcher.stop()

    asyncio.run(scenario())
    assert "std" not in policy._slices and "f1" not in policy._slices
    assert policy._fixed == 1 and policy._cap(capped[1]) == 1.0
