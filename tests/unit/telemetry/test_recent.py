"""The dashboard's recent history: windows by age and by count, percentiles, device-time shares."""

from __future__ import annotations

import pytest

from gpuvisor.telemetry.recent import RecentActivity, percentile


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([], 0.5, None),
        ([1.0], 0.99, 1.0),
        ([1.0, 2.0, 3.0, 4.0], 0.5, 2.0),
        ([float(i) for i in range(1, 101)], 0.99, 99.0),
        ([float(i) for i in range(1, 101)], 0.50, 50.0),
        ([float(i) for i in range(1, 11)], 0.99, 10.0),
    ],
)
def test_percentile_nearest_rank(values: list[float], q: float, expected: float | None) -> None:
    assert percentile(values, q) == expected


def test_latency_window_drops_old_samples_and_reports_rate() -> None:
    clock = Clock()
    recent = RecentActivity(window=10.0, clock=clock)
    clock.now += 20  # the node has run longer than the window
    for ms in range(1, 101):
        recent.record_latency("retail", "shelf", ms / 1000)
    summary = recent.latency("retail", "shelf")
    assert summary.count == 100
    assert summary.p50 == pytest.approx(0.050)
    assert summary.p99 == pytest.approx(0.099)
    assert summary.rate == pytest.approx(10.0)  # 100 answers over a 10 s window
    clock.now += 10.5
    assert recent.latency("retail", "shelf").count == 0
    assert recent.latency("retail", "shelf").p99 is None
    assert recent.latency("support", "router").count == 0  # never seen


def test_percentiles_come_from_the_latest_samples_but_counts_and_rates_from_all() -> None:
    clock = Clock()
    recent = RecentActivity(window=60.0, max_samples=50, clock=clock)
    clock.now += 120  # a node up for longer than the window
    for i in range(500):
        recent.record_latency("a", "d", 0.001 if i < 450 else 0.1)
    summary = recent.latency("a", "d")
    assert summary.p50 == 0.1  # the last 50 samples only: memory stays bounded
    assert summary.count == 500 and summary.rate == pytest.approx(500 / 60)
    for series in recent._latency.values():
        assert len(series.samples) == 50 and len(series.buckets) <= 61


def test_a_busy_share_is_right_however_many_batches_make_it() -> None:
    """300 batches a second of 2 ms for 10 s is 60% of the device, past any sample cap."""
    clock = Clock()
    recent = RecentActivity(share_window=10.0, max_samples=2048, clock=clock)
    clock.now += 30
    for _ in range(3000):
        clock.now += 1 / 300
        recent.record_busy("cpu-0", "retail", "retail/a/0", 0.002)
    assert recent.busy_share()[("cpu-0", "retail")] == pytest.approx(0.6, rel=0.02)


def test_busy_share_per_device_and_tenant_over_the_share_window() -> None:
    clock = Clock()
    recent = RecentActivity(share_window=10.0, clock=clock)
    clock.now += 30
    recent.record_busy("cpu-0", "retail", "retail/a/0", 2.0)
    recent.record_busy("cpu-0", "retail", "retail/b/0", 1.0)
    recent.record_busy("cpu-0", "support", "support/c/0", 0.5)
    recent.record_busy("gpu-0", "support", "support/d/0", 4.0)
    assert recent.busy_share() == pytest.approx(
        {("cpu-0", "retail"): 0.3, ("cpu-0", "support"): 0.05, ("gpu-0", "support"): 0.4}
    )
    clock.now += 11
    assert recent.busy_share() == {}


def test_share_just_after_start_counts_the_time_since_start() -> None:
    clock = Clock()
    recent = RecentActivity(share_window=10.0, clock=clock)
    clock.now += 2
    recent.record_busy("cpu-0", "retail", "s", 1.0)
    assert recent.busy_share()[("cpu-0", "retail")] == pytest.approx(0.5)


def test_rejections_and_waits_per_tenant() -> None:
    clock = Clock()
    recent = RecentActivity(window=60.0, clock=clock)
    for _ in range(3):
        recent.record_rejection("analytics", "rate_limit")
    recent.record_rejection("analytics", "deadline_infeasible")
    recent.record_rejection("retail", "slice_queue_full")
    assert recent.rejections("analytics") == {"rate_limit": 3, "deadline_infeasible": 1}
    assert recent.rejections("support") == {}
    for ms in (1, 2, 30):
        recent.record_wait("retail", ms / 1000)
    assert recent.wait_p99("retail") == pytest.approx(0.030)
    assert recent.wait_p99("support") is None
    clock.now += 61
    assert recent.rejections("analytics") == {}
    assert recent.wait_p99("retail") is None


def test_bad_windows_are_refused() -> None:
    with pytest.raises(ValueError, match="windows must be"):
        RecentActivity(window=0)
