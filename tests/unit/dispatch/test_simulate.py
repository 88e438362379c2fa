"""The dispatch simulator: a virtual device that drives policies as the dispatcher does."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import pytest

from gpuvisor.dispatch.fairshare import FairSharePolicy
from gpuvisor.dispatch.policy import FifoPolicy
from gpuvisor.dispatch.queues import SliceQueue
from gpuvisor.dispatch.simulate import SimSlice, simulate


def test_one_batch_at_a_time_back_to_back_when_saturated() -> None:
    slices = [
        SimSlice("a", "A", cost=lambda rows: 0.001 * rows, max_batch_size=4),
        SimSlice("b", "B", cost=lambda rows: 0.003),
    ]
    result = simulate(FifoPolicy(), slices, decisions=50)
    assert len(result.grants) == 50
    for before, after in pairwise(result.grants):
        assert after.time == pytest.approx(before.end)  # no overlap, no idle gap
    assert {g.rows for g in result.grants if g.slice_id == "a"} == {4}  # refilled to full
    assert result.end == pytest.approx(result.grants[-1].end)
    assert result.device_time() == pytest.approx(result.end)


def test_the_same_seed_gives_the_same_trace() -> None:
    def run(seed: int) -> list[tuple[float, str]]:
        slices = [
            SimSlice("a", "A", cost=lambda rows: 0.001, rate=300.0),
            SimSlice("b", "B", cost=lambda rows: 0.002, rate=100.0, max_batch_size=4),
        ]
        result = simulate(FairSharePolicy(0.004), slices, until=1.0, seed=seed)
        return [(g.time, g.slice_id) for g in result.grants]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_poisson_arrivals_keep_their_rate_and_minimum_gap() -> None:
    slices = [SimSlice("a", "A", cost=lambda rows: 0.0001, rate=200.0, min_gap=0.005)]
    result = simulate(FifoPolicy(), slices, until=20.0, seed=1)
    arrivals = sorted(w.arrival for w in result.waits)
    # Mean gap 0.005 + 1/200 = 0.01 s: about 2000 requests in 20 s.
    assert 1800 <= len(arrivals) <= 2200
    assert min(b - a for a, b in pairwise(arrivals)) >= 0.005 - 1e-12
    assert all(w.seconds == 0.0 for w in result.waits)  # an idle device grants at once


def test_batching_delay_is_waited_for() -> None:
    slices = [
        SimSlice(
            "a", "A", cost=lambda rows: 0.0001, rate=100.0, max_batch_size=64, max_queue_delay=0.02
        ),
    ]
    result = simulate(FifoPolicy(), slices, until=2.0, seed=3)
    assert max(g.rows for g in result.grants) > 1  # requests gathered while waiting
    heads = {}
    for wait in result.waits:
        heads.setdefault(wait.granted, wait.arrival)
    for granted, head in heads.items():
        assert granted - head == pytest.approx(0.02)  # never full: the delay decides


def test_the_profile_learns_from_completed_batches() -> None:
    slice_ = SimSlice("a", "A", cost=lambda rows: 0.002 * rows, max_batch_size=8, profiled=False)
    policy = FairSharePolicy(quantum=0.01)
    result = simulate(policy, [slice_], decisions=20)
    rows = [g.rows for g in result.grants]
    assert rows[0] == 1  # unmeasured: one row
    assert rows[-1] == 5  # measured: 5 rows of 2 ms fill the 10 ms quantum


class _StallingPolicy(FifoPolicy):
    def choose(self, candidates: Sequence[SliceQueue], now: float) -> SliceQueue | None:
        return None


def test_a_policy_that_idles_with_nothing_to_wait_for_is_reported() -> None:
    with pytest.raises(RuntimeError, match="stall"):
        simulate(_StallingPolicy(), [SimSlice("a", "A", cost=lambda rows: 0.001)], decisions=5)


def test_a_stopping_point_is_required() -> None:
    with pytest.raises(ValueError, match="decisions or until"):
        simulate(FifoPolicy(), [])


def test_longest_gap_counts_the_start_and_the_end() -> None:
    slices = [
        SimSlice("a", "A", cost=lambda rows: 0.001),
        SimSlice("late", "B", cost=lambda rows: 0.001, start=0.5),
    ]
    result = simulate(FairSharePolicy(0.004), slices, until=1.0)
    assert result.longest_gap("late") >= 0.5
    assert result.longest_gap("a") <= 0.002 + 1e-9
