"""Fair-share dispatch: guaranteed compute shares first, then weighted fair queuing of the rest.

``FairSharePolicy`` decides which ready slice gets the device next, from the device time
each slice's batches actually used (measured by the worker, reported through ``charge``).
Each decision, over the ``candidates`` (slices with a ready batch that are not busy):

1. State. Per slice, created on first sight (``first_seen``): the charges ``(t, seconds)``
   completed within the sliding ``window`` and their sum, ``usage``; a slice virtual time
   ``vt_s``. Per tenant: a tenant virtual time ``vt_T``. A charge made at ``t`` leaves the
   window at ``t + window`` exactly. ``span(s) = min(window, now - first_seen)``.
2. Fixed-share cap. A ``fixed-share`` slice may use ``c = share`` of the device, or ``1/N``
   when its share is 0 (``N``: fixed-share slices known to the policy). It is held back
   while ``usage >= c * span``; a slice with no usage (or span 0) is never held back. When
   every candidate is held back, ``choose`` returns None (the device idles: a cap is a cap)
   and ``next_eligible`` says when the first of them may run again.
3. Guarantee tier. Entitlement ``e = share`` (best-effort, fixed-share) or ``(1 - S)/K``
   for an ``equal-share`` slice (``S``: the shares of the other candidates that have one;
   ``K``: the candidates, of every mode). On a device of equal-share slices only that is
   1/K; on one shared with other pools, an equal-share slice neither claims the device whole
   nor pushes the guarantees past it, and a slice with no share still gets surplus turns.
   Candidates with ``e > 0`` that
   used less than ``e * max(span, quantum)`` go first, ordered by latency class
   (``CLASS_RANK``), then by how much of their entitlement they used, then oldest request.
   The floor of one quantum keeps a new slice within its guarantee for its first batch
   (whose predicted time is charged at its grant) without crediting it with time it was
   not there.
4. Surplus. Otherwise start-time fair queuing on device time. When every candidate is
   equal-share: flat, the least ``vt_s`` (ties: class, then oldest request). Otherwise two
   levels: the tenant with the least ``vt_T`` (ties: its best class, then the oldest
   request of that class), then that tenant's slice with the least ``vt_s``. No credit for idleness:
   before comparing, a candidate's virtual time is raised to the virtual time ``V`` of the
   last surplus grant at its level (the chosen tenant's ``vt_T``, or within a tenant its
   chosen slice's ``vt_s``; the flat level keeps its own ``V``).
5. ``charge``: the charge joins the window; ``vt_s += seconds / w_s`` with ``w_s = 1`` for
   equal-share slices, else ``share`` (or 0.1 without one); ``vt_T += seconds / weight``.
   A dispatcher that decides the next batch before the running one ends charges the running
   batch's predicted time at its grant, and the difference to the measured time (which may
   be negative) when it completes; the sums are the same as charging the measured time.
6. ``batch_rows``: a critical slice's batch may hold ``max_batch_size`` rows; any other is
   cut to what its execution profile predicts fits in one ``quantum``.
7. ``forget`` drops a slice's state; tenant state stays (a tenant's debt outlives slices).

Choices the design left open, made here:

- Only surplus grants move ``V``. A grant from the guarantee tier can go to a slice whose
  virtual time is far ahead; letting it set ``V`` would wipe out the fair-queuing position
  of every tenant that waited behind it.
- Raising a virtual time to ``V`` is kept (as start-time fair queuing does when a flow turns
  backlogged), so a tenant back from idling competes from ``V``, not from its old, low mark.
- Remaining ties go to the slice id, so a decision never depends on the candidates' order.
- A latency class outside ``CLASS_RANK`` ranks as ``standard``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from gpuvisor.dispatch.queues import SliceQueue

__all__ = ["CLASS_RANK", "FairSharePolicy"]

CLASS_RANK: dict[str, int] = {"critical": 0, "standard": 1, "batch": 2}
EQUAL_SHARE, FIXED_SHARE = "equal-share", "fixed-share"
NO_SHARE_WEIGHT = 0.1  # slice weight within its tenant when the slice has no compute share


@dataclass(eq=False, slots=True)
class _SliceState:
    first_seen: float
    mode: str
    charges: deque[tuple[float, float]] = field(default_factory=deque)
    used: float = 0.0  # sum of ``charges``
    vt: float = 0.0


@dataclass(eq=False, slots=True)
class _TenantState:
    vt: float = 0.0
    slice_v: float = 0.0  # V at the slice level: vt_s of this tenant's last surplus grant


class FairSharePolicy:
    """Guaranteed shares, fixed-share caps and weighted fair sharing of one device's time."""

    def __init__(self, quantum: float, window: float = 1.0) -> None:
        if not quantum > 0:
            raise ValueError(f"the scheduling quantum must be > 0 seconds, got {quantum}")
        if not window > 0:
            raise ValueError(f"the fair-share window must be > 0 seconds, got {window}")
        self.quantum = quantum
        self.window = window
        self._slices: dict[str, _SliceState] = {}
        self._tenants: dict[str, _TenantState] = {}
        self._fixed = 0  # fixed-share slices known
        self._tenant_v = 0.0  # V at the tenant level
        self._flat_v = 0.0  # V of the flat (all equal-share) level

    # ---- DispatchPolicy ---------------------------------------------------------------

    def choose(self, candidates: Sequence[SliceQueue], now: float) -> SliceQueue | None:
        """Return the candidate to grant next, or None when every one is held back."""
        slices, window = self._slices, self.window
        ready: list[tuple[SliceQueue, _SliceState]] = []
        capped = False
        for queue in candidates:
            state = slices.get(queue.slice_id)
            if state is None or state.mode != queue.mode:
                state = self._state(queue, now)
            elif state.charges and state.charges[0][0] + window <= now:
                self._prune(state, now)
            capped = capped or queue.mode == FIXED_SHARE
            ready.append((queue, state))
        if capped:  # only now, with every candidate known, is N (fixed-share slices) right
            ready = [
                (queue, state)
                for queue, state in ready
                if queue.mode != FIXED_SHARE or not self._held(state, self._cap(queue), now)
            ]
        if not ready:
            return None
        return self._guaranteed(ready, now) or self._surplus(ready)

    def batch_rows(self, queue: SliceQueue) -> int:
        if queue.latency_class == "critical":
            return queue.max_batch_size
        return queue.profile.max_rows_within(self.quantum, queue.max_batch_size)

    def charge(self, queue: SliceQueue, device_seconds: float, now: float) -> None:
        """Account ``device_seconds`` of device time to the slice and its tenant; a negative
        amount corrects an earlier charge (a prediction that was too high).

        Raises ValueError for a non-finite time or a tenant weight <= 0.
        """
        if not math.isfinite(device_seconds):
            raise ValueError(
                f"slice {queue.slice_id} was charged {device_seconds} device seconds: "
                "a batch's device time is a finite number"
            )
        if not queue.weight > 0:
            raise ValueError(
                f"tenant {queue.tenant} has weight {queue.weight}: weights must be > 0"
            )
        state = self._state(queue, now)
        if device_seconds != 0:
            state.charges.append((now, device_seconds))
            state.used += device_seconds
        state.vt += device_seconds / _slice_weight(queue)
        self._tenant(queue.tenant).vt += device_seconds / queue.weight

    def next_eligible(self, candidates: Sequence[SliceQueue], now: float) -> float | None:
        """Return the earliest time a held-back candidate may run again; None if none is held."""
        earliest: float | None = None
        for queue in candidates:
            if queue.mode != FIXED_SHARE:
                continue
            state = self._state(queue, now)
            cap = self._cap(queue)
            if not self._held(state, cap, now):
                continue
            at = self._release_time(state, cap, now)
            if earliest is None or at < earliest:
                earliest = at
        return earliest

    def preempts(self, critical: SliceQueue, staged: SliceQueue, now: float) -> bool:
        """Whether a critical slice may take the device back from ``staged``'s waiting batch:
        when it is within its guarantee, or neither is and its tenant is not ahead of the
        other's in fair queuing; never past a fixed-share cap. A critical slice over its
        share thus waits its fair-share turn, as the other slices do."""
        if critical.mode == FIXED_SHARE and self._held(
            self._peek(critical, now), self._cap(critical), now
        ):
            return False
        pair = [(queue, self._peek(queue, now)) for queue in (critical, staged)]
        under = self._guaranteed(pair, now)
        if under is not None:
            return under is critical
        floor = self._tenant_v
        return max(self._tenant(critical.tenant).vt, floor) <= max(
            self._tenant(staged.tenant).vt, floor
        )

    def forget(self, slice_id: str) -> None:
        state = self._slices.pop(slice_id, None)
        if state is not None and state.mode == FIXED_SHARE:
            self._fixed -= 1

    # ---- accounting -------------------------------------------------------------------

    def usage(self, slice_id: str, now: float) -> float:
        """Return the device seconds charged to the slice within the window ending at ``now``."""
        state = self._slices.get(slice_id)
        if state is None:
            return 0.0
        self._prune(state, now)
        return state.used

    def _state(self, queue: SliceQueue, now: float) -> _SliceState:
        state = self._slices.get(queue.slice_id)
        if state is None:
            state = self._slices[queue.slice_id] = _SliceState(now, queue.mode)
            self._fixed += queue.mode == FIXED_SHARE
        elif state.mode != queue.mode:  # the pool's scheduler was changed
            self._fixed += (queue.mode == FIXED_SHARE) - (state.mode == FIXED_SHARE)
            state.mode = queue.mode
        self._prune(state, now)
        return state

    def _peek(self, queue: SliceQueue, now: float) -> _SliceState:
        """The slice's state, or a fresh one that is not kept (a question changes nothing)."""
        state = self._slices.get(queue.slice_id)
        if state is None:
            return _SliceState(now, queue.mode)
        self._prune(state, now)
        return state

    def _tenant(self, tenant: str) -> _TenantState:
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = _TenantState()
        return state

    def _prune(self, state: _SliceState, now: float) -> None:
        charges, window = state.charges, self.window
        while charges and charges[0][0] + window <= now:
            state.used -= charges.popleft()[1]
        if not charges:
            state.used = 0.0  # no rounding residue from the subtractions

    # ---- fixed-share caps -------------------------------------------------------------

    def _cap(self, queue: SliceQueue) -> float:
        return queue.share if queue.share > 0 else 1.0 / max(1, self._fixed)

    def _held(self, state: _SliceState, cap: float, now: float) -> bool:
        return _over(state.used, cap, min(self.window, now - state.first_seen))

    def _release_time(self, state: _SliceState, cap: float, now: float) -> float:
        """Return the first time >= now at which the slice is no longer held back.

        Between two expiries the usage is constant and only the span grows, so the answer
        is, in the first stretch where one exists, the moment ``cap * span`` passes the
        usage. Usage is replayed with the same subtractions ``_prune`` will make, so the
        time returned is one at which ``choose`` really lets the slice run.
        """
        window, first_seen = self.window, state.first_seen
        used, start = state.used, now
        charges = state.charges
        for index in range(len(charges) + 1):
            end = charges[index][0] + window if index < len(charges) else math.inf
            if used <= 0:
                at = start
            elif cap * window > used:
                at = max(start, first_seen + used / cap)
                step = max(abs(at), 1.0) * 2**-52
                while at < end and _over(used, cap, min(window, at - first_seen)):
                    at += step
                    step *= 2
            else:
                at = math.inf
            if at < end:
                return at
            if index < len(charges):
                used -= charges[index][1]
                start = max(start, end)
                if index == len(charges) - 1:
                    used = 0.0
        return start  # not reached: with every charge expired the slice is free

    # ---- tiers ------------------------------------------------------------------------

    def _guaranteed(
        self, ready: list[tuple[SliceQueue, _SliceState]], now: float
    ) -> SliceQueue | None:
        # an equal part of what the other slices' guarantees leave, among every candidate:
        # guarantees never add up past the device, and a slice with none still gets a turn
        promised = sum(q.share for q, _ in ready if q.mode != EQUAL_SHARE and q.share > 0)
        equal_part = max(0.0, 1.0 - promised) / len(ready)
        window = self.window
        best: SliceQueue | None = None
        best_key: tuple[int, float, float, str] | None = None
        for queue, state in ready:
            if queue.mode == EQUAL_SHARE:
                entitled = equal_part
            elif queue.share > 0:
                entitled = queue.share
            else:
                continue
            # at least one quantum: a new slice's first batch, charged at its grant, must not
            # put it over a guarantee judged over the few microseconds it has been known
            span = max(min(window, now - state.first_seen), self.quantum)
            used_part = state.used / (entitled * span)
            if used_part >= 1.0:
                continue
            key = (_rank(queue), used_part, queue.head_arrival, queue.slice_id)
            if best_key is None or key < best_key:
                best, best_key = queue, key
        return best

    def _surplus(self, ready: list[tuple[SliceQueue, _SliceState]]) -> SliceQueue:
        if all(queue.mode == EQUAL_SHARE for queue, _ in ready):
            queue, state = _least_vt(ready, self._flat_v)
            self._flat_v = state.vt
            return queue
        # Tenant level: each candidate tenant's best class and that class's oldest request.
        summary: dict[str, tuple[int, float]] = {}
        ranks = CLASS_RANK
        for queue, _ in ready:
            rank, head = ranks.get(queue.latency_class, 1), queue.head_arrival
            seen = summary.get(queue.tenant)
            if seen is None or rank < seen[0] or (rank == seen[0] and head < seen[1]):
                summary[queue.tenant] = (rank, head)
        floor = self._tenant_v
        chosen = ""
        best_key: tuple[float, int, float, str] | None = None
        for name, (rank, oldest) in summary.items():
            tenant = self._tenant(name)
            if tenant.vt < floor:
                tenant.vt = floor
            key = (tenant.vt, rank, oldest, name)
            if best_key is None or key < best_key:
                chosen, best_key = name, key
        tenant = self._tenants[chosen]
        members = [entry for entry in ready if entry[0].tenant == chosen]
        queue, state = _least_vt(members, tenant.slice_v)
        self._tenant_v = tenant.vt
        tenant.slice_v = state.vt
        return queue


def _over(used: float, cap: float, span: float) -> bool:
    """Whether a slice that used ``used`` seconds over ``span`` has reached its cap."""
    return used > 0 and span > 0 and used >= cap * span


def _rank(queue: SliceQueue) -> int:
    return CLASS_RANK.get(queue.latency_class, 1)


def _slice_weight(queue: SliceQueue) -> float:
    if queue.mode == EQUAL_SHARE:
        return 1.0
    return queue.share if queue.share > 0 else NO_SHARE_WEIGHT


def _least_vt(
    entries: list[tuple[SliceQueue, _SliceState]], floor: float
) -> tuple[SliceQueue, _SliceState]:
    """Raise each slice's virtual time to ``floor`` and return the one with the least."""
    best = entries[0]
    best_key: tuple[float, int, float, str] | None = None
    for queue, state in entries:
        state.vt = max(state.vt, floor)
        key = (state.vt, _rank(queue), queue.head_arrival, queue.slice_id)
        if best_key is None or key < best_key:
            best, best_key = (queue, state), key
    return best
