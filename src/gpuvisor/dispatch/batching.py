"""Dynamic batching decisions: when a slice's queue is ready, and which requests form its batch."""

from __future__ import annotations

from gpuvisor.dispatch.queues import PendingRequest, SliceQueue

__all__ = ["DEADLINE_MARGIN", "ready_at", "take_batch"]

DEADLINE_MARGIN = 0.002
"""Seconds, at least, a batch held for a deadline is released before it would have to start:
room for the timer, the trip to the worker and back, and the answer (half the batch's
predicted time when that is more)."""


def ready_at(queue: SliceQueue) -> float:
    """Return the monotonic time at which the queue's next batch may be granted.

    A batch is ready once it is full (``max_batch_size`` rows queued) or once its
    oldest request has waited ``max_queue_delay``; an empty queue is never ready. A queued
    request with a deadline does not wait for the batch to fill past the moment its batch
    must start to make it (its deadline less the batch's predicted time and a margin,
    ``DEADLINE_MARGIN``), so the batching delay never costs a request its deadline.
    """
    if not queue.items:
        return float("inf")
    if queue.queued_rows >= queue.max_batch_size:
        return queue.head_arrival
    at = queue.head_arrival + queue.max_queue_delay
    if queue.earliest_deadline < at:
        predicted = queue.profile.predict(queue.queued_rows)
        margin = max(DEADLINE_MARGIN, predicted / 2)
        at = min(at, queue.earliest_deadline - predicted - margin)
    return at


def take_batch(queue: SliceQueue, max_rows: int | None = None) -> list[PendingRequest]:
    """Pop the requests of the next batch: at least one, then as many as fit in ``max_rows``.

    ``max_rows`` defaults to the slice's ``max_batch_size``; a scheduler passes less to
    keep a batch inside its time quantum.
    """
    limit = (
        queue.max_batch_size if max_rows is None else max(1, min(max_rows, queue.max_batch_size))
    )
    batch = [queue.pop()]
    rows = batch[0].rows
    while queue.items and rows + queue.items[0].rows <= limit:
        request = queue.pop()
        rows += request.rows
        batch.append(request)
    return batch
