"""Fragmentation (free slices no requested profile can use) and defragmentation plans."""

from __future__ import annotations

import pytest

from gpuvisor.partition.fragmentation import GpuLayout, plan_defrag, unusable_slices
from gpuvisor.partition.mig import GEOMETRIES, MigInstance, check_layout, free_starts

H100 = GEOMETRIES["H100-80GB"]


def layout(*pairs: tuple[int, str]) -> tuple[MigInstance, ...]:
    return tuple(MigInstance(s, p) for s, p in pairs)


@pytest.mark.parametrize(
    ("instances", "profiles", "unusable"),
    [
        (layout((0, "3g.40gb"), (4, "1g.10gb"), (5, "1g.10gb"), (6, "1g.10gb")), ["1g.10gb"], [7]),
        (layout((0, "3g.40gb"), (4, "1g.10gb"), (5, "1g.10gb"), (6, "1g.10gb")), ["1g.20gb"], [7]),
        (layout((0, "3g.40gb")), ["3g.40gb"], []),
        (layout((0, "2g.20gb"), (4, "2g.20gb")), ["3g.40gb", "4g.40gb"], [2, 3, 6, 7]),
        (layout((0, "2g.20gb"), (4, "2g.20gb")), ["3g.40gb", "1g.10gb"], [7]),
        (layout(), [], list(range(8))),
    ],
)
def test_unusable_slices(
    instances: tuple[MigInstance, ...], profiles: list[str], unusable: list[int]
) -> None:
    assert unusable_slices(H100, instances, profiles) == unusable


def apply(
    gpus: list[GpuLayout], plan_moves: tuple, target: tuple[str, int, str]
) -> dict[str, list[MigInstance]]:  # type: ignore[type-arg]
    layouts = {g.id: list(g.instances) for g in gpus}
    for move in plan_moves:
        layouts[move.gpu].remove(move.instance)
        layouts[move.to_gpu].append(MigInstance(move.to_start, move.instance.profile))
    gpu, start, profile = target
    layouts[gpu].append(MigInstance(start, profile))
    return layouts


def test_one_move_on_the_same_gpu_makes_room() -> None:
    gpus = [GpuLayout("a", H100, layout((2, "1g.10gb"), (5, "1g.10gb")), busy=frozenset({2}))]
    plan = plan_defrag(gpus, "3g.40gb")
    assert plan is not None and len(plan.moves) == 1
    (move,) = plan.moves
    assert move.carries_slice is (move.instance.start == 2)
    after = apply(gpus, plan.moves, (plan.gpu, plan.start, plan.profile))
    assert all(check_layout(H100, instances) == [] for instances in after.values())
    assert "then 3g.40gb fits a at offset" in plan.describe()


def test_pinned_instances_never_move() -> None:
    gpus = [
        GpuLayout(
            "a",
            H100,
            layout((2, "1g.10gb"), (5, "1g.10gb")),
            pinned=frozenset({2}),
            busy=frozenset({2, 5}),
        )
    ]
    plan = plan_defrag(gpus, "3g.40gb")
    assert plan is not None
    assert [m.instance for m in plan.moves] == [MigInstance(5, "1g.10gb")]
    assert (plan.gpu, plan.start) == ("a", 4)
    gpus = [GpuLayout("a", H100, gpus[0].instances, pinned=frozenset({2, 5}))]
    assert plan_defrag(gpus, "3g.40gb") is None


def test_moves_go_to_another_gpu_and_the_fewest_are_chosen() -> None:
    gpus = [
        # "a" has no 3g.40gb window with one blocker; "b" frees 4-7 by moving 2g.20gb to a@2.
        GpuLayout(
            "a", H100, layout((0, "1g.10gb"), (1, "1g.10gb"), (4, "2g.20gb"), (6, "1g.20gb"))
        ),
        GpuLayout("b", H100, layout((0, "4g.40gb"), (4, "2g.20gb"))),
    ]
    assert free_starts(H100, gpus[0].instances, "3g.40gb") == []
    plan = plan_defrag(gpus, "3g.40gb")
    assert plan is not None
    after = apply(gpus, plan.moves, (plan.gpu, plan.start, plan.profile))
    assert all(check_layout(H100, instances) == [] for instances in after.values())
    assert (plan.gpu, plan.start) == ("b", 4)
    assert [(m.gpu, m.instance.profile, m.to_gpu, m.to_start) for m in plan.moves] == [
        ("b", "2g.20gb", "a", 2)
    ]


def test_already_placeable_needs_no_move_and_impossible_gives_none() -> None:
    plan = plan_defrag([GpuLayout("a", H100, layout((0, "4g.40gb")))], "3g.40gb")
    assert plan is not None and plan.moves == () and (plan.gpu, plan.start) == ("a", 4)
    assert plan.describe() == "3g.40gb already fits a at offset 4"
    full = [GpuLayout("a", H100, layout((0, "7g.80gb")))]
    assert plan_defrag(full, "3g.40gb") is None  # the 7g.80gb has nowhere to go
    assert plan_defrag(full, "1g.5gb") is None
