"""`gpuvisor bench isolation` at a tiny scale: a real node, real floor servers, real traffic."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from rich.console import Console

from gpuvisor.bench.floor import FloorProcess
from gpuvisor.bench.isolation import (
    CRITICAL_MODEL,
    GPUVISOR,
    NAIVE,
    IsolationConfig,
    isolation_command,
)
from gpuvisor.bench.mlp import BenchModel, measure_cost
from gpuvisor.bench.oip_clients import SaturatingLoad, Target, oip_body, run_open_loop

TINY = BenchModel("tiny-mlp", (8, 16, 4))


def test_oip_body_is_a_json_header_then_the_raw_tensor() -> None:
    inputs = TINY.inputs(3)
    body, header_length = oip_body(inputs)
    header = json.loads(body[:header_length])
    assert header["inputs"] == [
        {
            "name": "features",
            "shape": [3, 8],
            "datatype": "FP32",
            "parameters": {"binary_data_size": 3 * 8 * 4},
        }
    ]
    assert body[header_length:] == inputs["features"].tobytes()


def test_bench_models_are_deterministic_and_cost_more_when_wider(tmp_path: Path) -> None:
    first = TINY.build(tmp_path / "a").read_bytes()
    assert TINY.build(tmp_path / "b").read_bytes() == first
    small = measure_cost(TINY.build(tmp_path), TINY.inputs(1), seconds=0.05)
    big = measure_cost(CRITICAL_MODEL.build(tmp_path), CRITICAL_MODEL.inputs(1), seconds=0.05)
    assert 0 < small < big


def test_open_loop_follows_its_seeded_schedule_and_saturating_load_counts(tmp_path: Path) -> None:
    path = TINY.build(tmp_path)
    with FloorProcess(path, TINY.name, log_path=tmp_path / "floor.log") as floor:
        target = Target(floor.address, TINY.name)
        runs = [run_open_loop("x", target, TINY.inputs(1), 200.0, 0.5, seed=7) for _ in range(2)]
        assert runs[0].requests == runs[1].requests  # same seed, same arrivals
        assert 50 <= runs[0].requests <= 150 and runs[0].errors == 0
        assert runs[0].mode == "open" and runs[0].p99_ms >= runs[0].p50_ms > 0

        load = SaturatingLoad(0.5)
        load.add(target, TINY.inputs(2), concurrency=2)
        load.add(Target(floor.address, "no-such-model"), TINY.inputs(1), concurrency=1)
        answered, refused = _run(load)
        assert answered[0] > 10 and answered[1] == 0
        assert refused[0] == 0 and refused[1] > 0


def _run(load: SaturatingLoad) -> tuple[list[int], list[int]]:
    load.start()
    counts = load.finish()
    return [ok for ok, _ in counts], [failed for _, failed in counts]


def test_isolation_command_writes_every_figure_the_docs_need(tmp_path: Path) -> None:
    config = IsolationConfig(
        duration=1.0, repeat=1, rate=60.0, batch_concurrency=2, workdir=tmp_path
    )
    output = tmp_path / "isolation.json"
    console = Console(file=io.StringIO(), width=200)
    assert isolation_command(config, output, console) == 0
    doc = json.loads(output.read_text())
    assert doc["benchmark"] == "isolation" and doc["config"]["rate_per_s"] == 60.0
    assert set(doc["systems"]) == {GPUVISOR, NAIVE}
    for name, system in doc["systems"].items():
        median = system["median"]
        assert math.isfinite(median["p99_ratio"]) and median["p99_ratio"] > 0, name
        assert median["colocated_p99_ms"] >= median["colocated_p50_ms"] > 0
        (run,) = system["runs"]
        assert run["solo"]["errors"] == 0 and run["colocated"]["errors"] == 0
        assert run["solo"]["requests"] == run["colocated"]["requests"] > 20  # same seed
        assert run["batch_requests_per_s"] > 0 and run["batch_busy_s"] > 0
        assert run["critical_busy_s"] > 0
        assert run["batch_free_time_used"] > 0
    # gpuvisor's busy seconds are device seconds: they cannot exceed the window.
    gv = doc["systems"][GPUVISOR]["runs"][0]
    assert gv["critical_busy_s"] + gv["batch_busy_s"] <= gv["elapsed_s"] * 1.05
    assert doc["model_cost_ms"] and all(v > 0 for v in doc["model_cost_ms"].values())
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "p99 ratio" in text and "results written to" in text


@pytest.mark.parametrize("rate", [0.0, -1.0])
def test_open_loop_refuses_a_rate_that_is_not_positive(rate: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        run_open_loop("x", Target("127.0.0.1:9", "m"), TINY.inputs(1), rate, 1.0, seed=0)
