"""deploy/grafana/dashboard.json is a valid Grafana dashboard model: panels with targets on a
Prometheus data source, unique ids, a layout that fits the grid, variables that exist.
(Its PromQL is checked against a real /metrics scrape in tests/integration/test_metrics.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
DASHBOARD = ROOT / "deploy/grafana/dashboard.json"
PANEL_TYPES = {"row", "timeseries", "stat", "bargauge", "table", "gauge"}
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range"}


@pytest.fixture(scope="module")
def model() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def test_top_level_fields(model: dict[str, Any]) -> None:
    for key in ("title", "uid", "schemaVersion", "panels", "templating", "time", "version"):
        assert key in model, key
    assert isinstance(model["schemaVersion"], int) and model["schemaVersion"] >= 36
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", model["uid"])
    assert model["time"] == {"from": "now-1h", "to": "now"}


def test_panels_have_ids_layout_and_prometheus_targets(model: dict[str, Any]) -> None:
    panels = model["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for p in panels:
        assert p["type"] in PANEL_TYPES, p["title"]
        assert p["title"]
        g = p["gridPos"]
        assert g["w"] >= 1 and g["h"] >= 1 and g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel '{p['title']}' overlaps another"
                cells.add((x, y))
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], f"panel '{p['title']}' has no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"]["type"] == "prometheus"
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
            assert t["expr"].count("{") == t["expr"].count("}"), t["expr"]


def test_variables_used_are_defined(model: dict[str, Any]) -> None:
    defined = {v["name"] for v in model["templating"]["list"]}
    assert {"datasource", "cluster", "tenant", "device"} <= defined
    used = set(re.findall(r"\$\{?(\w+)", json.dumps(model["panels"])))
    assert used - BUILTIN_VARIABLES <= defined


def test_the_panels_the_operator_needs_are_there(model: dict[str, Any]) -> None:
    titles = " | ".join(p["title"].lower() for p in model["panels"])
    for needed in ("p95", "p99", "queue wait", "share", "guarantee", "memory", "rejection",
                   "restarts", "healthy", "temperature", "power", "throttl", "utilisation"):  # fmt: skip
        assert needed in titles, needed
    exprs = " ".join(t["expr"] for p in model["panels"] for t in p.get("targets", []))
    assert "gpu_job_queue_wait_seconds_bucket" in exprs
    assert "histogram_quantile(0.99" in exprs and "histogram_quantile(0.95" in exprs


def test_prometheus_example_scrapes_metrics_and_loads_the_alerts() -> None:
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"]
    assert config["rule_files"] == ["alerts.yml"]
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    for rule in rules["groups"][0]["rules"]:
        assert rule["alert"].startswith("Gpuvisor") and rule["expr"].strip()
        assert rule["annotations"]["summary"]
