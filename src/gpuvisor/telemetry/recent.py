"""A bounded, in-memory recent history for the dashboard and `gpuvisor top`: latencies per
deployment, device time per tenant and slice, queue waits per tenant.

Prometheus histograms answer "p99 over the last five minutes" in PromQL; the dashboard wants
"p99 right now" without a Prometheus server, so the node keeps the last samples here. Every
series is bounded twice: by age (``window``) and by count (``max_samples``), and keyed only
by names (tenant, deployment, device, slice), never by request.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["LatencySummary", "RecentActivity", "percentile"]


def percentile(ordered: list[float], q: float) -> float | None:
    """Return the ``q`` quantile (0–1, nearest rank) of an ascending list; None when empty."""
    if not ordered:
        return None
    rank = min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))
    return ordered[rank]


_K = TypeVar("_K")
#: Buckets per window for counts and sums: a count is exact to 1/_BUCKETS of its window
_BUCKETS = 60


@dataclass(frozen=True)
class LatencySummary:
    """Answered requests of one deployment within the window: how many, how fast, how often."""

    count: int
    p50: float | None
    p99: float | None
    rate: float  # requests per second over the window


class _Series:
    """(monotonic time, value) samples, dropped once older than the window or past the cap
    (what percentiles are taken from: the latest ``cap`` of the window), and beside them
    the count and sum of every sample, in ``resolution``-second buckets, which no cap cuts
    (what rates, counts and shares are taken from)."""

    __slots__ = ("buckets", "resolution", "samples")

    def __init__(self, cap: int, resolution: float) -> None:
        self.samples: deque[tuple[float, float]] = deque(maxlen=cap)
        self.resolution = resolution
        self.buckets: deque[list[float]] = deque()  # [bucket start, count, sum], oldest first

    def add(self, at: float, value: float) -> None:
        self.samples.append((at, value))
        start = at - at % self.resolution
        if self.buckets and self.buckets[-1][0] == start:
            bucket = self.buckets[-1]
            bucket[1] += 1
            bucket[2] += value
        else:
            self.buckets.append([start, 1, value])

    def values(self, since: float) -> list[float]:
        while self.samples and self.samples[0][0] < since:
            self.samples.popleft()
        return [v for _, v in self.samples]

    def totals(self, since: float) -> tuple[int, float]:
        """How many samples, and their sum, since ``since`` (to the bucket's resolution)."""
        while self.buckets and self.buckets[0][0] + self.resolution <= since:
            self.buckets.popleft()
        return int(sum(b[1] for b in self.buckets)), sum(b[2] for b in self.buckets)


class RecentActivity:
    """What happened on the node in the last ``window`` seconds (latencies, queue waits) and the
    last ``share_window`` seconds (device time: short, so a share answers "who uses it now").

    Called from the event loop only (the node's dispatch callbacks and its HTTP handlers).
    """

    def __init__(
        self,
        window: float = 60.0,
        share_window: float = 10.0,
        max_samples: int = 2048,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window <= 0 or share_window <= 0 or max_samples < 1:
            raise ValueError("windows must be > 0 seconds and max_samples at least 1")
        self.window = window
        self.share_window = share_window
        self.max_samples = max_samples
        self.clock = clock
        self.started = clock()
        self._latency: dict[tuple[str, str], _Series] = {}
        self._wait: dict[str, _Series] = {}
        self._busy: dict[tuple[str, str, str], _Series] = {}  # (device, tenant, slice)
        self._rejections: dict[tuple[str, str], _Series] = {}  # (tenant, reason)

    # ---- recording (hot path: one append each) ------------------------------------------

    def record_latency(self, tenant: str, deployment: str, seconds: float) -> None:
        self._series(self._latency, (tenant, deployment), self.window).add(self.clock(), seconds)

    def record_wait(self, tenant: str, seconds: float) -> None:
        self._series(self._wait, tenant, self.window).add(self.clock(), seconds)

    def record_busy(self, device: str, tenant: str, slice_id: str, seconds: float) -> None:
        key = (device, tenant, slice_id)
        self._series(self._busy, key, self.share_window, 0).add(self.clock(), seconds)

    def record_rejection(self, tenant: str, reason: str) -> None:
        self._series(self._rejections, (tenant, reason), self.window, 0).add(self.clock(), 1.0)

    def _series(
        self, table: dict[_K, _Series], key: _K, window: float, cap: int | None = None
    ) -> _Series:
        """The series of ``key``; ``cap``: samples kept for percentiles (0 where only counts
        and sums are read)."""
        found = table.get(key)
        if found is None:
            samples = self.max_samples if cap is None else cap
            found = table[key] = _Series(samples, window / _BUCKETS)
        return found

    # ---- reading ----------------------------------------------------------------------------

    def span(self, window: float) -> float:
        """Seconds the window covers so far: ``window``, or less just after the node started."""
        return max(1e-9, min(window, self.clock() - self.started))

    def latency(self, tenant: str, deployment: str) -> LatencySummary:
        """Return the deployment's answered requests within the window."""
        series = self._latency.get((tenant, deployment))
        since = self.clock() - self.window
        values = sorted(series.values(since)) if series else []
        count = series.totals(since)[0] if series else 0
        return LatencySummary(
            count=count,
            p50=percentile(values, 0.50),
            p99=percentile(values, 0.99),
            rate=count / self.span(self.window),
        )

    def wait_p99(self, tenant: str) -> float | None:
        """Return the tenant's p99 queue wait (admission to grant) within the window."""
        series = self._wait.get(tenant)
        return (
            percentile(sorted(series.values(self.clock() - self.window)), 0.99) if series else None
        )

    def rejections(self, tenant: str) -> dict[str, int]:
        """Return the tenant's requests refused within the window, by reason."""
        since = self.clock() - self.window
        out = {}
        for (owner, reason), series in self._rejections.items():
            if owner == tenant:
                count = series.totals(since)[0]
                if count:
                    out[reason] = count
        return out

    def busy_seconds(self) -> dict[tuple[str, str, str], float]:
        """Return device seconds charged per (device, tenant, slice) within the share window."""
        since = self.clock() - self.share_window
        out = {}
        for key, series in list(self._busy.items()):
            used = series.totals(since)[1]
            if used > 0:
                out[key] = used
            elif not series.buckets:
                del self._busy[key]  # a slice gone quiet (or deleted) stops costing memory
        return out

    def busy_share(self) -> dict[tuple[str, str], float]:
        """Return each (device, tenant)'s fraction of its device's time within the share window."""
        span = self.span(self.share_window)
        shares: dict[tuple[str, str], float] = {}
        for (device, tenant, _), seconds in self.busy_seconds().items():
            shares[(device, tenant)] = shares.get((device, tenant), 0.0) + seconds / span
        return shares
