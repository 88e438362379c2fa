"""The worker's batch execution with a real onnxruntime model: batching, per-request errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import orjson
import pytest
from onnx import TensorProto, helper

from gpuvisor.demo.models import build_demo_models
from gpuvisor.runtime import protocol as p
from gpuvisor.runtime.execution import LoadedSlice, profile_batches, run_requests
from gpuvisor.runtime.executors.base import ExecutorDevice, load_executor


@pytest.fixture(scope="module")
def scorer(tmp_path_factory: pytest.TempPathFactory) -> LoadedSlice:
    path = build_demo_models(tmp_path_factory.mktemp("models"))["basket-scorer"]
    executor = load_executor("onnx", Path(path), ExecutorDevice(kind="cpu", threads=1))
    spec = p.LoadModel("t/d/0", "basket-scorer", "1", "onnx", str(path), None, "cpu", 0, 1, None, 4)
    return LoadedSlice(
        spec, executor, list(executor.inputs), list(executor.outputs), executor.batchable
    )


def _body(rows: int, value: float = 0.5, shape: list[int] | None = None) -> bytes:
    shape = shape or [rows, 16]
    return orjson.dumps(
        {
            "id": f"r{rows}",
            "inputs": [
                {
                    "name": "features",
                    "shape": shape,
                    "datatype": "FP32",
                    "data": [value] * int(np.prod(shape)),
                }
            ],
        }
    )


def _run(loaded: LoadedSlice, bodies: list[bytes]) -> tuple[list[p.RequestResult], list[bytes]]:
    headers = [p.RequestHeader(i, -1) for i in range(len(bodies))]
    return run_requests(loaded, headers, [memoryview(b) for b in bodies])


def test_batched_results_equal_single_results(scorer: LoadedSlice) -> None:
    bodies = [_body(1, v) for v in (0.1, 0.2, 0.3)] + [_body(2, 0.4)]
    results, payloads = _run(scorer, bodies)
    assert [r.status for r in results] == [200] * 4
    assert [r.rows for r in results] == [1, 1, 1, 2]
    for body, payload in zip(bodies, payloads):
        alone = _run(scorer, [body])[1][0]
        assert orjson.loads(payload)["outputs"] == orjson.loads(alone)["outputs"]
        assert orjson.loads(payload)["id"] == orjson.loads(body)["id"]


def test_a_bad_request_fails_alone(scorer: LoadedSlice) -> None:
    bodies = [_body(1), _body(1, shape=[1, 3]), b"{not json", _body(1)]
    results, payloads = _run(scorer, bodies)
    assert [r.status for r in results] == [200, 400, 400, 200]
    assert "error" in orjson.loads(payloads[1]) and "error" in orjson.loads(payloads[2])


def test_a_request_the_worker_cannot_decode_fails_alone_and_the_worker_goes_on(
    scorer: LoadedSlice, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpuvisor.runtime import execution

    decode = execution.decode_infer_request

    def decode_or_run_out(body: bytes, *args: object) -> object:
        if b'"huge"' in body:
            raise MemoryError("Unable to allocate 8.00 TiB")
        return decode(body, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(execution, "decode_infer_request", decode_or_run_out)
    huge = orjson.dumps({"id": "huge", "inputs": []})
    results, payloads = _run(scorer, [_body(1), huge, _body(1)])
    assert [r.status for r in results] == [200, 500, 200]
    assert orjson.loads(payloads[1])["error"] == (
        "could not decode this request: the worker ran out of memory "
        "(MemoryError: Unable to allocate 8.00 TiB)"
    )


def test_requests_beyond_max_batch_are_split(scorer: LoadedSlice) -> None:
    results, payloads = _run(scorer, [_body(3), _body(3)])  # 6 rows > max 4: two runs
    assert [r.status for r in results] == [200, 200]
    assert [len(orjson.loads(x)["outputs"][0]["data"]) for x in payloads] == [3, 3]


def test_profile_measures_each_batch_size(scorer: LoadedSlice) -> None:
    profile = profile_batches(scorer, [1, 2, 4], repeats=2)
    assert sorted(profile) == [1, 2, 4]
    assert all(seconds > 0 for seconds in profile.values())


def test_a_batch_with_fewer_bodies_than_requests_fails_whole(
    scorer: LoadedSlice, caplog: pytest.LogCaptureFixture
) -> None:
    headers = [p.RequestHeader(7, -1), p.RequestHeader(8, -1)]
    with caplog.at_level(logging.WARNING, logger="gpuvisor.worker"):
        results, payloads = run_requests(scorer, headers, [memoryview(_body(1))])
    assert [(r.request_id, r.status, r.rows) for r in results] == [(7, 500, 0), (8, 500, 0)]
    for payload in payloads:
        error = orjson.loads(payload)
        assert error["code"] == "internal"
        assert "the batch carried 1 bodies for 2 requests" in error["error"]
    assert "the batch carried 1 bodies for 2 requests" in caplog.text


def _loaded_from(tmp_path: Path, model: onnx.ModelProto, max_batch: int = 8) -> LoadedSlice:
    path = tmp_path / f"{model.graph.name}.onnx"
    path.write_bytes(model.SerializeToString())
    executor = load_executor("onnx", path, ExecutorDevice(kind="cpu", threads=1))
    spec = p.LoadModel(
        "t/d/0", model.graph.name, "1", "onnx", str(path), None, "cpu", 0, 1, None, max_batch
    )
    return LoadedSlice(
        spec, executor, list(executor.inputs), list(executor.outputs), executor.batchable
    )


def _graph(
    name: str, nodes: list[onnx.NodeProto], inputs: list[str], out_shape: list[object]
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(i, TensorProto.FLOAT, ["N", 2]) for i in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _pair_body(a: list[list[float]], b: list[list[float]]) -> bytes:
    return orjson.dumps(
        {
            "inputs": [
                {"name": n, "shape": [len(v), 2], "datatype": "FP32", "data": v}
                for n, v in (("a", a), ("b", b))
            ]
        }
    )


def test_requests_whose_inputs_disagree_on_rows_are_not_merged(tmp_path: Path) -> None:
    """y = a + b broadcasts a one-row input over the other's rows: alone, each request is
    valid; merged with another, its rows would pair with the other request's."""
    loaded = _loaded_from(
        tmp_path, _graph("add2", [helper.make_node("Add", ["a", "b"], ["y"])], ["a", "b"], ["N", 2])
    )
    first = _pair_body([[1, 1], [2, 2]], [[100, 100]])  # b broadcast over a's two rows
    second = _pair_body([[7, 7]], [[1000, 1000], [5000, 5000]])  # a broadcast over b's
    alone = [orjson.loads(_run(loaded, [body])[1][0])["outputs"] for body in (first, second)]
    assert alone[0][0]["data"] == [101, 101, 102, 102]
    # merged, a and b would both have 3 rows: the model would run, and pair rows wrongly
    results, payloads = _run(loaded, [first, second])
    assert [r.status for r in results] == [200, 200]
    outputs = [orjson.loads(payload)["outputs"] for payload in payloads]
    assert outputs == alone
    # each request is charged the rows the model ran, whichever input has them
    assert [r.rows for r in results] == [2, 2]


def test_inputs_that_disagree_on_rows_and_do_not_broadcast_are_the_clients_error(
    tmp_path: Path,
) -> None:
    """a with 2 rows and b with 3 cannot be added: 400 naming each input's rows, with
    onnxruntime's reason but not where in its sources it failed; its batch-mate runs."""
    loaded = _loaded_from(
        tmp_path, _graph("add3", [helper.make_node("Add", ["a", "b"], ["y"])], ["a", "b"], ["N", 2])
    )
    bad = _pair_body([[1, 1], [2, 2]], [[1, 1], [2, 2], [3, 3]])
    good = _pair_body([[1, 1]], [[2, 2]])
    results, payloads = _run(loaded, [bad, good])
    assert [r.status for r in results] == [400, 200]
    error = orjson.loads(payloads[0])
    assert error["code"] == "invalid_request"
    assert error["error"].startswith(
        "the inputs disagree on their first dimension, the batch (a: 2, b: 3 rows), and the "
        "model could not run them: onnxruntime failed: "
    )
    assert "Attempting to broadcast an axis by a dimension other than 1" in error["error"]
    assert "onnxruntime_src" not in error["error"]
    assert orjson.loads(payloads[1])["outputs"][0]["data"] == [3, 3]


def test_an_output_not_batched_along_rows_is_computed_per_request(tmp_path: Path) -> None:
    """y = a reshaped to rows of 4 (a request's two rows become one): its first dimension
    is variable, so the model looks batchable, but merged, the rows of y would not be the
    requests' rows."""
    model = _graph("fold", [helper.make_node("Reshape", ["a", "to"], ["y"])], ["a"], ["M", 4])
    model.graph.initializer.append(helper.make_tensor("to", TensorProto.INT64, [2], [-1, 4]))
    loaded = _loaded_from(tmp_path, model)
    assert loaded.executor.batchable

    def body(rows: list[list[float]]) -> bytes:
        return orjson.dumps(
            {"inputs": [{"name": "a", "shape": [len(rows), 2], "datatype": "FP32", "data": rows}]}
        )

    results, payloads = _run(loaded, [body([[1, 2], [3, 4]]), body([[5, 6], [7, 8]])])
    assert [r.status for r in results] == [200, 200]
    assert [orjson.loads(x)["outputs"][0]["data"] for x in payloads] == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_a_model_whose_first_dimension_is_fixed_is_profiled_at_its_own_size(
    tmp_path: Path,
) -> None:
    """x [8, 4], fixed: fed [1, 4], every profiling run failed and the profile was empty,
    so the dispatcher predicted nothing for it until its first batch ran."""
    graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    loaded = _loaded_from(tmp_path, model)
    assert not loaded.batchable
    profile = profile_batches(loaded, [1, 2, 4], repeats=2)
    assert list(profile) == [1] and profile[1] > 0


def test_a_model_that_fails_every_run_at_load_is_said_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """x [N, 4] reshaped to 3 columns: no batch runs. It loads (real requests might differ),
    and the log says that every run failed."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 3])
    model = _graph("never", [helper.make_node("Reshape", ["x", "shape"], ["y"])], ["x"], ["N", 3])
    model.graph.initializer.append(shape)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 4
    loaded = _loaded_from(tmp_path, model)
    with caplog.at_level(logging.WARNING):
        assert profile_batches(loaded, [1, 2], repeats=1) == {}
    assert "every run of the model at load failed" in caplog.text
