"""Per-slice request queues: what is waiting, since when, and how many rows it holds."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

__all__ = ["Outcome", "PendingRequest", "SliceQueue"]


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
    priority: int = 0  # lower runs first within the slice (OIP 'priority')
    trace_id: str = ""
    future: asyncio.Future[Outcome] | None = None
    granted_at: float | None = None


@dataclass(eq=False)
class SliceQueue:
    """The queue of one slice on one device, with the batching settings that drain it."""

    slice_id: str
    tenant: str
    deployment: str
    pool: str
    profile: str
    latency_class: str = "standard"
    max_batch_size: int = 1
    max_queue_delay: float = 0.0
    items: deque[PendingRequest] = field(default_factory=deque)
    queued_rows: int = 0
    busy: bool = False  # a batch of this slice is on the device (its worker runs one at a time)

    def push(self, request: PendingRequest) -> None:
        """Append a request (or insert it by priority when it carries one)."""
        if request.priority and self.items and self.items[-1].priority > request.priority:
            index = len(self.items)
            while index > 0 and self.items[index - 1].priority > request.priority:
                index -= 1
            self.items.insert(index, request)
        else:
            self.items.append(request)
        self.queued_rows += request.rows

    def pop(self) -> PendingRequest:
        request = self.items.popleft()
        self.queued_rows -= request.rows
        return request

    def drain(self) -> list[PendingRequest]:
        """Remove and return everything queued."""
        drained = list(self.items)
        self.items.clear()
        self.queued_rows = 0
        return drained

    @property
    def head_arrival(self) -> float:
        return self.items[0].arrival if self.items else float("inf")
