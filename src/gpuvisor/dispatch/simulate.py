"""A deterministic discrete-event simulation of one device's dispatch, on a virtual clock.

Slices have exact per-batch costs (``seconds = cost(rows)``) and either a saturating backlog
(always refilled to a full batch) or seeded Poisson arrivals. One batch runs at a time. The
policy is driven as ``DeviceDispatcher.dispatch_ready`` drives it: at every moment a decision
can change (a batch completes, a request arrives, a batching delay or a held-back slice's
release time passes) the ready, idle slices are offered to ``choose``; the batch is cut to
``batch_rows``; when every candidate is held back, ``next_eligible`` says when to look again;
on completion the slice's profile observes the batch and the policy is charged.

No asyncio and no real time: the same inputs give the same trace, so tests can assert
fairness, starvation and latency bounds on it exactly.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

from gpuvisor.dispatch.batching import ready_at, take_batch
from gpuvisor.dispatch.policy import DispatchPolicy
from gpuvisor.dispatch.profiles import ExecutionProfile
from gpuvisor.dispatch.queues import PendingRequest, SliceQueue

__all__ = ["Grant", "SimResult", "SimSlice", "Wait", "simulate"]

CostFn = Callable[[int], float]


@dataclass
class SimSlice:
    """One simulated slice: its scheduling settings, batch cost and arrival process."""

    slice_id: str
    tenant: str
    cost: CostFn  # device seconds of a batch of ``rows``
    weight: float = 1.0
    share: float = 0.0
    mode: str = "best-effort"
    latency_class: str = "standard"
    max_batch_size: int = 1
    max_queue_delay: float = 0.0
    rate: float = 0.0  # Poisson arrivals per second; 0: a saturating backlog
    min_gap: float = 0.0  # added to every inter-arrival gap: bounds how bursty arrivals are
    start: float = 0.0  # no arrival before this time
    profiled: bool = True  # profile measured at load (at 1 and max_batch_size rows)

    @property
    def saturating(self) -> bool:
        return self.rate <= 0


@dataclass(frozen=True)
class Grant:
    """One batch granted the device at ``time`` for ``seconds``."""

    time: float
    slice_id: str
    rows: int
    seconds: float

    @property
    def end(self) -> float:
        return self.time + self.seconds


@dataclass(frozen=True)
class Wait:
    """One request: when it arrived and when its batch was granted."""

    slice_id: str
    arrival: float
    granted: float

    @property
    def seconds(self) -> float:
        return self.granted - self.arrival


@dataclass
class SimResult:
    """What happened: every grant in order, every granted request's wait, the final clock."""

    slices: dict[str, SimSlice]
    grants: list[Grant] = field(default_factory=list)
    waits: list[Wait] = field(default_factory=list)
    end: float = 0.0

    def device_time(self, slice_ids: Iterable[str] | None = None) -> float:
        """Return the device seconds granted to ``slice_ids`` (all slices when None)."""
        wanted = None if slice_ids is None else set(slice_ids)
        return sum(g.seconds for g in self.grants if wanted is None or g.slice_id in wanted)

    def tenant_time(self) -> dict[str, float]:
        """Return the device seconds granted per tenant."""
        totals: dict[str, float] = {}
        for grant in self.grants:
            tenant = self.slices[grant.slice_id].tenant
            totals[tenant] = totals.get(tenant, 0.0) + grant.seconds
        return totals

    def busy_between(self, start: float, end: float, slice_ids: Iterable[str]) -> float:
        """Return the device seconds within ``[start, end]`` spent on batches of ``slice_ids``."""
        wanted = set(slice_ids)
        return sum(
            max(0.0, min(end, g.end) - max(start, g.time))
            for g in self.grants
            if g.slice_id in wanted
        )

    def longest_gap(self, slice_id: str) -> float:
        """Return the longest stretch of the run without a grant to the slice (run start and
        end included), measured between grant times."""
        times = [0.0, *(g.time for g in self.grants if g.slice_id == slice_id), self.end]
        return max(b - a for a, b in pairwise(times))


def simulate(
    policy: DispatchPolicy,
    slices: Sequence[SimSlice],
    *,
    decisions: int | None = None,
    until: float | None = None,
    seed: int = 0,
) -> SimResult:
    """Run the device until ``decisions`` batches have completed or the clock reaches
    ``until`` (whichever comes first; at least one must be given) and return the trace.

    Raises RuntimeError when the policy leaves the device idle with ready candidates but
    names no later time to look again (the device would stall).
    """
    if decisions is None and until is None:
        raise ValueError("give decisions or until: the simulation needs a place to stop")
    rng = random.Random(seed)
    result = SimResult({s.slice_id: s for s in slices})
    queues = {s.slice_id: _queue(s) for s in slices}
    arrivals = {s.slice_id: s.start for s in slices if not s.saturating}
    next_id = 0

    def push(sim: SimSlice, at: float) -> None:
        nonlocal next_id
        next_id += 1
        queues[sim.slice_id].push(PendingRequest(next_id, sim.tenant, b"", -1, arrival=at, rows=1))

    for sim in slices:
        if sim.saturating:
            for _ in range(sim.max_batch_size):
                push(sim, sim.start)

    now = 0.0
    running: tuple[SliceQueue, Grant] | None = None
    limit = math.inf if until is None else until
    while now <= limit:
        if running is not None and running[1].end <= now:
            queue, grant = running
            running = None
            queue.in_flight -= 1
            if grant.seconds > 0:
                queue.profile.observe(grant.rows, grant.seconds)
            policy.charge(queue, grant.seconds, now)
            if decisions is not None and len(result.grants) >= decisions:
                break
        for sim in slices:
            if sim.saturating:
                continue
            while arrivals[sim.slice_id] <= now:
                push(sim, arrivals[sim.slice_id])
                arrivals[sim.slice_id] += sim.min_gap + rng.expovariate(sim.rate)
        wake = math.inf
        if running is None:
            candidates: list[SliceQueue] = []
            for queue in queues.values():
                if queue.in_flight or not queue.items:
                    continue
                at = ready_at(queue)
                if at <= now:
                    candidates.append(queue)
                else:
                    wake = min(wake, at)
            chosen = policy.choose(candidates, now) if candidates else None
            if chosen is not None:
                running = (chosen, _grant(result, chosen, policy, now))
                if result.slices[chosen.slice_id].saturating:
                    while chosen.queued_rows < chosen.max_batch_size:
                        push(result.slices[chosen.slice_id], now)
                continue  # a zero-cost batch completes at once: look again at ``now``
            if candidates:
                eligible = policy.next_eligible(candidates, now)
                if eligible is None or eligible <= now:
                    raise RuntimeError(
                        f"at t={now} the policy held back every ready slice but named "
                        f"{eligible} as the time to look again: the device would stall"
                    )
                wake = min(wake, eligible)
        following = min(
            running[1].end if running is not None else math.inf,
            min(arrivals.values(), default=math.inf),
            wake,
        )
        if following == math.inf:
            break
        now = max(now, following)
    result.end = min(now, limit)
    return result


def _queue(sim: SimSlice) -> SliceQueue:
    measured = {1: sim.cost(1), sim.max_batch_size: sim.cost(sim.max_batch_size)}
    return SliceQueue(
        slice_id=sim.slice_id,
        tenant=sim.tenant,
        deployment=sim.slice_id,
        pool="sim",
        profile_name="sim",
        latency_class=sim.latency_class,
        max_batch_size=sim.max_batch_size,
        max_queue_delay=sim.max_queue_delay,
        weight=sim.weight,
        share=sim.share,
        mode=sim.mode,
        profile=ExecutionProfile(measured if sim.profiled else None),
        max_queued=1 << 30,
    )


def _grant(
    result: SimResult,
    queue: SliceQueue,
    policy: DispatchPolicy,
    now: float,
) -> Grant:
    batch = take_batch(queue, policy.batch_rows(queue))
    rows = sum(request.rows for request in batch)
    queue.in_flight += 1
    grant = Grant(now, queue.slice_id, rows, result.slices[queue.slice_id].cost(rows))
    result.grants.append(grant)
    result.waits.extend(Wait(queue.slice_id, r.arrival, now) for r in batch)
    return grant
