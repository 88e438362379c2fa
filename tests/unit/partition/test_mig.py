"""MIG geometry tables: the maximal layouts they allow are the documented ones, and every
invalid placement is refused."""

from __future__ import annotations

import itertools

import pytest

from gpuvisor.partition.mig import (
    GEOMETRIES,
    MigGeometry,
    MigInstance,
    MigProfile,
    check_layout,
    describe_no_room,
    enumerate_layouts,
    format_slices,
    free_starts,
    geometry_for,
    layout_counts,
    maximal_layouts,
    use_driver_geometry,
)

MODELS = ["A100-40GB", "A100-80GB", "H100-80GB", "H100-94GB", "H200-141GB"]

# (name, profile id, compute slices, memory slices, max count, valid starts) per model, from the
# MIG user guide's profile tables and `nvidia-smi mig -lgipp` placements (R580).
EXPECTED = {
    "A100-40GB": ["1g.5gb", "1g.5gb+me", "1g.10gb", "2g.10gb", "3g.20gb", "4g.20gb", "7g.40gb"],
    "A100-80GB": ["1g.10gb", "1g.10gb+me", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"],
    "H100-80GB": ["1g.10gb", "1g.10gb+me", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"],
    "H100-94GB": ["1g.12gb", "1g.12gb+me", "1g.24gb", "2g.24gb", "3g.47gb", "4g.47gb", "7g.94gb"],
    "H200-141GB": ["1g.18gb", "1g.18gb+me", "1g.35gb", "2g.35gb", "3g.71gb", "4g.71gb", "7g.141gb"],
}
SHAPE = [
    (19, 1, 1, 7, (0, 1, 2, 3, 4, 5, 6)),
    (20, 1, 1, 1, (0, 1, 2, 3, 4, 5, 6)),
    (15, 1, 2, 4, (0, 2, 4, 6)),
    (14, 2, 2, 3, (0, 2, 4)),
    (9, 3, 4, 2, (0, 4)),
    (5, 4, 4, 1, (0,)),
    (0, 7, 8, 1, (0,)),
]

# The MIG user guide's figure of valid A100 configurations: 19 combinations of the 1-, 2-, 3-,
# 4- and 7-compute-slice profiles, each written left to right by compute slices from memory
# slice 0, the right half (after '|') starting at memory slice 4.
DOCUMENTED = [
    "7", "4|3", "4|21", "4|111", "3|3", "3|21", "3|111",
    "22|3", "211|3", "112|3", "1111|3",
    "22|21", "211|21", "112|21", "1111|21",
    "22|111", "211|111", "112|111", "1111|111",
]  # fmt: skip


def names(model: str) -> dict[str, str]:
    one, _me, one_wide, two, three, four, seven = EXPECTED[model]
    return {"1": one, "2": two, "3": three, "4": four, "7": seven, "1w": one_wide}


def documented_layout(model: str, combination: str) -> frozenset[MigInstance]:
    profile = names(model)
    size = {"1": 1, "2": 2, "3": 4, "4": 4, "7": 8}
    instances = []
    for half, offset in zip(combination.split("|"), (0, 4)):
        for digit in half:
            instances.append(MigInstance(offset, profile[digit]))
            offset += size[digit]
    return frozenset(instances)


def as_sets(layouts: list[tuple[MigInstance, ...]]) -> set[frozenset[MigInstance]]:
    return {frozenset(layout) for layout in layouts}


@pytest.mark.parametrize("model", MODELS)
def test_tables_match_the_user_guide(model: str) -> None:
    geometry = GEOMETRIES[model]
    assert (geometry.memory_slices, geometry.compute_slices) == (8, 7)
    got = [
        (p.name, p.profile_id, p.compute_slices, p.memory_slices, p.max_count, p.starts)
        for p in geometry.profiles
    ]
    assert got == [(name, *shape) for name, shape in zip(EXPECTED[model], SHAPE)]


@pytest.mark.parametrize("model", MODELS)
def test_maximal_layouts_are_the_documented_combinations(model: str) -> None:
    p = names(model)
    classic = [p["1"], p["2"], p["3"], p["4"], p["7"]]
    expected = {documented_layout(model, c) for c in DOCUMENTED}
    assert len(expected) == 19
    assert as_sets(maximal_layouts(GEOMETRIES[model], classic)) == expected


def test_the_issue_examples_are_maximal_profile_mixes_on_h100() -> None:
    mixes = {
        tuple(sorted(layout_counts(layout).items()))
        for layout in maximal_layouts(
            GEOMETRIES["H100-80GB"], EXPECTED["H100-80GB"][:1] + EXPECTED["H100-80GB"][3:]
        )
    }
    assert (("1g.10gb", 7),) in mixes
    assert (("3g.40gb", 1), ("4g.40gb", 1)) in mixes
    assert (("1g.10gb", 1), ("2g.20gb", 3)) in mixes
    assert (("3g.40gb", 2),) in mixes
    assert (("1g.10gb", 4),) not in mixes  # room is left for more


@pytest.mark.parametrize("model", MODELS)
def test_with_the_two_slice_one_g_profile_every_pair_combination_is_maximal(model: str) -> None:
    """Slices 0-3 hold 4g, 3g, or two pairs; 4-7 hold 3g, or pair 4-5 and pair 6-7 (where a
    one-slice instance leaves slice 7 unusable). Each pair holds 2g, the 2-slice 1g or two 1g."""
    p = names(model)

    def pair(start: int, two_g: bool = True) -> list[list[MigInstance]]:
        options = [[MigInstance(start, p["1w"])]]
        if two_g:
            options += [
                [MigInstance(start, p["2"])],
                [MigInstance(start, p["1"]), MigInstance(start + 1, p["1"])],
            ]
        else:
            options += [[MigInstance(start, p["1"])]]
        return options

    left = [[MigInstance(0, p["4"])], [MigInstance(0, p["3"])]] + [
        a + b for a, b in itertools.product(pair(0), pair(2))
    ]
    right = [[MigInstance(4, p["3"])]] + [
        a + b for a, b in itertools.product(pair(4), pair(6, two_g=False))
    ]
    expected = {frozenset(a + b) for a, b in itertools.product(left, right)}
    expected.add(frozenset([MigInstance(0, p["7"])]))
    assert len(expected) == 78
    profiles = [p["1"], p["1w"], p["2"], p["3"], p["4"], p["7"]]
    assert as_sets(maximal_layouts(GEOMETRIES[model], profiles)) == expected


def test_with_media_extensions_one_one_slice_instance_may_carry_them() -> None:
    geometry = GEOMETRIES["H100-80GB"]
    without_me = [n for n in EXPECTED["H100-80GB"] if not n.endswith("+me")]
    base = maximal_layouts(geometry, without_me)
    expected = as_sets(base)
    for layout in base:
        for i, instance in enumerate(layout):
            if instance.profile == "1g.10gb":
                swapped = list(layout)
                swapped[i] = MigInstance(instance.start, "1g.10gb+me")
                expected.add(frozenset(swapped))
    assert as_sets(maximal_layouts(geometry)) == expected


@pytest.mark.parametrize("model", MODELS)
def test_every_offset_outside_the_valid_starts_is_refused(model: str) -> None:
    geometry = GEOMETRIES[model]
    for profile in geometry.profiles:
        for start in range(geometry.memory_slices):
            problems = check_layout(geometry, [MigInstance(start, profile.name)])
            if start in profile.starts:
                assert problems == []
            else:
                assert [(p.index, p.field) for p in problems] == [(0, "start")]
                assert f"cannot start at memory slice {start}" in problems[0].message


def test_every_overlapping_pair_is_refused_and_every_disjoint_pair_accepted() -> None:
    geometry = GEOMETRIES["H100-80GB"]
    placements = [(p, s) for p in geometry.profiles for s in p.starts]
    for (a, sa), (b, sb) in itertools.product(placements, repeat=2):
        problems = check_layout(geometry, [MigInstance(sa, a.name), MigInstance(sb, b.name)])
        overlap = a.mask(sa) & b.mask(sb)
        too_many = a is b and a.max_count < 2
        if overlap:
            assert problems and problems[0].index == 1 and "overlaps" in problems[0].message
        elif too_many:
            assert problems and "more than 1" in problems[0].message
        else:
            assert problems == [], (a.name, sa, b.name, sb)


def test_count_limits_unknown_profiles_and_compute_are_refused() -> None:
    geometry = GEOMETRIES["A100-40GB"]
    twice = check_layout(geometry, [MigInstance(0, "1g.5gb+me"), MigInstance(1, "1g.5gb+me")])
    assert [p.message for p in twice] == ["more than 1 × 1g.5gb+me: an A100-40GB takes at most 1"]
    unknown = check_layout(geometry, [MigInstance(0, "1g.10gb"), MigInstance(2, "1g.11gb")])
    assert unknown[0].field == "profile" and "no MIG profile '1g.11gb'" in unknown[0].message
    assert "did you mean '1g.10gb'" in unknown[0].message
    # another model's name for a shape: the same shape here, not the closest spelling
    h100 = GEOMETRIES["H100-80GB"].unknown_profile_message("1g.5gb")
    assert "('1g.5gb' is the A100-40GB's name; the same instance here is '1g.10gb')" in h100
    # a name two models give to different shapes: the closest spelling
    assert "did you mean '1g.18gb'" in GEOMETRIES["H200-141GB"].unknown_profile_message("1g.10gb")
    # A geometry where memory allows more than compute: the compute check has to catch it.
    wide = MigGeometry("toy", (MigProfile("4g.x", 1, 4, 1, 4, (0, 1, 2, 3)),), 4, 7)
    found = check_layout(wide, [MigInstance(0, "4g.x"), MigInstance(1, "4g.x")])
    assert found[0].message == "the instances need 8 compute slices; an toy has 7"


@pytest.mark.parametrize(
    ("layout", "profile", "reason"),
    [
        (
            [(s, "1g.10gb") for s in range(7)],
            "1g.10gb",
            "1g.10gb needs offset 0–6 free; slices 0–6 are taken",
        ),
        (
            [(0, "3g.40gb"), (4, "2g.20gb"), (6, "1g.10gb")],
            "1g.10gb",
            "1g.10gb needs offset 0–6 free; slices 0–6 are taken",
        ),
        (
            [(2, "1g.10gb"), (5, "1g.10gb")],
            "3g.40gb",
            "3g.40gb needs slices 0–3 or 4–7 free; slices 2, 5 are taken",
        ),
        ([(4, "1g.10gb")], "4g.40gb", ""),
        ([(0, "4g.40gb")], "4g.40gb", "4g.40gb needs slices 0–3 free; slices 0–3 are taken"),
        (
            [(3, "1g.10gb+me")],
            "1g.10gb+me",
            "1g.10gb+me: 1 already, the most an H100-80GB takes is 1",
        ),
    ],
)
def test_no_room_reasons_name_the_offsets_and_the_taken_slices(
    layout: list[tuple[int, str]], profile: str, reason: str
) -> None:
    instances = [MigInstance(s, p) for s, p in layout]
    assert describe_no_room(GEOMETRIES["H100-80GB"], instances, profile) == reason


def test_free_starts_respects_memory_counts_and_layout() -> None:
    geometry = GEOMETRIES["H100-80GB"]
    assert free_starts(geometry, [], "2g.20gb") == [0, 2, 4]
    assert free_starts(geometry, [MigInstance(2, "2g.20gb")], "2g.20gb") == [0, 4]
    assert free_starts(geometry, [MigInstance(0, "7g.80gb")], "1g.10gb") == []
    assert free_starts(geometry, [], "9g.1tb") == []


def test_layouts_are_enumerated_exactly_once() -> None:
    layouts = enumerate_layouts(GEOMETRIES["H100-80GB"])
    assert len(layouts) == len(as_sets(layouts))
    assert () in layouts
    assert all(check_layout(GEOMETRIES["H100-80GB"], layout) == [] for layout in layouts)


def test_format_slices_writes_ranges() -> None:
    assert format_slices([6, 0, 1, 2, 3]) == "0–3, 6"
    assert format_slices([2, 5]) == "2, 5"
    assert format_slices([4, 5]) == "4, 5"
    assert format_slices([]) == ""


def test_driver_geometry_wins_over_the_tables() -> None:
    assert geometry_for("h100-80gb") is GEOMETRIES["H100-80GB"]
    assert geometry_for("L4") is None
    driver = MigGeometry("H100-80GB", GEOMETRIES["H100-80GB"].profiles[:2], source="nvml")
    use_driver_geometry(driver)
    assert geometry_for("H100-80GB") is driver
