"""A node's workers log as the node does: in its format, at its level, naming the worker."""

from __future__ import annotations

import re
from pathlib import Path

import orjson

from gpuvisor.launch import NodeProcess

# the demo's batch-class slice runs in a worker that lowers its priority at load and says so
_NICENESS = "runs at niceness"
_TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d")


def _log_lines(tmp_path: Path, *args: str) -> list[str]:
    """Start a demo node with ``args``, stop it, and return what it wrote."""
    log_path = tmp_path / "node.log"
    node = NodeProcess(tmp_path / "state", log_path=log_path, extra_args=list(args))
    node.start()
    node.stop()
    return log_path.read_text().splitlines()


def test_json_logs_cover_the_workers_and_name_them(tmp_path: Path) -> None:
    lines = _log_lines(tmp_path, "--log-format", "json")
    # every log line is JSON (the banner, on stdout, is not a log line: it starts otherwise)
    assert not [line for line in lines if _TEXT_LINE.match(line)]
    records = [orjson.loads(line) for line in lines if line.startswith("{")]
    from_workers = [r for r in records if r.get("worker")]
    assert any(_NICENESS in r["message"] for r in from_workers), records
    assert all(re.fullmatch(r"w\d+-\d+", r["worker"]) for r in from_workers)
    # node lines stay without a worker
    assert any(r["logger"] == "gpuvisor.control" and "worker" not in r for r in records)


def test_workers_log_at_the_nodes_level(tmp_path: Path) -> None:
    lines = _log_lines(tmp_path, "--log-level", "WARNING")
    assert not [line for line in lines if _NICENESS in line]
    assert not [line for line in lines if " INFO " in line]
