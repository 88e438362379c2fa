"""Scheduling policies behind one small interface: which ready slice gets the device next."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from gpuvisor.dispatch.queues import SliceQueue

__all__ = ["DispatchPolicy", "FifoPolicy"]


class DispatchPolicy(Protocol):
    """Chooses among slices whose batches are ready; told how much device time each batch used."""

    def choose(self, candidates: Sequence[SliceQueue], now: float) -> SliceQueue | None:
        """Return the slice to grant next, or None to leave the device idle."""
        ...

    def batch_rows(self, queue: SliceQueue) -> int:
        """Return the most rows the next batch of ``queue`` may hold."""
        ...

    def charge(self, queue: SliceQueue, device_seconds: float, now: float) -> None:
        """Record that a batch of ``queue`` held the device for ``device_seconds``."""
        ...

    def next_eligible(self, candidates: Sequence[SliceQueue], now: float) -> float | None:
        """When ``choose`` held every candidate back (a fixed share used up): the earliest
        monotonic time one of them may run again; None when none is held back."""
        ...

    def forget(self, slice_id: str) -> None:
        """Drop what is kept about a slice that left the device."""
        ...

    def preempts(self, critical: SliceQueue, staged: SliceQueue, now: float) -> bool:
        """Whether ``critical``'s ready batch may take the device back from a batch of
        ``staged`` that waits for it: when the critical slice would be chosen over the other
        now. Asks without changing what the policy keeps."""
        ...


class FifoPolicy:
    """First come, first served across slices: the oldest waiting request goes next."""

    def choose(self, candidates: Sequence[SliceQueue], now: float) -> SliceQueue | None:
        return min(candidates, key=lambda q: q.head_arrival, default=None)

    def batch_rows(self, queue: SliceQueue) -> int:
        return queue.max_batch_size

    def charge(self, queue: SliceQueue, device_seconds: float, now: float) -> None:
        return None

    def next_eligible(self, candidates: Sequence[SliceQueue], now: float) -> float | None:
        return None

    def forget(self, slice_id: str) -> None:
        return None

    def preempts(self, critical: SliceQueue, staged: SliceQueue, now: float) -> bool:
        return True
