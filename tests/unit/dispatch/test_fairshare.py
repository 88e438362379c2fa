"""FairSharePolicy, rule by rule, on small hand-made scenarios."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

from gpuvisor.dispatch.fairshare import CLASS_RANK, FairSharePolicy
from gpuvisor.dispatch.policy import DispatchPolicy
from gpuvisor.dispatch.profiles import ExecutionProfile
from gpuvisor.dispatch.queues import PendingRequest, SliceQueue
from gpuvisor.dispatch.simulate import SimSlice, simulate


def _queue(slice_id: str, tenant: str = "t", arrival: float = 0.0, **settings: Any) -> SliceQueue:
    queue = SliceQueue(
        slice_id=slice_id,
        tenant=tenant,
        deployment="d",
        pool="pool",
        profile_name="p",
        **settings,
    )
    queue.push(PendingRequest(1, tenant, b"", -1, arrival=arrival))
    return queue


def _ids(queue: SliceQueue | None) -> str | None:
    return None if queue is None else queue.slice_id


def test_it_is_a_dispatch_policy() -> None:
    policy: DispatchPolicy = FairSharePolicy(quantum=0.01)
    assert policy.choose([], 0.0) is None
    assert CLASS_RANK["critical"] < CLASS_RANK["standard"] < CLASS_RANK["batch"]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: FairSharePolicy(quantum=0.0), "quantum"),
        (lambda: FairSharePolicy(quantum=0.01, window=-1.0), "window"),
        (lambda: FairSharePolicy(0.01).charge(_queue("a"), math.inf, 0.0), "finite"),
        (lambda: FairSharePolicy(0.01).charge(_queue("a"), math.nan, 0.0), "finite"),
        (lambda: FairSharePolicy(0.01).charge(_queue("a", weight=0.0), 0.1, 0.0), "weight"),
    ],
)
def test_nonsense_is_rejected(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_a_negative_charge_corrects_an_earlier_prediction() -> None:
    policy = FairSharePolicy(quantum=0.01, window=1.0)
    a, b = _queue("a"), _queue("b", tenant="u")
    policy.charge(a, 0.3, 0.0)  # predicted at the grant
    policy.charge(a, -0.1, 0.2)  # measured 0.2 at completion
    policy.charge(b, 0.2, 0.2)
    assert policy.usage("a", 0.5) == pytest.approx(0.2)
    # both tenants have used the same device time: a tie, broken by the older request
    assert policy._tenants["t"].vt == pytest.approx(policy._tenants["u"].vt)


# ---- 1. the window ----------------------------------------------------------------------


def test_usage_is_what_was_charged_within_the_window() -> None:
    policy = FairSharePolicy(quantum=0.01, window=1.0)
    queue = _queue("a")
    policy.charge(queue, 0.2, 1.0)
    policy.charge(queue, 0.3, 1.5)
    policy.charge(queue, 0.0, 1.6)  # a zero-second batch is no usage
    assert policy.usage("a", 1.9) == pytest.approx(0.5)
    assert policy.usage("a", 2.0) == pytest.approx(0.3)  # a charge leaves at t + window
    assert policy.usage("a", 2.5) == 0.0
    assert policy.usage("unknown", 2.5) == 0.0


# ---- 2. fixed-share caps ----------------------------------------------------------------


def test_fixed_share_slice_is_held_until_its_span_catches_up() -> None:
    policy = FairSharePolicy(quantum=0.01, window=1.0)
    queue = _queue("a", mode="fixed-share", share=0.25)
    assert policy.choose([queue], 0.0) is queue  # never charged: never held back
    policy.charge(queue, 0.1, 0.1)
    assert policy.choose([queue], 0.2) is None  # 0.1 used >= 0.25 * 0.2
    release = policy.next_eligible([queue], 0.2)
    assert release == pytest.approx(0.4)  # 0.25 * span passes 0.1 at span 0.4
    assert policy.choose([queue], release - 1e-6) is None
    assert policy.choose([queue], release) is queue


def test_fixed_share_slice_is_released_when_its_charges_leave_the_window() -> None:
    policy = FairSharePolicy(quantum=0.01, window=1.0)
    queue = _queue("a", mode="fixed-share", share=0.25)
    policy.choose([queue], 0.0)
    policy.charge(queue, 0.2, 0.5)
    policy.charge(queue, 0.2, 0.9)
    assert policy.choose([queue], 1.2) is None  # 0.4 used >= 0.25 * 1.0
    assert policy.next_eligible([queue], 1.2) == 1.5  # the first charge leaves: 0.2 < 0.25
    assert policy.choose([queue], 1.4999) is None
    assert policy.choose([queue], 1.5) is queue


def test_a_held_slice_leaves_the_device_to_the_others() -> None:
    policy = FairSharePolicy(quantum=0.01, window=1.0)
    capped = _queue("capped", "x", arrival=0.0, mode="fixed-share", share=0.1)
    other = _queue("other", "y", arrival=5.0)
    policy.choose([capped, other], 0.0)
    policy.charge(capped, 0.5, 0.5)
    assert policy.choose([capped, other], 0.6) is other
    assert policy.next_eligible([other], 0.6) is None  # nothing held back
    assert policy.next_eligible([capped, other], 0.6) == 1.5


def test_fixed_share_without_a_share_is_capped_at_one_over_n() -> None:
    policy = FairSharePolicy(quantum=0.01, window=1.0)
    queues = [_queue(name, name, mode="fixed-share") for name in "abc"]
    policy.choose(queues, 0.0)
    policy.charge(queues[0], 0.32, 1.0)
    assert policy.choose([queues[0]], 1.0) is queues[0]  # 0.32 < 1/3
    policy.charge(queues[0], 0.02, 1.0)
    assert policy.choose([queues[0]], 1.0) is None  # 0.34 >= 1/3
    policy.forget("c")  # two fixed-share slices left: the cap is 1/2
    assert policy.choose([queues[0]], 1.0) is queues[0]


@pytest.mark.parametrize("share", [0.1, 0.3, 0.5])
def test_a_lone_fixed_share_slice_gets_its_share_and_the_device_idles_the_rest(
    share: float,
) -> None:
    slices = [SimSlice("a", "A", cost=lambda rows: 0.002, share=share, mode="fixed-share")]
    result = simulate(FairSharePolicy(quantum=0.01, window=0.1), slices, until=3.0)
    # Its share of every window, give or take the one batch (2 ms) that crosses the line.
    slack = 0.002 / 0.1
    assert (share - slack) * 3.0 <= result.device_time() <= (share + slack) * 3.0


# ---- 3. the guarantee tier --------------------------------------------------------------


def test_a_slice_under_its_share_goes_before_fair_queuing() -> None:
    policy = FairSharePolicy(quantum=0.01, window=1.0)
    guaranteed = _queue("g", "rich", arrival=9.0, share=0.5)
    plain = _queue("p", "poor", arrival=0.0)
    policy.choose([guaranteed, plain], 0.0)
    policy.charge(guaranteed, 5.0, 1.0)  # far ahead in virtual time, but long ago
    assert policy.choose([guaranteed, plain], 10.0) is guaranteed
    policy.charge(guaranteed, 0.5, 10.0)  # its guarantee used up: fair queuing decides
    assert policy.choose([guaranteed, plain], 10.0) is plain


def test_a_new_slice_stays_within_its_guarantee_after_its_first_batch() -> None:
    # The first batch's predicted time is charged at its grant: judged over the microseconds
    # the slice has been known it would be far over its share. One quantum is the floor.
    policy = FairSharePolicy(quantum=0.01, window=1.0)
    chat = _queue("chat", "a", arrival=5.0, share=0.5, latency_class="critical")
    bulk = _queue("bulk", "b", arrival=0.0, latency_class="batch")
    assert policy.choose([chat, bulk], 5.0) is chat
    policy.charge(chat, 0.002, 5.0)  # its first batch, predicted at 2 ms
    assert policy.choose([chat, bulk], 5.0001) is chat  # still within 0.5 of one quantum
    policy.charge(chat, 0.004, 5.0001)  # 6 ms used: over half of one quantum
    assert policy.choose([chat, bulk], 5.0002) is bulk  # fair queuing: bulk has used nothing


def test_a_new_slice_with_a_share_counts_as_under_it() -> None:
    policy = FairSharePolicy(quantum=0.01, window=1.0)
    old = _queue("old", "a", arrival=0.0)
    policy.choose([old], 0.0)
    new = _queue("new", "b", arrival=3.0, share=0.1, latency_class="batch")
    assert policy.choose([old, new], 3.0) is new


@pytest.mark.parametrize(
    ("first", "second", "winner"),
    [
        # the latency class first, even when the critical slice used more of its share
        (("crit", "critical", 0.5, 0.4, 0.0), ("std", "standard", 0.5, 0.1, 0.0), "crit"),
        # then the part of its entitlement a slice used: 0.2/0.5 beats 0.1/0.2
        (("big", "standard", 0.5, 0.2, 5.0), ("small", "standard", 0.2, 0.1, 0.0), "big"),
        # then the oldest request
        (("late", "standard", 0.5, 0.1, 2.0), ("early", "standard", 0.5, 0.1, 1.0), "early"),
    ],
)
def test_guarantee_tier_order(
    first: tuple[str, str, float, float, float],
    second: tuple[str, str, float, float, float],
    winner: str,
) -> None:
    policy = FairSharePolicy(quantum=0.01, window=1.0)
    queues = []
    for name, latency, share, used, arrival in (first, second):
        queue = _queue(name, name, arrival=arrival, latency_class=latency, share=share)
        policy.choose([queue], 0.0)
        policy.charge(queue, used, 0.5)
        queues.append(queue)
    assert _ids(policy.choose(queues, 1.0)) == winner
    assert _ids(policy.choose(queues[::-1], 1.0)) == winner


def test_equal_share_entitlement_is_one_over_the_candidates() -> None:
    policy = FairSharePolicy(quantum=0.01, window=1.0)
    queues = {name: _queue(name, name, mode="equal-share") for name in "abc"}
    policy.choose(list(queues.values()), 0.0)
    for name, used in (("a", 0.30), ("b", 0.40), ("c", 0.20)):
        policy.charge(queues[name], used, 0.5)
    assert _ids(policy.choose(list(queues.values()), 1.0)) == "c"  # 0.2 of 1/3 is the least
    # Two candidates: each is entitled to 1/2; a (0.3 of 0.5) is under, b (0.4) is too.
    assert _ids(policy.choose([queues["b"], queues["a"]], 1.0)) == "a"


# ---- 4. surplus: start-time fair queuing ------------------------------------------------


def test_flat_fair_queuing_when_every_candidate_is_equal_share() -> None:
    policy = FairSharePolicy(quantum=0.01, window=1.0)
    a = _queue("a", "ta", mode="equal-share")
    b = _queue("b", "tb", mode="equal-share")
    policy.choose([a, b], 0.0)
    policy.charge(b, 2.0, 0.5)  # outside the window by t=3: virtual time only
    policy.charge(a, 0.6, 3.0)
    policy.charge(b, 0.5, 3.0)
    # Both are at or over 1/2 of the window: a has the lower virtual time (0.6 < 2.5).
    assert policy.choose([a, b], 3.0) is a


def test_tenants_are_compared_before_their_slices() -> None:
    policy = FairSharePolicy(quantum=0.01, window=1.0)
    a1 = _queue("a1", "A", weight=1.0)
    b1 = _queue("b1", "B", weight=4.0)
    policy.charge(a1, 0.1, 0.0)  # vt_A = 0.1, vt_a1 = 1.0
    policy.charge(b1, 0.2, 0.0)  # vt_B = 0.05, vt_b1 = 2.0
    assert policy.choose([a1, b1], 5.0) is b1


def test_within_a_tenant_slices_share_by_compute_share() -> None:
    policy = FairSharePolicy(quantum=0.01, window=1.0)
    big = _queue("big", "T", share=0.5)
    small = _queue("small", "T")
    policy.choose([big, small], 0.0)
    policy.charge(big, 0.6, 0.9)  # over its share of the window; vt = 0.6 / 0.5 = 1.2
    policy.charge(small, 0.15, 0.9)  # vt = 0.15 / 0.1 = 1.5
    assert policy.choose([small, big], 1.0) is big


@pytest.mark.parametrize(
    ("a_settings", "b_settings", "winner"),
    [
        ({"latency_class": "batch"}, {"latency_class": "standard"}, "b"),
        ({"latency_class": "critical"}, {"latency_class": "standard"}, "a"),
        ({"arrival": 2.0}, {"arrival": 1.0}, "b"),
        ({}, {}, "a"),  # nothing else tells them apart: the name, never the order given
    ],
)
def test_surplus_ties(a_settings: dict[str, Any], b_settings: dict[str, Any], winner: str) -> None:
    for same_tenant in (True, False):
        policy = FairSharePolicy(quantum=0.01, window=1.0)
        a = _queue("a", "T" if same_tenant else "A", **a_settings)
        b = _queue("b", "T" if same_tenant else "B", **b_settings)
        assert _ids(policy.choose([a, b], 0.0)) == winner
        assert _ids(FairSharePolicy(0.01).choose([b, a], 0.0)) == winner


def test_weights_split_the_device_by_measured_time() -> None:
    slices = [
        SimSlice("heavy", "heavy", cost=lambda rows: 0.004, weight=3.0),
        SimSlice("light", "light", cost=lambda rows: 0.001, weight=1.0),
    ]
    result = simulate(FairSharePolicy(quantum=0.01), slices, decisions=400)
    times = result.tenant_time()
    assert times["heavy"] / sum(times.values()) == pytest.approx(0.75, abs=0.01)


def test_no_credit_for_idleness() -> None:
    # "late" joins after "early" ran alone for a second: it must not then own the device
    # until its virtual time catches up (start-time fair queuing raises it to V).
    slices = [
        SimSlice("early", "early", cost=lambda rows: 0.01),
        SimSlice("late", "late", cost=lambda rows: 0.01, start=1.0),
    ]
    result = simulate(FairSharePolicy(quantum=0.01, window=0.5), slices, until=1.2)
    after = [g.slice_id for g in result.grants if g.time >= 1.0]
    assert len(after) >= 19
    assert after[:20].count("early") >= 9


def test_guarantee_grants_do_not_move_the_fair_queuing_mark() -> None:
    # "lag" is behind "ahead" in virtual time; a guaranteed grant to a slice far ahead of
    # both must not lift them to its mark (where the name would break the tie for "ahead").
    policy = FairSharePolicy(quantum=0.01, window=1.0)
    lag = _queue("lag", "lag")
    ahead = _queue("ahead", "ahead")
    rich = _queue("rich", "rich", share=0.5)
    policy.charge(lag, 0.1, 0.0)
    policy.charge(ahead, 0.3, 0.0)
    policy.charge(rich, 50.0, 0.0)
    assert policy.choose([lag, ahead, rich], 10.0) is rich  # under its guarantee
    policy.charge(rich, 0.6, 10.0)
    assert policy.choose([lag, ahead, rich], 10.0) is lag


# ---- 6. batch sizes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("latency_class", "measured", "expected"),
    [
        ("critical", {1: 0.002, 8: 0.016}, 16),  # critical batches are never cut
        ("standard", {1: 0.002, 8: 0.016}, 5),  # 5 rows = 0.010 s = one quantum
        ("batch", {1: 0.02}, 1),  # even one row is over a quantum: one row anyway
        ("standard", None, 1),  # not measured yet: one row until it is
    ],
)
def test_batch_rows(latency_class: str, measured: dict[int, float] | None, expected: int) -> None:
    queue = _queue(
        "a",
        latency_class=latency_class,
        max_batch_size=16,
        profile=ExecutionProfile(measured),
    )
    assert FairSharePolicy(quantum=0.01).batch_rows(queue) == expected


# ---- 7. forget --------------------------------------------------------------------------


def test_forget_drops_the_slice_but_not_its_tenants_debt() -> None:
    policy = FairSharePolicy(quantum=0.01, window=1.0)
    old = _queue("old", "A")
    other = _queue("other", "B")
    policy.charge(old, 0.5, 0.0)
    policy.charge(other, 0.1, 0.0)
    policy.forget("old")
    policy.forget("never-seen")  # harmless
    assert policy.usage("old", 0.5) == 0.0
    new = _queue("new", "A")
    assert policy.choose([new, other], 0.5) is other  # tenant A still owes its 0.5 s


def test_equal_share_entitlement_is_an_equal_part_among_every_candidate() -> None:
    policy = FairSharePolicy(quantum=0.01, window=1.0)
    a = _queue("a", "ta", arrival=0.0, mode="equal-share")
    b = _queue("b", "tb", arrival=1.0, mode="equal-share")
    other = _queue("other", "tc", arrival=0.0, mode="best-effort", share=0.1)
    policy.choose([a, b, other], 0.0)
    policy.charge(a, 0.4, 0.5)  # over 1/3 (three candidates), under 1/2
    policy.charge(b, 0.45, 0.5)
    policy.charge(other, 0.1, 0.5)  # its own guarantee used up
    # nobody is under its guarantee: the surplus goes to the tenant that used least
    assert policy.choose([b, other, a], 1.0) is other
    policy.charge(other, 0.5, 1.0)
    assert policy.choose([b, other, a], 1.0) is a  # then the equal-share slices, by use


def test_a_lone_equal_share_slice_does_not_claim_a_shared_device_whole() -> None:
    """An equal-share pool's slice next to a best-effort one: its part is 1/2, not the whole
    device; past it, the surplus goes by tenant weight."""
    policy = FairSharePolicy(quantum=0.01, window=1.0)
    equal = _queue("equal", "ta", arrival=0.0, mode="equal-share")
    best = _queue("best", "tb", arrival=0.0, mode="best-effort", weight=9.0)
    policy.choose([equal, best], 0.0)
    policy.charge(equal, 0.4, 0.5)  # under its 1/2
    assert policy.choose([equal, best], 1.0) is equal
    policy.charge(equal, 0.2, 1.0)  # 0.6 of the window: over 1/2, though under 1/1
    assert policy.choose([equal, best], 1.0) is best


def test_flat_fair_queuing_ignores_tenants() -> None:
    # Both of tenant A's equal-share slices used less than tenant B's one, but together
    # more: flat fair queuing compares slices, so one of A's goes first.
    policy = FairSharePolicy(quantum=0.01, window=1.0)
    a1 = _queue("a1", "A", mode="equal-share")
    a2 = _queue("a2", "A", mode="equal-share")
    b = _queue("b", "B", mode="equal-share")
    policy.choose([a1, a2, b], 0.0)
    for queue, used in ((a1, 0.4), (a2, 0.4), (b, 0.5)):
        policy.charge(queue, used, 0.5)  # every one over 1/3 of the window
    assert policy.choose([b, a2, a1], 1.0) is a1


@pytest.mark.parametrize(
    ("mode", "late_tenant"),
    [
        ("best-effort", "T"),  # two slices of one tenant: the slice level's V
        ("equal-share", "U"),  # equal-share slices: the flat level's V
    ],
)
def test_no_credit_for_idleness_between_slices(mode: str, late_tenant: str) -> None:
    slices = [
        SimSlice("early", "T", cost=lambda rows: 0.01, mode=mode),
        SimSlice("late", late_tenant, cost=lambda rows: 0.01, mode=mode, start=1.0),
    ]
    result = simulate(FairSharePolicy(quantum=0.01, window=1.0), slices, until=1.2)
    after = [g.slice_id for g in result.grants if g.time >= 1.0]
    assert len(after) >= 19
    assert after[:20].count("early") >= 8


def test_tenant_ties_go_to_the_oldest_request_of_the_best_class() -> None:
    # A's oldest request is a batch one; its critical request is younger than B's.
    policy = FairSharePolicy(quantum=0.01)
    a_critical = _queue("a1", "A", arrival=5.0, latency_class="critical")
    a_batch = _queue("a2", "A", arrival=0.0, latency_class="batch")
    b_critical = _queue("b1", "B", arrival=3.0, latency_class="critical")
    assert policy.choose([a_critical, a_batch, b_critical], 10.0) is b_critical


def test_a_critical_slice_takes_the_device_back_only_within_its_guarantee_or_turn() -> None:
    policy = FairSharePolicy(quantum=0.01, window=1.0)
    critical = _queue("crit", "tc", latency_class="critical", share=0.2)
    standard = _queue("std", "ts", latency_class="standard", share=0.5)
    policy.choose([critical, standard], 0.0)
    assert policy.preempts(critical, standard, 0.5)  # neither has used anything
    policy.charge(critical, 0.4, 0.5)  # over its 0.2
    assert not policy.preempts(critical, standard, 0.6), "the standard slice is under its 0.5"
    policy.charge(standard, 0.55, 0.6)  # now over its own too, and ahead in fair queuing
    assert policy.preempts(critical, standard, 0.7)
    capped = _queue("cap", "tc", latency_class="critical", share=0.1, mode="fixed-share")
    policy.choose([capped], 0.7)
    policy.charge(capped, 0.3, 0.7)  # far past its cap
    assert not policy.preempts(capped, standard, 0.8)


def test_equal_share_pools_beside_guaranteed_slices_leave_every_slice_its_turn() -> None:
    """Two equal-share slices, one best-effort slice guaranteed half the device and one with
    no share, all saturating: the guarantees do not add up past the device, the half is
    kept, and the slice with no share still runs."""
    from gpuvisor.dispatch.simulate import SimSlice, simulate

    slices = [
        SimSlice("e1", "t1", cost=lambda rows: 0.005, mode="equal-share"),
        SimSlice("e2", "t2", cost=lambda rows: 0.005, mode="equal-share"),
        SimSlice("h", "t3", cost=lambda rows: 0.005, share=0.5),
        SimSlice("z", "t4", cost=lambda rows: 0.005),
    ]
    result = simulate(FairSharePolicy(0.005), slices, until=10.0, seed=1)
    shares = {s: result.device_time([s]) / result.end for s in ("e1", "e2", "h", "z")}
    assert shares["h"] >= 0.49, shares
    assert shares["z"] >= 0.05, shares
    assert result.longest_gap("z") < 1.0, result.longest_gap("z")
