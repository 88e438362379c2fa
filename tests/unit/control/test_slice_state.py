"""A slice's ``since`` is when it entered its state: a new reason alone (a rolling update's
note on a Ready instance, a cordon's) does not reset it."""

from __future__ import annotations

import pytest

from gpuvisor.control.slices import SliceState


def _ready() -> SliceState:
    state = SliceState(
        id="retail/shelf/0",
        tenant="retail",
        deployment="shelf",
        replica=0,
        spec_hash="h",
        pool="default",
        profile="p",
        memory=2**28,
        compute_share=0.25,
        isolation="process",
        latency_class="standard",
        model_name="shelf",
        model_version="1",
    )
    state.set_state("Ready")
    return state


def test_a_new_reason_keeps_since_and_a_new_state_sets_it(monkeypatch: pytest.MonkeyPatch) -> None:
    state = _ready()
    entered = state.since
    monkeypatch.setattr("gpuvisor.control.slices.time.time", lambda: entered + 60)
    state.set_state("Ready", "serving the previous spec until its replacement is Ready")
    assert (state.reason, state.since) == (
        "serving the previous spec until its replacement is Ready",
        entered,
    )
    state.set_state("Stopping", "stopping: replaced by retail/shelf/0#2")
    assert state.since == entered + 60
