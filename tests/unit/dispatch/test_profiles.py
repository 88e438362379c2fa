"""Execution profiles: measured batch costs, their averages, and what they predict."""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuvisor.dispatch.profiles import ExecutionProfile


def test_without_measurements_predicts_nothing_and_allows_one_row() -> None:
    profile = ExecutionProfile()
    assert not profile.known
    assert profile.snapshot() == {}
    assert profile.predict(16) == 0.0
    assert profile.max_rows_within(1.0, 64) == 1


def test_first_observation_is_taken_as_is_then_averaged() -> None:
    profile = ExecutionProfile(alpha=0.25)
    profile.observe(4, 0.008)
    assert profile.known
    assert profile.snapshot() == {4: 0.008}
    profile.observe(4, 0.016)
    assert profile.snapshot()[4] == pytest.approx(0.008 + 0.25 * (0.016 - 0.008))
    profile.observe(2, 0.003)  # another size starts its own average
    assert profile.snapshot() == {2: 0.003, 4: pytest.approx(0.010)}


def test_alpha_one_keeps_only_the_latest_measurement() -> None:
    profile = ExecutionProfile({8: 1.0}, alpha=1.0)
    profile.observe(8, 0.5)
    assert profile.predict(8) == 0.5


@pytest.mark.parametrize(
    ("measured", "rows", "expected"),
    [
        # at and between measured sizes: the measurement, then linear interpolation
        ({1: 0.010, 8: 0.024}, 1, 0.010),
        ({1: 0.010, 8: 0.024}, 8, 0.024),
        ({1: 0.010, 8: 0.024}, 4, 0.010 + 0.002 * 3),
        ({2: 0.004, 4: 0.006, 8: 0.014}, 6, 0.010),
        # above the largest: the per-row slope of the two largest sizes
        ({1: 0.010, 8: 0.024}, 16, 0.024 + 0.002 * 8),
        ({2: 0.004, 4: 0.006, 8: 0.014}, 10, 0.014 + 0.002 * 2),
        # above the only size: proportional to rows
        ({4: 0.008}, 10, 0.020),
        # below the only size: proportional
        ({4: 0.008}, 1, 0.002),
        # below the smallest: the slope of the two smallest ...
        ({4: 0.010, 8: 0.014}, 2, 0.008),
        # ... but never below the proportional share of the smallest
        ({4: 0.004, 8: 0.040}, 2, 0.002),
    ],
)
def test_predict(measured: dict[int, float], rows: int, expected: float) -> None:
    assert ExecutionProfile(measured).predict(rows) == pytest.approx(expected)


def test_a_flat_top_extrapolates_proportionally_not_for_free() -> None:
    # Two largest sizes cost the same (noise): a flat slope would promise any batch for
    # the price of 8 rows, so extrapolation falls back to proportional.
    profile = ExecutionProfile({4: 0.008, 8: 0.008})
    assert profile.predict(16) == pytest.approx(0.016)
    assert profile.max_rows_within(0.012, 64) == 12


def test_noise_never_makes_a_bigger_batch_look_cheaper() -> None:
    profile = ExecutionProfile({1: 0.004, 4: 0.012, 8: 0.010})
    assert profile.predict(8) == pytest.approx(0.012)  # the envelope of 4 and 8 rows
    assert profile.predict(6) >= profile.predict(4)
    assert profile.snapshot()[8] == 0.010  # the measurement itself is kept as measured


@pytest.mark.parametrize(
    ("budget", "limit", "expected"),
    [
        (0.024, 64, 8),  # exactly the cost of 8 rows
        (0.0239, 64, 7),
        (0.016, 64, 4),
        (0.024, 5, 5),  # capped by the slice's max batch size
        (0.001, 64, 1),  # nothing fits: one row anyway
        (10.0, 64, 64),
    ],
)
def test_max_rows_within(budget: float, limit: int, expected: int) -> None:
    profile = ExecutionProfile({1: 0.010, 8: 0.024})
    assert profile.max_rows_within(budget, limit) == expected


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: ExecutionProfile(alpha=0.0), "alpha"),
        (lambda: ExecutionProfile(alpha=1.5), "alpha"),
        (lambda: ExecutionProfile({0: 0.1}), "at least one row"),
        (lambda: ExecutionProfile({2: -0.1}), ">= 0"),
        (lambda: ExecutionProfile().observe(0, 0.1), "at least one row"),
        (lambda: ExecutionProfile().observe(1, -1.0), ">= 0"),
        (lambda: ExecutionProfile().observe(1, math.nan), "finite"),
        (lambda: ExecutionProfile().observe(1, math.inf), "finite"),
        (lambda: ExecutionProfile({1: 0.1}).predict(0), "at least one row"),
        (lambda: ExecutionProfile({1: 0.1}).max_rows_within(1.0, 0), "at least 1"),
    ],
)
def test_nonsense_is_rejected(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_snapshot_is_a_copy() -> None:
    profile = ExecutionProfile({2: 0.5})
    profile.snapshot()[2] = 9.0
    assert profile.predict(2) == 0.5


measurements = st.dictionaries(
    st.integers(min_value=1, max_value=64),
    st.floats(min_value=0.0, max_value=1.0, allow_nan=False),
    min_size=1,
    max_size=6,
)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(measured=measurements)
def test_predict_is_non_decreasing_and_exact_at_the_upper_envelope(
    measured: dict[int, float],
) -> None:
    profile = ExecutionProfile(measured)
    predictions = [profile.predict(rows) for rows in range(1, 100)]
    assert all(a <= b for a, b in pairwise(predictions))
    for rows in measured:
        envelope = max(v for k, v in measured.items() if k <= rows)
        assert profile.predict(rows) == pytest.approx(envelope)


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(
    measured=measurements,
    budget=st.floats(min_value=0.0, max_value=2.0, allow_nan=False),
    limit=st.integers(min_value=1, max_value=80),
)
def test_max_rows_within_is_the_largest_fitting_batch(
    measured: dict[int, float], budget: float, limit: int
) -> None:
    profile = ExecutionProfile(measured)
    fitting = [rows for rows in range(1, limit + 1) if profile.predict(rows) <= budget]
    assert profile.max_rows_within(budget, limit) == max(fitting, default=1)


def test_a_load_time_profile_that_overestimates_is_corrected_by_the_batches_served() -> None:
    """Measured while other slices loaded, 4 and 8 rows looked over the 10 ms quantum, so
    neither would be granted and measured again: the batches served bound them, and the
    batch grows to all 8 rows its model runs in 5.3 ms."""
    from gpuvisor.dispatch.fairshare import FairSharePolicy
    from gpuvisor.dispatch.queues import SliceQueue

    queue = SliceQueue("t/d/0", "t", "d", "default", "p", max_batch_size=8)
    queue.profile = ExecutionProfile({1: 0.0072, 2: 0.0076, 4: 0.0118, 8: 0.0173})
    policy = FairSharePolicy(quantum=0.010)
    assert policy.batch_rows(queue) < 4
    for _ in range(50):
        rows = policy.batch_rows(queue)
        queue.profile.observe(rows, 0.0035 + (rows - 1) * 0.00026)  # what it really costs
    assert policy.batch_rows(queue) == 8
    assert queue.profile.predict(8) == pytest.approx(0.0035 + 7 * 0.00026, rel=1e-3)


def test_a_size_measured_online_keeps_its_own_average() -> None:
    """A model whose big batches really cost more per row than small ones: what the big
    batch measured stands, whatever the small ones say."""
    profile = ExecutionProfile({1: 0.001, 4: 0.004})
    profile.observe(4, 0.010)  # measured online: 4 rows cost more than 4 times 1
    for _ in range(5):
        profile.observe(1, 0.001)
    assert profile.predict(4) > 0.004
