"""The batches on a device and the lookahead's rules over them: which batch the next one may be
staged behind, which slices may stage, and which staged batch may still be taken back.

Pure logic over ``Grant`` records; the dispatcher (dispatcher.py) sends and revokes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from gpuvisor.dispatch.queues import PendingRequest, SliceQueue

__all__ = ["Grant", "may_follow", "may_stage", "may_take_back", "staging_base"]


@dataclass(eq=False, slots=True)
class Grant:
    """A batch on the device: running, or staged to start when ``after`` is done."""

    queue: SliceQueue
    cost: float  # predicted device seconds, charged to the slice at the grant
    end: float  # predicted monotonic end
    after: Grant | None = None
    handle: int = 0
    followed: bool = False  # a batch is staged behind this one
    revoking: bool = False  # taken back (for a critical request, or a request withdrawn)
    ended: bool = False  # what followed it was settled: it is off the device, its reply not in
    started: float | None = None  # monotonic time its turn on the device came (None: waits)
    aborted: bool = False  # held the device past the batch timeout: its worker was stopped
    batch: list[PendingRequest] = field(default_factory=list)


def staging_base(grants: Iterable[Grant]) -> Grant | None:
    """The batch next in line that ends first and has nothing staged behind it; None when
    there is none. Next in line: running, taken back (it will run nothing), or waiting only
    behind a batch that was taken back."""
    base = None
    for grant in grants:
        if (
            (grant.after is None or grant.revoking or grant.after.revoking)
            and not grant.followed
            and not grant.ended
            and (base is None or grant.end < base.end)
        ):
            base = grant
    return base


def may_stage(queue: SliceQueue, batch_rows: int) -> bool:
    """Whether a slice with a batch on the device may stage another now: a critical slice
    always (its requests should not wait for a trip to the node), any other only when the
    batch it would get (at most ``batch_rows``, as the policy sizes it) is as large as it may
    be. Staging saves one trip to the worker; waiting for the running batch to end lets more
    requests join the next one, which saves a trip for each of them."""
    if queue.latency_class == "critical":
        return True
    return queue.queued_rows >= min(queue.max_batch_size, batch_rows)


def may_follow(grants: Iterable[Grant], queue: SliceQueue, base: Grant) -> bool:
    """Whether a batch of ``queue``, which has batches on the device, may be staged behind
    ``base``: at most one of them will run (the others were taken back), and it runs before
    ``base`` or is ``base`` (a worker runs its batches in order, so the new one then waits
    only for ``base``)."""
    running = [g for g in grants if g.queue is queue and not g.revoking]
    if len(running) > 1:
        return False
    if not running:
        return True
    link: Grant | None = base
    while link is not None:
        if link is running[0]:
            return True
        link = link.after
    return False


def may_take_back(staged: Grant) -> bool:
    """Whether a batch still waits for its turn and may be taken back: staged behind one that
    has not handed the device on, and with nothing staged behind it."""
    return (
        staged.after is not None
        and not staged.after.ended
        and not staged.revoking
        and not staged.followed
    )
