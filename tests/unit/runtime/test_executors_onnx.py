"""Tests for the onnxruntime executor, on tiny ONNX models built in the test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.http as triton
from onnx import TensorProto, helper, numpy_helper

from gpuvisor.errors import ExecutionError, InvalidRequest, ModelError
from gpuvisor.runtime.executors.base import Executor, ExecutorDevice, load_executor
from gpuvisor.runtime.executors.onnx import OnnxExecutor
from gpuvisor.runtime.tensors import TensorMeta, decode_infer_request, encode_infer_response

CPU = ExecutorDevice("cpu", threads=1)
WEIGHTS = np.arange(12, dtype=np.float32).reshape(4, 3) / 10


def save_model(path: Path, nodes: list[onnx.NodeProto], inputs: list, outputs: list, **kw) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=kw.get("initializer", []))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture
def matmul_model(tmp_path: Path) -> Path:
    """x FP32 [batch, 4] -> y = x @ W [batch, 3] and z = relu(y - 1)."""
    return save_model(
        tmp_path / "matmul.onnx",
        [
            helper.make_node("MatMul", ["x", "w"], ["y"]),
            helper.make_node("Sub", ["y", "one"], ["shifted"]),
            helper.make_node("Relu", ["shifted"], ["z"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 3]),
        ],
        initializer=[
            numpy_helper.from_array(WEIGHTS, "w"),
            numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
        ],
    )


@pytest.fixture
def int64_model(tmp_path: Path) -> Path:
    """ids INT64 [2, 2] (fixed) -> doubled INT64 [2, 2]."""
    return save_model(
        tmp_path / "int64.onnx",
        [helper.make_node("Mul", ["ids", "two"], ["doubled"])],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 2])],
        [helper.make_tensor_value_info("doubled", TensorProto.INT64, [2, 2])],
        initializer=[numpy_helper.from_array(np.array(2, dtype=np.int64), "two")],
    )


@pytest.fixture
def string_model(tmp_path: Path) -> Path:
    """text string [n] (unknown dim) -> same string [n]."""
    return save_model(
        tmp_path / "strings.onnx",
        [helper.make_node("Identity", ["text"], ["echo"])],
        [helper.make_tensor_value_info("text", TensorProto.STRING, [None])],
        [helper.make_tensor_value_info("echo", TensorProto.STRING, [None])],
    )


def test_matmul_metadata_and_results(matmul_model: Path) -> None:
    executor: Executor = load_executor("onnx", matmul_model, CPU)
    assert isinstance(executor, OnnxExecutor)
    assert executor.platform == "onnxruntime_onnx"
    assert executor.inputs == [TensorMeta("x", "FP32", (-1, 4))]
    assert executor.outputs == [TensorMeta("y", "FP32", (-1, 3)), TensorMeta("z", "FP32", (-1, 3))]
    assert executor.batchable
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    results = executor.run({"x": x})
    assert set(results) == {"y", "z"}
    np.testing.assert_allclose(results["y"], x @ WEIGHTS, rtol=1e-5)
    np.testing.assert_allclose(results["z"], np.maximum(x @ WEIGHTS - 1, 0), rtol=1e-5)
    only_z = executor.run({"x": x}, ["z"])
    assert list(only_z) == ["z"]
    executor.close()
    with pytest.raises(ExecutionError, match="closed"):
        executor.run({"x": x})


def test_int64_model_with_fixed_shape_is_not_batchable(int64_model: Path) -> None:
    executor = load_executor("onnx", int64_model, CPU)
    assert executor.inputs == [TensorMeta("ids", "INT64", (2, 2))]
    assert not executor.batchable
    ids = np.array([[1, -2], [2**40, 0]], dtype=np.int64)
    doubled = executor.run({"ids": ids})["doubled"]
    assert doubled.dtype == np.int64
    assert doubled.tolist() == (ids * 2).tolist()


def test_string_model_takes_and_returns_bytes(string_model: Path) -> None:
    executor = load_executor("onnx", string_model, CPU)
    assert executor.inputs == [TensorMeta("text", "BYTES", (-1,))]
    text = np.array(["héllo".encode(), b"", b"sku-42"], dtype=object)
    echo = executor.run({"text": text})["echo"]
    assert echo.dtype == object
    assert echo.tolist() == text.tolist()
    assert all(isinstance(item, bytes) for item in echo.tolist())
    with pytest.raises(InvalidRequest, match="input 'text' holds bytes that are not UTF-8"):
        executor.run({"text": np.array([b"\xff"], dtype=object)})


def test_tritonclient_request_through_the_executor_and_back(matmul_model: Path) -> None:
    executor = load_executor("onnx", matmul_model, CPU)
    x = np.ones((2, 4), dtype=np.float32)
    infer_input = triton.InferInput("x", [2, 4], "FP32").set_data_from_numpy(x)
    wanted = [triton.InferRequestedOutput("z", binary_data=True)]
    body, header_length = triton.InferenceServerClient.generate_request_body(
        [infer_input], outputs=wanted, request_id="7"
    )
    request = decode_infer_request(body, header_length, executor.inputs, executor.outputs)
    results = executor.run(request.inputs, [o.name for o in request.outputs or []])
    out, out_length = encode_infer_response("m", "1", request, results, executor.outputs)
    result = triton.InferResult.from_response_body(out, header_length=out_length)
    np.testing.assert_allclose(result.as_numpy("z"), np.maximum(x @ WEIGHTS - 1, 0), rtol=1e-5)
    assert result.as_numpy("y") is None


def test_run_errors(matmul_model: Path) -> None:
    executor = load_executor("onnx", matmul_model, CPU)
    with pytest.raises(InvalidRequest, match="missing input x"):
        executor.run({})
    with pytest.raises(InvalidRequest, match="unknown output w requested"):
        executor.run({"x": np.ones((1, 4), np.float32)}, ["w"])
    # what onnxruntime calls INVALID_ARGUMENT is the caller's input: 400, not 500
    with pytest.raises(InvalidRequest, match=r"the model refused this input: .*data type"):
        executor.run({"x": np.ones((1, 4), np.float64)})  # wrong element type
    with pytest.raises(InvalidRequest, match=r"the model refused this input: .*dimensions"):
        executor.run({"x": np.ones((1, 5), np.float32)})  # wrong feature count


def test_an_index_out_of_the_models_table_is_the_callers_error(tmp_path: Path) -> None:
    path = save_model(
        tmp_path / "lookup.onnx",
        [helper.make_node("Gather", ["table", "ids"], ["y"])],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
        initializer=[numpy_helper.from_array(np.ones((10, 2), np.float32), "table")],
    )
    executor = load_executor("onnx", path, CPU)
    assert executor.run({"ids": np.array([9], np.int64)})["y"].shape == (1, 2)
    with pytest.raises(InvalidRequest, match="indices element out of data bounds") as caught:
        executor.run({"ids": np.array([1000], np.int64)})
    assert caught.value.http_status == 400


def test_a_model_that_fails_while_running_is_an_execution_error(tmp_path: Path) -> None:
    # a fixed Reshape that only some batch sizes fit: the model's fault, not the caller's
    path = save_model(
        tmp_path / "reshape.onnx",
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        initializer=[numpy_helper.from_array(np.array([2, 2], np.int64), "shape")],
    )
    executor = load_executor("onnx", path, CPU)
    assert executor.run({"x": np.ones((1, 4), np.float32)})["y"].shape == (2, 2)
    with pytest.raises(ExecutionError, match=r"onnxruntime failed: .*cannot be reshaped") as caught:
        executor.run({"x": np.ones((3, 4), np.float32)})
    assert caught.value.http_status == 500


def test_threads_and_sequential_execution_are_set(matmul_model: Path) -> None:
    executor = OnnxExecutor(matmul_model, ExecutorDevice("cpu", threads=3))
    options = executor._session.get_session_options()  # type: ignore[union-attr]
    assert options.intra_op_num_threads == 3
    assert options.inter_op_num_threads == 1
    assert options.execution_mode.name == "ORT_SEQUENTIAL"
    assert executor.providers == ["CPUExecutionProvider"]


def test_cuda_request_without_cuda_provider_falls_back_to_cpu(
    matmul_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    executor = OnnxExecutor(matmul_model, ExecutorDevice("cuda", index=0, memory_limit=1 << 30))
    assert executor.providers == ["CPUExecutionProvider"]
    assert "falls back to the CPU" in caplog.text


@pytest.mark.gpu
def test_cuda_provider_with_memory_cap(matmul_model: Path) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider (onnxruntime-gpu is not installed)")
    executor = OnnxExecutor(matmul_model, ExecutorDevice("cuda", index=0, memory_limit=256 << 20))
    assert executor.providers[0] == "CUDAExecutionProvider"
    x = np.ones((8, 4), dtype=np.float32)
    np.testing.assert_allclose(executor.run({"x": x})["y"], x @ WEIGHTS, rtol=1e-5)


def test_declared_metadata_narrows_variable_dims(matmul_model: Path) -> None:
    declared_in = [TensorMeta("x", "FP32", (-1, 4))]
    declared_out = [TensorMeta("y", "FP32", (-1, 3)), TensorMeta("z", "FP32", (-1, 3))]
    executor = load_executor("onnx", matmul_model, CPU, declared_in, declared_out)
    assert executor.inputs == declared_in
    narrowed = load_executor("onnx", matmul_model, CPU, [TensorMeta("x", "FP32", (8, 4))], None)
    assert narrowed.inputs == [TensorMeta("x", "FP32", (8, 4))]
    assert not narrowed.batchable


@pytest.mark.parametrize(
    ("declared", "message"),
    [
        ([TensorMeta("x", "FP64", (-1, 4))], "input 'x' is FP32 in the model but declared FP64"),
        (
            [TensorMeta("x", "FP32", (-1, 5))],
            "input 'x' has shape [-1, 4] in the model but is declared [-1, 5]",
        ),
        (
            [TensorMeta("x", "FP32", (-1,))],
            "input 'x' has shape [-1, 4] in the model but is declared [-1]",
        ),
        ([TensorMeta("image", "FP32", (-1, 4))], "declared input 'image' is not in the model"),
    ],
)
def test_declared_metadata_that_disagrees_is_a_model_error(
    matmul_model: Path, declared: list[TensorMeta], message: str
) -> None:
    with pytest.raises(ModelError) as caught:
        load_executor("onnx", matmul_model, CPU, declared)
    assert message in caught.value.message


def test_load_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf")
    with pytest.raises(ModelError, match=r"onnxruntime cannot load .*garbage\.onnx: .+"):
        load_executor("onnx", garbage, CPU)
    missing = tmp_path / "absent.onnx"
    with pytest.raises(ModelError, match=f"model file not found: {missing}"):
        load_executor("onnx", missing, CPU)


def test_unsupported_tensor_type_is_a_model_error(tmp_path: Path) -> None:
    path = save_model(
        tmp_path / "bf16.onnx",
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["n"])],
    )
    with pytest.raises(
        ModelError, match=r"tensor 'x' has type tensor\(bfloat16\), which gpuvisor cannot serve"
    ):
        load_executor("onnx", path, CPU)


def _relu(tmp_path: Path, shape: list[int] | None) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path / f"relu-{'none' if shape is None else len(shape)}.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def test_a_tensor_of_unknown_rank_is_not_taken_for_a_scalar(tmp_path: Path) -> None:
    """onnxruntime says [] for both; a scalar stays one, an input of unknown rank needs a
    declared shape (else only scalars would pass), which the metadata then gives."""
    scalar = load_executor("onnx", _relu(tmp_path, []), CPU)
    assert [t.shape for t in scalar.inputs] == [()]
    unranked = _relu(tmp_path, None)
    with pytest.raises(ModelError, match="input 'x' has no rank in the model: declare its shape"):
        load_executor("onnx", unranked, CPU)
    declared = [TensorMeta("x", "FP32", (-1, 3))]
    outputs = [TensorMeta("y", "FP32", (-1, 3))]
    executor = load_executor("onnx", unranked, CPU, declared, outputs)
    assert [t.shape for t in executor.inputs] == [(-1, 3)]
    assert [t.shape for t in executor.outputs] == [(-1, 3)]
    out = executor.run({"x": np.array([[-1.0, 2.0, -3.0]], dtype=np.float32)})
    assert out["y"].tolist() == [[0.0, 2.0, 0.0]]


def test_a_load_failure_says_what_is_wrong_without_onnxruntimes_cpp_signatures(
    tmp_path: Path,
) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "future",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 99)], ir_version=8)
    path = tmp_path / "future.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelError) as caught:
        load_executor("onnx", path, CPU)
    assert "Opset 99" in caught.value.message
    assert "onnxruntime::" not in caught.value.message and "std::" not in caught.value.message
