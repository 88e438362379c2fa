"""FairSharePolicy's invariants, checked on simulated devices (virtual clock, exact costs).

Every example runs the real policy in ``gpuvisor.dispatch.simulate`` the way the dispatcher
drives it. Hypothesis is derandomized and keeps no database, so the examples are the same
on every run; costs are exact, so the bounds below are theorems, not tolerances.
"""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from gpuvisor.dispatch.fairshare import FairSharePolicy
from gpuvisor.dispatch.simulate import SimResult, SimSlice, simulate

QUANTUM = 0.004
EPS = 1e-9
FAST = settings(max_examples=60, deadline=None, derandomize=True, database=None)

latency_classes = st.sampled_from(["critical", "standard", "batch"])


def affine(base: float, per_row: float) -> Callable[[int], float]:
    """A batch cost: a fixed part and a part per row (exact, so profiles predict it exactly)."""
    return lambda rows: base + per_row * rows


@st.composite
def batch_costs(draw: st.DrawFn) -> tuple[Callable[[int], float], int]:
    """A slice's batch cost and max batch size: one row costs 0.5-4 ms (up to 8x apart), a
    full batch up to 2.75x that; a non-critical batch is cut to one quantum (4 ms)."""
    base = draw(st.sampled_from([0.0005, 0.001, 0.002, 0.003, 0.004]))
    max_batch = draw(st.integers(min_value=1, max_value=8))
    per_row = draw(st.sampled_from([0.0, base / 8, base / 4]))
    return affine(base - per_row, per_row), max_batch


@st.composite
def saturated_tenants(draw: st.DrawFn) -> list[SimSlice]:
    """2-5 tenants of weight 1-8 with 1-3 always-backlogged best-effort slices each."""
    slices = []
    for t in range(draw(st.integers(min_value=2, max_value=5))):
        weight = float(draw(st.integers(min_value=1, max_value=8)))
        for s in range(draw(st.integers(min_value=1, max_value=3))):
            cost, max_batch = draw(batch_costs())
            slices.append(
                SimSlice(
                    f"t{t}/s{s}",
                    f"t{t}",
                    cost=cost,
                    weight=weight,
                    latency_class=draw(latency_classes),
                    max_batch_size=max_batch,
                )
            )
    return slices


def _costs(result: SimResult, slice_ids: set[str]) -> tuple[float, float]:
    costs = [g.seconds for g in result.grants if g.slice_id in slice_ids]
    return min(costs), max(costs)


# ---- a. shares converge to weights ------------------------------------------------------


@FAST
@given(slices=saturated_tenants())
def test_device_time_converges_to_tenant_weights(slices: list[SimSlice]) -> None:
    result = simulate(FairSharePolicy(QUANTUM), slices, decisions=300)
    weights = {s.tenant: s.weight for s in slices}
    times = result.tenant_time()
    total = sum(times.values())
    for tenant, weight in weights.items():
        assert abs(times[tenant] / total - weight / sum(weights.values())) <= 0.05
    # The start-time fair queuing bound itself (Goyal et al. 1996), for every pair of
    # backlogged tenants: |W_i/w_i - W_j/w_j| <= L_i/w_i + L_j/w_j, L = largest batch.
    largest = {
        tenant: _costs(result, {s.slice_id for s in slices if s.tenant == tenant})[1]
        for tenant in weights
    }
    for i in weights:
        for j in weights:
            lag = abs(times[i] / weights[i] - times[j] / weights[j])
            assert lag <= largest[i] / weights[i] + largest[j] / weights[j] + EPS


# ---- b. no backlogged slice starves -----------------------------------------------------


def starvation_bound(slices: list[SimSlice], result: SimResult, mine: SimSlice) -> float:
    """The longest a saturating slice can go without a grant under two-level fair queuing.

    Tenant level: between two grants of tenant T (start tags S and S + c_T/w_T), another
    tenant j is granted only at start tags in [S, S + c_T/w_T] (V never passes T's tag while
    T waits), each grant moving it c_j/w_j on: at most 1 + (c_T/w_T)/(c_j/w_j) grants, so
    at most C_j + C_T * w_j / w_T of device time. Two grants of T are thus at most
    G_T = C_T + sum_j (C_j + C_T * w_j / w_T) apart.
    Slice level, inside T (slices without shares weigh the same): between two grants of s,
    a sibling s' gets at most 1 + C_s / c_s' grants, so s waits at most
    1 + sum_s' (1 + C_s / c_s') tenant grants of T, each at most G_T apart.
    (C: largest batch, c: smallest; "(slices + 1) * largest batch" is not a bound once
    weights differ: a weight-8 neighbour takes 8 batches per batch of a weight-1 tenant.)
    """
    by_tenant: dict[str, list[SimSlice]] = {}
    for s in slices:
        by_tenant.setdefault(s.tenant, []).append(s)
    largest = {
        t: _costs(result, {s.slice_id for s in members})[1] for t, members in by_tenant.items()
    }
    weight = {t: members[0].weight for t, members in by_tenant.items()}
    me = mine.tenant
    tenant_gap = largest[me] + sum(
        largest[j] + largest[me] * weight[j] / weight[me] for j in by_tenant if j != me
    )
    own_largest = _costs(result, {mine.slice_id})[1]
    turns = 1 + sum(
        1 + own_largest / _costs(result, {s.slice_id})[0] for s in by_tenant[me] if s is not mine
    )
    return turns * tenant_gap


@FAST
@given(slices=saturated_tenants())
def test_no_backlogged_slice_starves(slices: list[SimSlice]) -> None:
    result = simulate(FairSharePolicy(QUANTUM), slices, decisions=300)
    for mine in slices:
        assert result.longest_gap(mine.slice_id) <= starvation_bound(slices, result, mine) + EPS


# ---- c. fixed-share caps hold -----------------------------------------------------------


@st.composite
def capped_device(draw: st.DrawFn) -> tuple[list[SimSlice], float]:
    """1-4 saturating fixed-share slices (a share, or none: 1/N) beside 0-2 best-effort
    slices (saturating or Poisson), and the fair-share window."""
    slices = []
    for i in range(draw(st.integers(min_value=1, max_value=4))):
        cost, max_batch = draw(batch_costs())
        share = draw(st.sampled_from([0.0, 0.05, 0.1, 0.2]))
        slices.append(
            SimSlice(
                f"fixed{i}",
                f"t{i}",
                cost=cost,
                share=share,
                mode="fixed-share",
                latency_class=draw(latency_classes),
                max_batch_size=max_batch,
            )
        )
    for i in range(draw(st.integers(min_value=0, max_value=2))):
        cost, max_batch = draw(batch_costs())
        slices.append(
            SimSlice(
                f"open{i}",
                f"u{i}",
                cost=cost,
                latency_class=draw(latency_classes),
                max_batch_size=max_batch,
                rate=draw(st.sampled_from([0.0, 50.0, 400.0])),
            )
        )
    return slices, draw(st.sampled_from([0.05, 0.1, 0.25]))


@FAST
@given(device=capped_device(), seed=st.integers(min_value=0, max_value=2**16))
def test_fixed_share_never_exceeds_its_cap(device: tuple[list[SimSlice], float], seed: int) -> None:
    slices, window = device
    result = simulate(FairSharePolicy(QUANTUM, window), slices, until=1.5, seed=seed)
    fixed = [s for s in slices if s.mode == "fixed-share"]
    for mine in fixed:
        cap = mine.share if mine.share > 0 else 1 / len(fixed)
        grants = [g for g in result.grants if g.slice_id == mine.slice_id]
        # Usage over any window-length interval peaks when the interval ends at a completion.
        first = 0
        used = 0.0
        for grant in grants:
            used += grant.seconds
            while grants[first].end <= grant.end - window:
                used -= grants[first].seconds
                first += 1
            assert used <= cap * window + grant.seconds + EPS


# ---- d. critical requests within their guarantee ----------------------------------------


@st.composite
def critical_device(draw: st.DrawFn) -> tuple[list[SimSlice], float]:
    """1-2 critical slices with Poisson arrivals well inside their guaranteed share, beside
    1-4 saturating non-critical slices (some with shares of their own); and the window."""
    window = draw(st.sampled_from([0.1, 0.25]))
    slices = []
    left = 1.0
    for i in range(draw(st.integers(min_value=1, max_value=2))):
        cost, max_batch = draw(batch_costs())
        share = draw(st.sampled_from([0.2, 0.3, 0.4]))
        left -= share
        # Arrivals at least ``min_gap`` apart bound the slice's usage in any window by
        # (window / min_gap + 2) one-row costs; the gap makes that at most half the share.
        per_request = cost(1)
        min_gap = per_request / (share / 2 - 2 * per_request / window)
        slices.append(
            SimSlice(
                f"critical{i}",
                f"c{i}",
                cost=cost,
                share=share,
                mode=draw(st.sampled_from(["best-effort", "fixed-share"])),
                latency_class="critical",
                max_batch_size=max_batch,
                rate=draw(st.sampled_from([0.5, 2.0])) / min_gap,
                min_gap=min_gap,
                start=draw(st.sampled_from([0.0, 0.3])),
            )
        )
    for i in range(draw(st.integers(min_value=1, max_value=4))):
        cost, max_batch = draw(batch_costs())
        share = draw(st.sampled_from([0.0, 0.1]))
        share = share if share <= left else 0.0
        left -= share
        slices.append(
            SimSlice(
                f"other{i}",
                f"o{i}",
                cost=cost,
                share=share,
                weight=float(draw(st.integers(min_value=1, max_value=8))),
                latency_class=draw(st.sampled_from(["standard", "batch"])),
                max_batch_size=max_batch,
                max_queue_delay=draw(st.sampled_from([0.0, 0.002])),
            )
        )
    return slices, window


@FAST
@given(device=critical_device(), seed=st.integers(min_value=0, max_value=2**16))
def test_critical_requests_wait_at_most_one_quantum_behind_other_work(
    device: tuple[list[SimSlice], float], seed: int
) -> None:
    """A critical request of a slice within its guarantee is granted once the batch running
    when it arrived ends: at most one quantum of non-critical work delays it (plus any
    critical work, its own slice's included). Checked once the slice has been on the device
    for a whole window: before that its usage is judged over a shorter span."""
    slices, window = device
    result = simulate(FairSharePolicy(QUANTUM, window), slices, until=1.5, seed=seed)
    critical = {s.slice_id for s in slices if s.latency_class == "critical"}
    checked = 0
    for slice_id in critical:
        first = min(g.time for g in result.grants if g.slice_id == slice_id)
        for wait in result.waits:
            if wait.slice_id != slice_id or wait.arrival < first + window:
                continue
            behind = wait.seconds - result.busy_between(wait.arrival, wait.granted, critical)
            assert behind <= QUANTUM + EPS
            checked += 1
    assert checked > 0
