"""The budget of unauthenticated refusals recorded one by one per client address."""

from __future__ import annotations

from gpuvisor.api.refusal_budget import RefusalBudget


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_is_recorded_then_counted_into_the_next_record() -> None:
    clock = Clock()
    budget = RefusalBudget(rate=5.0, burst=3.0, clock=clock)
    assert [budget.take("10.0.0.1") for _ in range(5)] == [0, 0, 0, None, None]
    assert budget.take("10.0.0.2") == 0  # another address has its own budget
    clock.now += 0.2  # one more token
    assert budget.take("10.0.0.1") == 2  # recorded, saying how many were not
    assert budget.take("10.0.0.1") is None


def test_memory_stays_bounded_however_many_addresses() -> None:
    budget = RefusalBudget(max_clients=10, clock=Clock())
    for i in range(1000):
        budget.take(f"10.0.{i // 256}.{i % 256}")
    assert len(budget._buckets) <= 10
