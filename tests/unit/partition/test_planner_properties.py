"""Properties of every plan: valid layouts, the exact demand, never more GPUs than first-fit
decreasing, never fewer than the lower bound."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gpuvisor.partition.mig import GEOMETRIES, check_layout, layout_counts
from gpuvisor.partition.planner import first_fit_decreasing, lower_bound, plan_layouts

MODELS = sorted(GEOMETRIES)


@st.composite
def demands(draw: st.DrawFn) -> tuple[str, dict[str, int]]:
    model = draw(st.sampled_from(MODELS))
    names = [p.name for p in GEOMETRIES[model].profiles]
    counts = draw(st.lists(st.integers(0, 12), min_size=len(names), max_size=len(names)))
    return model, {name: n for name, n in zip(names, counts) if n}


def summed(layouts: list[tuple]) -> dict[str, int]:  # type: ignore[type-arg]
    counts: dict[str, int] = {}
    for layout in layouts:
        for name, n in layout_counts(layout).items():
            counts[name] = counts.get(name, 0) + n
    return counts


@settings(max_examples=120, deadline=None)
@given(demands())
def test_every_plan_is_valid_exact_and_no_worse_than_ffd(case: tuple[str, dict[str, int]]) -> None:
    model, demand = case
    geometry = GEOMETRIES[model]
    planned = plan_layouts(geometry, demand)
    ffd = first_fit_decreasing(geometry, demand)
    for layouts in (planned, ffd):
        # no overlapping memory slices, counts within maxima, offsets allowed, compute fits
        assert all(check_layout(geometry, layout) == [] for layout in layouts)
        assert all(layouts), "no GPU is planned empty"
        assert summed(layouts) == demand
    assert lower_bound(geometry, demand) <= len(planned) <= len(ffd)
