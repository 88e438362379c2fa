"""The MIG planner: exact instance counts, fewest GPUs, additions, owners, and the baseline."""

from __future__ import annotations

import pytest

from gpuvisor.partition.mig import (
    GEOMETRIES,
    MigInstance,
    check_layout,
    free_starts,
    layout_counts,
)
from gpuvisor.partition.planner import (
    InstanceRequest,
    add_instance,
    first_fit_decreasing,
    lower_bound,
    plan_layouts,
    plan_requests,
)

H100 = GEOMETRIES["H100-80GB"]


def total(layouts: list[tuple[MigInstance, ...]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for layout in layouts:
        for name, n in layout_counts(layout).items():
            counts[name] = counts.get(name, 0) + n
    return counts


@pytest.mark.parametrize(
    ("demand", "gpus"),
    [
        ({"1g.10gb": 7}, 1),
        ({"1g.10gb": 8}, 2),
        ({"4g.40gb": 2, "3g.40gb": 2}, 2),  # 4g+3g twice; 3g+3g first would need three
        ({"2g.20gb": 3, "1g.10gb": 1}, 1),
        ({"3g.40gb": 3, "2g.20gb": 1, "1g.20gb": 1}, 2),
        ({"7g.80gb": 2, "1g.10gb+me": 1}, 3),
        ({"1g.10gb+me": 3}, 3),  # at most one per GPU
        ({"1g.20gb": 4, "1g.10gb": 1}, 2),
    ],
)
def test_known_optima(demand: dict[str, int], gpus: int) -> None:
    layouts = plan_layouts(H100, demand)
    assert len(layouts) == gpus == lower_bound(H100, demand)
    assert total(layouts) == demand
    assert all(check_layout(H100, layout) == [] for layout in layouts)


def test_the_planner_beats_first_fit_decreasing_where_it_is_fooled() -> None:
    """FFD puts 3g.40gb at its lowest offset, 0; 2g.20gb then fits only at 4, and the second
    needs a GPU of its own. 2g+2g on slices 0-3 and 3g at 4 fit one GPU."""
    demand = {"3g.40gb": 1, "2g.20gb": 2}
    assert len(first_fit_decreasing(H100, demand)) == 2
    (layout,) = plan_layouts(H100, demand)
    assert layout == (
        MigInstance(0, "2g.20gb"),
        MigInstance(2, "2g.20gb"),
        MigInstance(4, "3g.40gb"),
    )


def test_large_demands_are_planned_at_the_lower_bound_quickly() -> None:
    demand = {"1g.10gb": 2000, "1g.20gb": 500, "2g.20gb": 1000, "3g.40gb": 800, "4g.40gb": 200}
    layouts = plan_layouts(H100, demand)
    assert total(layouts) == demand
    assert len(layouts) == lower_bound(H100, demand)
    assert len(layouts) <= len(first_fit_decreasing(H100, demand))


def test_empty_and_unknown_demands() -> None:
    assert plan_layouts(H100, {}) == []
    assert plan_layouts(H100, {"1g.10gb": 0}) == []
    assert lower_bound(H100, {}) == 0
    with pytest.raises(ValueError, match=r"H100-80GB has no MIG profile '1g\.5gb'"):
        plan_layouts(H100, {"1g.5gb": 1})


def test_profile_names_are_case_insensitive() -> None:
    assert total(plan_layouts(H100, {"3G.40GB": 2})) == {"3g.40gb": 2}


def test_add_instance_keeps_room_for_larger_profiles() -> None:
    # With 3g.40gb at 0, a 1g.10gb could go at 4..6; at 6 it keeps 2g.20gb@4 possible.
    added = add_instance(H100, [MigInstance(0, "3g.40gb")], "1g.10gb")
    assert added is not None and check_layout(H100, [MigInstance(0, "3g.40gb"), added]) == []
    assert added.start == 6
    # On an empty GPU a 2g.20gb at 4 keeps slices 0-3 whole (4g.40gb or 3g.40gb still fit).
    first = add_instance(H100, [], "2g.20gb")
    assert first == MigInstance(4, "2g.20gb")
    assert free_starts(H100, [first], "4g.40gb") == [0]
    assert add_instance(H100, [MigInstance(0, "7g.80gb")], "1g.10gb") is None
    assert add_instance(H100, [], "nope") is None


def test_requests_get_their_instances_and_dedicated_tenants_get_their_own_gpus() -> None:
    requests = [
        InstanceRequest("3g.40gb", 1, "retail", "shelf"),
        InstanceRequest("3g.40gb", 1, "support", "chat"),
    ]
    shared = plan_requests(H100, requests)
    assert len(shared) == 1
    owners = sorted(r.tenant or "" for _, r in shared[0].instances)
    assert owners == ["retail", "support"]
    dedicated = plan_requests(H100, requests, dedicated=True)
    assert len(dedicated) == 2
    assert all(len({r.tenant for _, r in gpu.instances}) == 1 for gpu in dedicated)
    assert all(gpu.layout == tuple(i for i, _ in gpu.instances) for gpu in dedicated)
