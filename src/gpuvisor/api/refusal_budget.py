"""How many refused requests from one caller (a client address without a valid key, a key
with one) the audit log records one by one. Each is recorded otherwise (who tried, with what
key id), but a caller could then grow the node's database as fast as it can send; past the
budget they are counted, and the count goes into the caller's next record."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["RefusalBudget"]


@dataclass
class _Bucket:
    tokens: float
    at: float
    suppressed: int = 0


class RefusalBudget:
    """A token bucket per caller: ``rate`` records a second, ``burst`` at once; callers are
    forgotten all at once past ``max_clients`` (memory stays bounded)."""

    def __init__(
        self,
        rate: float = 5.0,
        burst: float = 20.0,
        max_clients: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate, self.burst, self.max_clients, self.clock = rate, burst, max_clients, clock
        self._buckets: dict[str, _Bucket] = {}

    def take(self, client: str) -> int | None:
        """None: do not record this refusal (it is counted); else record it, with the number
        of this caller's refusals not recorded since its last record."""
        now = self.clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= self.max_clients:
                self._buckets.clear()
            bucket = self._buckets[client] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        if bucket.tokens < 1.0:
            bucket.suppressed += 1
            return None
        bucket.tokens -= 1.0
        suppressed, bucket.suppressed = bucket.suppressed, 0
        return suppressed
