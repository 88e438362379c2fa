"""Admission before queueing: a request is refused at the door, never after it has waited.

Three checks, in this order, each with its own answer:

* **Rate** — a token bucket per tenant (``Tenant.spec.quota.requestsPerSecond``, burst of one
  second's worth): over the rate → 429 with ``Retry-After`` (when the next token comes).
* **Queue caps** — the tenant's queued requests across its slices (``quota.maxQueued``) and
  the slice's own queue (``SliceQueue.max_queued``): full → 429 with ``Retry-After`` (the
  predicted time to drain what waits).
* **Deadline** — from ``Deployment.spec.slo.latency`` or the request's OIP ``timeout``
  parameter (microseconds, the smaller wins): when the predicted completion is past the
  deadline the request is refused with 503 before it queues. A queued request whose deadline
  passes is withdrawn by the node with the same error and never reaches the device.

Predictions come from the slices' execution profiles (``dispatch/profiles.py``); see
``DeviceDispatcher.predict_completion``. This module holds no I/O and reads no clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gpuvisor.errors import DeadlineExceeded, TooManyRequests

__all__ = ["Admission", "TenantLimits", "TokenBucket", "deadline_error"]


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``; starts full."""

    def __init__(self, rate: float, burst: float | None = None, now: float = 0.0) -> None:
        if rate <= 0:
            raise ValueError("a token bucket needs a positive rate")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)
        self.tokens = self.burst
        self.updated = now

    def take(self, now: float, n: float = 1.0) -> float:
        """Take ``n`` tokens and return 0.0, or take nothing and return the seconds until
        ``n`` tokens will be there."""
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
        if self.tokens >= n:
            self.tokens -= n
            return 0.0
        return (n - self.tokens) / self.rate

    def give_back(self, n: float = 1.0) -> None:
        """Return ``n`` tokens taken for a request that was then refused for another reason."""
        self.tokens = min(self.burst, self.tokens + n)


@dataclass(frozen=True)
class TenantLimits:
    """A tenant's admission limits (None: unlimited)."""

    requests_per_second: float | None = None
    max_queued: int | None = None


class Admission:
    """Per-tenant rate limits and queue caps, configured from the tenants' quotas."""

    def __init__(self) -> None:
        self._limits: dict[str, TenantLimits] = {}
        self._buckets: dict[str, TokenBucket] = {}

    def configure(self, tenant: str, limits: TenantLimits, now: float) -> None:
        """Set a tenant's limits; its bucket keeps its tokens while the rate is unchanged."""
        self._limits[tenant] = limits
        rate = limits.requests_per_second
        bucket = self._buckets.get(tenant)
        if rate is None:
            self._buckets.pop(tenant, None)
        elif bucket is None or bucket.rate != rate:
            self._buckets[tenant] = TokenBucket(rate, now=now)

    def forget(self, tenant: str) -> None:
        self._limits.pop(tenant, None)
        self._buckets.pop(tenant, None)

    def limits(self, tenant: str) -> TenantLimits:
        return self._limits.get(tenant, TenantLimits())

    def check_rate(self, tenant: str, now: float) -> None:
        """Raise TooManyRequests (reason ``rate_limit``) when the tenant is over its rate."""
        bucket = self._buckets.get(tenant)
        if bucket is None:
            return
        wait = bucket.take(now)
        if wait > 0:
            raise TooManyRequests(
                f"tenant '{tenant}' is over its rate limit of {bucket.rate:g} requests/s "
                f"(quota.requestsPerSecond); retry in {_seconds(wait)}",
                retry_after=wait,
                reason="rate_limit",
            )

    def refund(self, tenant: str) -> None:
        """Give back the token ``check_rate`` took for a request that was refused after it
        (a full queue, a deadline it cannot meet): only requests that queue use the rate."""
        bucket = self._buckets.get(tenant)
        if bucket is not None:
            bucket.give_back()

    def check_queues(
        self,
        tenant: str,
        tenant_queued: int,
        slice_id: str,
        slice_queued: int,
        slice_cap: int,
        drain_seconds: float,
    ) -> None:
        """Raise TooManyRequests when the tenant's or the slice's queue is full."""
        cap = self._limits.get(tenant, TenantLimits()).max_queued
        if cap == 0:  # no retry would help
            raise TooManyRequests(
                f"tenant '{tenant}' may queue no requests: its quota.maxQueued is 0 (raise it "
                "to serve this tenant)",
                retry_after=None,
                reason="tenant_queue_full",
            )
        if cap is not None and tenant_queued >= cap:
            raise TooManyRequests(
                f"tenant '{tenant}' already has {tenant_queued} requests queued, its limit "
                f"(quota.maxQueued) is {cap}; retry in {_seconds(drain_seconds)}",
                retry_after=drain_seconds,
                reason="tenant_queue_full",
            )
        if slice_queued >= slice_cap:
            raise TooManyRequests(
                f"slice {slice_id} already has {slice_queued} requests queued, its limit is "
                f"{slice_cap} (limits.maxQueuedPerSlice in the node configuration); "
                f"retry in {_seconds(drain_seconds)}",
                retry_after=drain_seconds,
                reason="slice_queue_full",
            )


def deadline_error(
    budget: float, predicted: float, queued_ahead: int, alone: float = 0.0
) -> DeadlineExceeded:
    """The refusal for a request whose predicted completion misses its deadline; ``alone``:
    the predicted time of the request itself, which no retry can shorten."""
    if alone > budget:
        return DeadlineExceeded(
            f"the request cannot finish within its deadline of {_seconds(budget)}: the model "
            f"alone takes {_seconds(alone)} to run it, with nothing else on the device; raise "
            "Deployment spec.slo.latency or the request's timeout, or send fewer rows",
            reason="deadline_infeasible",
        )
    return DeadlineExceeded(
        f"the request cannot finish within its deadline of {_seconds(budget)}: predicted "
        f"completion in {_seconds(predicted)} ({queued_ahead} requests queued ahead on its "
        "slice); raise Deployment spec.slo.latency or the request's timeout, or retry later",
        reason="deadline_infeasible",
        retry_after=max(0.0, predicted - budget),
    )


def _seconds(value: float) -> str:
    if not math.isfinite(value):
        return "an unbounded time"
    if value < 1.0:
        return f"{max(value * 1000, 0.001):.3g} ms"
    return f"{math.ceil(value * 10) / 10:g} s"
