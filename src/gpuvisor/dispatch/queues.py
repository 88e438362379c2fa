"""Per-slice request queues: what is waiting, since when, and how many rows it holds."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from gpuvisor.dispatch.profiles import ExecutionProfile

__all__ = ["DEFAULT_PRIORITY", "Outcome", "PendingRequest", "SliceQueue"]

#: The priority of a request that names none (OIP ``priority`` 0 or absent). Lower runs first
#: within a slice: priority 1 is the highest; 1–9 go ahead of default requests, 11+ after them.
DEFAULT_PRIORITY = 10


@dataclass(frozen=True)
class Outcome:
    """What a worker answered for one request: HTTP status, body, binary header length (-1: none)."""

    status: int
    body: bytes
    header_length: int = -1


@dataclass(eq=False)
class PendingRequest:
    """One admitted inference request waiting for (or running on) its slice."""

    request_id: int
    tenant: str
    body: bytes
    header_length: int  # -1: plain JSON body
    arrival: float  # monotonic seconds at admission
    rows: int = 1
    deadline: float | None = None  # monotonic seconds, None: no deadline
    priority: int = DEFAULT_PRIORITY  # lower runs first within the slice (OIP 'priority')
    trace_id: str = ""
    future: asyncio.Future[Outcome] | None = None
    withdrawn: bool = False  # taken out of a staged batch: it does not queue again


@dataclass(eq=False)
class SliceQueue:
    """The queue of one slice on one device, with what the scheduler needs to know about it:
    its batching settings, its tenant's weight, its guaranteed share, latency class, its
    pool's scheduler mode and its execution profile."""

    slice_id: str
    tenant: str
    deployment: str
    pool: str
    profile_name: str
    latency_class: str = "standard"  # critical | standard | batch
    max_batch_size: int = 1
    max_queue_delay: float = 0.0
    batchable: bool = True  # the model's first dimension is its batch: a request's rows count
    weight: float = 1.0  # the tenant's weight (> 0)
    share: float = 0.0  # the profile's computeShare (0: no guarantee)
    mode: str = "best-effort"  # the pool's scheduler: best-effort | equal-share | fixed-share
    profile: ExecutionProfile = field(default_factory=ExecutionProfile)
    max_queued: int = 1024  # requests this slice may hold waiting
    items: deque[PendingRequest] = field(default_factory=deque)
    queued_rows: int = 0
    in_flight: int = 0  # batches of this slice granted and not yet done (running or staged)
    # no later than the earliest deadline of a queued request (it may be that of one gone
    # since: then a batch is released early, never late); inf once the queue is empty
    earliest_deadline: float = float("inf")

    def push(self, request: PendingRequest) -> None:
        """Append a request, behind every queued request of the same or a higher priority."""
        if self.items and self.items[-1].priority > request.priority:
            index = len(self.items)
            while index > 0 and self.items[index - 1].priority > request.priority:
                index -= 1
            self.items.insert(index, request)
        else:
            self.items.append(request)
        self.queued_rows += request.rows
        if request.deadline is not None and request.deadline < self.earliest_deadline:
            self.earliest_deadline = request.deadline

    def pop(self) -> PendingRequest:
        request = self.items.popleft()
        self.queued_rows -= request.rows
        if not self.items:
            self.earliest_deadline = float("inf")
        return request

    def requeue(self, batch: list[PendingRequest]) -> None:
        """Put a batch that was taken back before it ran at the head of the queue, in order."""
        for request in reversed(batch):
            self.items.appendleft(request)
            self.queued_rows += request.rows
            if request.deadline is not None and request.deadline < self.earliest_deadline:
                self.earliest_deadline = request.deadline

    def remove(self, request: PendingRequest) -> bool:
        """Take a still-queued request out (its deadline passed); False if it is not queued."""
        try:
            self.items.remove(request)
        except ValueError:
            return False
        self.queued_rows -= request.rows
        if not self.items:
            self.earliest_deadline = float("inf")
        return True

    def drain(self) -> list[PendingRequest]:
        """Remove and return everything queued."""
        drained = list(self.items)
        self.items.clear()
        self.queued_rows = 0
        self.earliest_deadline = float("inf")
        return drained

    def ahead_of(self, priority: int) -> tuple[int, int]:
        """The requests and rows queued that a new request of ``priority`` would wait behind:
        those of the same or a higher priority (a lower number)."""
        items = self.items
        if not items or items[-1].priority <= priority:  # sorted by priority: all of them
            return len(items), self.queued_rows
        count = rows = 0
        for request in items:
            if request.priority > priority:
                break
            count, rows = count + 1, rows + request.rows
        return count, rows

    @property
    def head_arrival(self) -> float:
        return self.items[0].arrival if self.items else float("inf")
