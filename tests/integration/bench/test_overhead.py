"""`gpuvisor bench overhead` at a tiny scale: real floor server, real node, real tritonclient."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from rich.console import Console

from gpuvisor.bench.floor import FloorProcess
from gpuvisor.bench.loadgen import (
    LoadResult,
    median_result,
    percentile,
    run_closed_loop,
    triton_call_factory,
    write_json,
)
from gpuvisor.bench.overhead import (
    DIRECT,
    FLOOR,
    GPUVISOR,
    OverheadConfig,
    render_report,
    run_overhead,
)
from gpuvisor.bench.overhead_systems import (
    build_model,
    direct_call_factory,
    direct_session,
    fetch_outputs,
    start_gpuvisor,
)
from gpuvisor.demo.models import sample_inputs

pytest.importorskip("tritonclient.http")

MODEL = "basket-scorer"


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([5.0], 50, 5.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
        ([1.0, 2.0, 3.0, 4.0], 0, 1.0),
        ([1.0, 2.0, 3.0, 4.0], 100, 4.0),
        ([4.0, 1.0, 3.0, 2.0], 99, 3.97),
        (list(map(float, range(101))), 99, 99.0),
    ],
)
def test_percentile_matches_numpy(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == pytest.approx(expected)
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_nothing_is_nan_and_q_is_checked() -> None:
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="percentile"):
        percentile([1.0], 101)


def test_closed_loop_sends_exactly_the_bounded_count_and_counts_errors() -> None:
    sent: list[int] = []
    lock = threading.Lock()

    def make_call():  # type: ignore[no-untyped-def]
        def call() -> None:
            with lock:
                sent.append(1)
                fail = len(sent) % 4 == 0
            if fail:
                raise RuntimeError("every fourth request fails")

        return call

    done: list[int] = []
    result = run_closed_loop("fake", make_call, requests=103, threads=8, on_progress=done.append)
    assert len(sent) == 103 == result.requests == sum(done)
    assert result.errors == 25
    assert len(result.latencies_ms) == 78
    assert result.error_samples == ("RuntimeError: every fourth request fails",)
    assert result.rps > 0 and result.p50_ms <= result.p99_ms


def test_closed_loop_reraises_a_client_that_cannot_be_built() -> None:
    def make_call():  # type: ignore[no-untyped-def]
        raise ConnectionError("nobody listens")

    with pytest.raises(ConnectionError, match="nobody listens"):
        run_closed_loop("broken", make_call, requests=10, threads=4)


def test_median_result_takes_medians_and_sums_errors() -> None:
    runs = [
        LoadResult.from_latencies("x", "closed", 2, [float(v)] * 10, errors, seconds)
        for v, errors, seconds in ((1, 0, 1.0), (3, 2, 2.0), (2, 0, 4.0))
    ]
    median = median_result(runs)
    assert (
        median.p50_ms == 2.0 and median.rps == 5.0 and median.errors == 2 and median.requests == 32
    )


def test_floor_and_gpuvisor_answer_like_onnxruntime(tmp_path: Path) -> None:
    model_path = build_model(MODEL, tmp_path / "models")
    inputs = sample_inputs(MODEL)
    session = direct_session(model_path)
    expected = session.run(None, inputs)[0]
    direct = run_closed_loop(DIRECT, direct_call_factory(session, inputs), 200, 8)
    assert direct.errors == 0 and direct.requests == 200

    with (
        FloorProcess(model_path, MODEL, log_path=tmp_path / "floor.log") as floor,
        start_gpuvisor(MODEL, model_path, tmp_path / "node") as target,
    ):
        assert httpx.post(f"{floor.url}/v2/models/other/infer", content=b"{}").status_code == 404
        bad = httpx.post(f"{floor.url}/v2/models/{MODEL}/infer", content=b"not json")
        assert bad.status_code == 400 and "error" in bad.json()
        floor_out = fetch_outputs(floor.address, MODEL, inputs)
        node_out = fetch_outputs(target.node.address, MODEL, inputs, target.headers)
        np.testing.assert_array_equal(floor_out["score"], expected)
        np.testing.assert_allclose(node_out["score"], expected, rtol=1e-6)
        assert node_out["score"].dtype == np.float32 and node_out["score"].shape == (1, 1)

        for name, factory in [
            (FLOOR, triton_call_factory(floor.address, MODEL, inputs)),
            (GPUVISOR, triton_call_factory(target.node.address, MODEL, inputs, target.headers)),
        ]:
            result = run_closed_loop(name, factory, 200, 8)
            assert (result.requests, result.errors) == (200, 0), result.error_samples
            assert result.rps > 0 and 0 < result.p50_ms <= result.p99_ms
        pid = target.node.process.pid if target.node.process else None
        floor_process = floor.process
    # Both children were stopped (by PID) when their blocks ended.
    assert (
        pid is not None
        and target.node.process is not None
        and target.node.process.poll() is not None
    )
    assert floor_process is not None and floor_process.poll() is not None


def test_run_overhead_reports_every_system(tmp_path: Path) -> None:
    config = OverheadConfig(requests=200, threads=8, repeat=1, warmup=20, workdir=tmp_path)
    report = run_overhead(config)

    assert set(report.runs) == {DIRECT, FLOOR, GPUVISOR}
    for name, median in report.medians.items():
        assert len(report.runs[name]) == 1
        assert (median.requests, median.errors) == (200, 0), (name, median.error_samples)
        assert median.rps > 0 and 0 <= median.p50_ms <= median.p99_ms
    assert set(report.max_abs_diff) == {FLOOR, GPUVISOR}
    assert all(diff <= 1e-6 for diff in report.max_abs_diff.values())
    assert set(report.ratios) == {"throughput", "p50", "p99"}
    assert report.ratios["throughput"] > 0

    path = write_json(tmp_path / "out" / "overhead.json", report.to_json())
    saved = json.loads(path.read_text())
    assert saved["config"]["requests"] == 200
    assert set(saved["systems"]) == {DIRECT, FLOOR, GPUVISOR}
    assert saved["systems"][GPUVISOR]["median"]["errors"] == 0
    assert "throughput" in saved["ratios"]["gpuvisor_over_floor"]

    console = Console(record=True, width=120)
    render_report(report, console)
    text = console.export_text()
    assert "(c) gpuvisor, end to end" in text and "(c)/(b): throughput" in text
