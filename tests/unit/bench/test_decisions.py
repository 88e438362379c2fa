"""`gpuvisor bench decisions`: the decision-cost benchmark, run small."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from gpuvisor.bench.decisions import POLICIES, build_backlog, decisions_command, run_decisions


def test_backlog_is_varied_and_backlogged() -> None:
    queues = build_backlog(40, seed=1)
    assert len(queues) == 40
    assert len({q.slice_id for q in queues}) == 40
    assert len({q.tenant for q in queues}) > 1
    assert len({q.latency_class for q in queues}) == 3
    assert 0 < sum(q.share for q in queues) <= 0.5 + 1e-9
    assert all(q.queued_rows == q.max_batch_size and q.profile.known for q in queues)


def test_run_decisions_reports_percentiles_per_policy() -> None:
    result = run_decisions(slices=20, decisions=300)
    assert set(result["policies"]) == set(POLICIES)
    for cost in result["policies"].values():
        assert cost["decisions"] == 300
        assert 0 < cost["p50_us"] <= cost["p99_us"] <= cost["max_us"]


def test_decisions_command_prints_a_table_and_writes_json(tmp_path: Path) -> None:
    out = io.StringIO()
    output = tmp_path / "results" / "decisions.json"
    assert decisions_command(10, 200, output, Console(file=out, width=120)) == 0
    payload = json.loads(output.read_text())
    assert payload["benchmark"] == "decisions"
    assert payload["config"]["slices"] == 10
    assert payload["machine"]["cpus"] >= 1
    text = out.getvalue()
    assert "fair-share" in text and "fifo" in text and str(output) in text


@pytest.mark.parametrize(("slices", "decisions"), [(0, 10), (10, 0)])
def test_nonsense_sizes_are_rejected(slices: int, decisions: int) -> None:
    with pytest.raises(ValueError, match="at least one"):
        run_decisions(slices, decisions)
