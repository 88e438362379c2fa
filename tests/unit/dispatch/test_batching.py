"""Dynamic batching decisions: readiness and batch formation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpuvisor.dispatch.batching import DEADLINE_MARGIN, ready_at, take_batch
from gpuvisor.dispatch.profiles import ExecutionProfile
from gpuvisor.dispatch.queues import DEFAULT_PRIORITY, PendingRequest, SliceQueue


def _queue(max_batch: int = 4, delay: float = 0.0) -> SliceQueue:
    return SliceQueue(
        "t/d/0", "t", "d", "default", "p", max_batch_size=max_batch, max_queue_delay=delay
    )


def _request(
    i: int, arrival: float = 0.0, rows: int = 1, priority: int = DEFAULT_PRIORITY
) -> PendingRequest:
    return PendingRequest(
        request_id=i,
        tenant="t",
        body=b"",
        header_length=-1,
        arrival=arrival,
        rows=rows,
        priority=priority,
    )


@pytest.mark.parametrize(
    ("queued_rows", "delay", "expected"),
    [
        (0, 0.0, float("inf")),  # empty: never ready
        (1, 0.0, 10.0),  # no delay: ready at arrival
        (1, 0.005, 10.005),  # partial batch waits for the delay
        (4, 0.005, 10.0),  # a full batch does not wait
    ],
)
def test_ready_at(queued_rows: int, delay: float, expected: float) -> None:
    queue = _queue(max_batch=4, delay=delay)
    for i in range(queued_rows):
        queue.push(_request(i, arrival=10.0 + i * 0.001))
    assert ready_at(queue) == pytest.approx(expected)


def test_a_deadline_releases_a_batch_before_its_batching_delay_ends() -> None:
    """A 50 ms deadline under a 100 ms maxQueueDelay: the batch starts once the time its
    deadline leaves is its predicted run and a margin for the trip to the worker and back,
    not 100 ms after its first request (nor so late that its answer misses the deadline)."""
    queue = _queue(max_batch=8, delay=0.1)
    queue.profile = ExecutionProfile({1: 0.002, 2: 0.003})
    queue.push(_request(0, arrival=10.0))
    assert ready_at(queue) == pytest.approx(10.1)  # no deadline: the whole delay
    late = _request(1, arrival=10.01)
    late.deadline = 10.06
    queue.push(late)
    assert ready_at(queue) == pytest.approx(10.06 - 0.003 - DEADLINE_MARGIN)
    queue.profile = ExecutionProfile({1: 0.010, 2: 0.020})  # a long batch: half its time more
    assert ready_at(queue) == pytest.approx(10.06 - 0.020 - 0.010)
    queue.pop(), queue.pop()
    assert queue.earliest_deadline == float("inf")  # an empty queue keeps no old deadline
    queue.push(_request(2, arrival=11.0))
    assert ready_at(queue) == pytest.approx(11.1)


def test_ahead_of_counts_what_runs_before_a_new_request_of_a_priority() -> None:
    queue = _queue()
    for i, (priority, rows) in enumerate([(DEFAULT_PRIORITY, 2)] * 3 + [(1, 1), (5, 3)]):
        queue.push(_request(i, rows=rows, priority=priority))
    assert queue.ahead_of(1) == (1, 1)
    assert queue.ahead_of(5) == (2, 4)
    assert queue.ahead_of(DEFAULT_PRIORITY) == (5, 10)
    assert queue.ahead_of(DEFAULT_PRIORITY + 1) == (5, 10)


def test_take_batch_respects_rows_and_order() -> None:
    queue = _queue(max_batch=4)
    for i, rows in enumerate([1, 2, 2, 1]):
        queue.push(_request(i, rows=rows))
    batch = take_batch(queue)
    assert [r.request_id for r in batch] == [0, 1]  # 1 + 2 rows; the next (2 rows) would exceed 4
    assert queue.queued_rows == 3
    assert [r.request_id for r in take_batch(queue, max_rows=1)] == [
        2
    ]  # at least one, even if larger


def test_priority_orders_within_a_slice() -> None:
    queue = _queue()
    queue.push(_request(0, priority=5))
    queue.push(_request(1, priority=5))
    queue.push(_request(2, priority=1))
    assert [r.request_id for r in queue.drain()] == [2, 0, 1]


def test_named_priorities_go_around_default_requests() -> None:
    queue = _queue()
    queue.push(_request(0))  # no priority: the default level
    queue.push(_request(1, priority=DEFAULT_PRIORITY + 1))  # lower than default
    queue.push(_request(2))
    queue.push(_request(3, priority=1))  # the highest
    assert [r.request_id for r in queue.drain()] == [3, 0, 2, 1]


def test_remove_takes_a_queued_request_out() -> None:
    queue = _queue()
    requests = [_request(i, rows=2) for i in range(3)]
    for request in requests:
        queue.push(request)
    assert queue.remove(requests[1]) and queue.queued_rows == 4
    assert not queue.remove(requests[1]), "a request that is no longer queued is not removed twice"
    assert [r.request_id for r in queue.drain()] == [0, 2]


@given(st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=40), st.integers(1, 16))
def test_batches_drain_everything_in_order_within_limits(rows: list[int], max_batch: int) -> None:
    queue = _queue(max_batch=max_batch)
    for i, r in enumerate(rows):
        queue.push(_request(i, rows=r))
    seen: list[int] = []
    while queue.items:
        batch = take_batch(queue)
        assert batch, "a batch is never empty"
        assert len(batch) == 1 or sum(r.rows for r in batch) <= max_batch
        seen += [r.request_id for r in batch]
    assert seen == list(range(len(rows)))
    assert queue.queued_rows == 0
