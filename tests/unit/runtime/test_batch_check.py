"""The load-time check of whether a model's first dimension is a batch of independent rows,
with real onnxruntime models whose shapes all look batchable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import orjson
import pytest
from onnx import TensorProto, helper

from gpuvisor.errors import ModelError
from gpuvisor.runtime import protocol as p
from gpuvisor.runtime.batch_check import decide_batching
from gpuvisor.runtime.execution import LoadedSlice, run_requests
from gpuvisor.runtime.executors.base import Executor, ExecutorDevice, load_executor

FLOAT = TensorProto.FLOAT


def _model(
    name: str,
    nodes: list[onnx.NodeProto],
    x_shape: list[object],
    y_shape: list[object],
    initializers: list[onnx.TensorProto] | None = None,
    x_type: int = FLOAT,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", x_type, x_shape)],
        [helper.make_tensor_value_info("y", FLOAT, y_shape)],
        initializer=initializers or [],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _executor(tmp_path: Path, model: onnx.ModelProto) -> Executor:
    path = tmp_path / f"{model.graph.name}.onnx"
    path.write_bytes(model.SerializeToString())
    return load_executor("onnx", path, ExecutorDevice(kind="cpu", threads=1))


def _decide(executor: Executor, declared: bool | None = None) -> tuple[bool, str]:
    return decide_batching(executor, executor.inputs, executor.outputs, declared)


WEIGHTS = helper.make_tensor("w", FLOAT, [4, 2], np.arange(8, dtype=np.float32).tolist())
ROW_WISE = _model(
    "rowwise",
    [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
    ["N", 4],
    ["N", 2],
    [WEIGHTS],
)
SOFTMAX_OVER_TOKENS = _model(
    "seq", [helper.make_node("Softmax", ["x"], ["y"], axis=0)], ["T"], ["T"]
)
CENTERED = _model(
    "center",
    [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[0], keepdims=1),
        helper.make_node("Sub", ["x", "m"], ["y"]),
    ],
    ["N", 4],
    ["N", 4],
)
GRAM = _model(
    "gram",
    [
        helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "t"], ["y"]),
    ],
    ["N", 4],
    ["N", "M"],
)
EMBEDDING = _model(
    "embed",
    [helper.make_node("Gather", ["table", "x"], ["y"], axis=0)],
    ["N"],
    ["N", 3],
    [helper.make_tensor("table", FLOAT, [2, 3], [0.5, 1, 2, 3, 4, 5])],
    x_type=TensorProto.INT64,
)


@pytest.mark.parametrize("model", [ROW_WISE, EMBEDDING], ids=["matmul-relu", "int-embedding"])
def test_a_model_that_works_row_by_row_is_batched(tmp_path: Path, model: onnx.ModelProto) -> None:
    assert _decide(_executor(tmp_path, model)) == (True, "")


@pytest.mark.parametrize(
    ("model", "why"),
    [
        (SOFTMAX_OVER_TOKENS, "output 'y' of a row changes when another row runs beside it"),
        (CENTERED, "output 'y' of a row changes when another row runs beside it"),
        (GRAM, "output 'y' has shape [2, 2] for two rows, but [1, 1] for one"),
    ],
    ids=["softmax-over-tokens", "centered-over-rows", "gram"],
)
def test_a_model_whose_rows_are_not_independent_is_not_batched(
    tmp_path: Path, model: onnx.ModelProto, why: str
) -> None:
    executor = _executor(tmp_path, model)
    assert executor.batchable  # its shapes alone would have said yes
    batchable, note = _decide(executor)
    assert not batchable
    assert note.startswith(f"requests are not merged into batches: {why}")
    assert "Model spec.batchable" in note


def test_the_model_spec_decides_instead_of_the_check(tmp_path: Path) -> None:
    assert _decide(_executor(tmp_path, ROW_WISE), declared=False) == (False, "")
    assert _decide(_executor(tmp_path, SOFTMAX_OVER_TOKENS), declared=True) == (True, "")
    fixed = _model("fixed", [helper.make_node("Relu", ["x"], ["y"])], [2, 4], [2, 4])
    with pytest.raises(ModelError, match=r"first dimension is not variable on 'x', 'y'"):
        _decide(_executor(tmp_path, fixed), declared=True)


def test_requests_to_a_model_found_not_batchable_each_get_their_own_answer(
    tmp_path: Path,
) -> None:
    """Three requests in one batch to a softmax over tokens: each is computed alone, whatever
    its length (no row limit applies to a model whose first dimension is not a batch)."""
    executor = _executor(tmp_path, SOFTMAX_OVER_TOKENS)
    batchable, _ = _decide(executor)
    spec = p.LoadModel("t/seq/0", "seq", "1", "onnx", "seq.onnx", None, "cpu", 0, 1, None, 64)
    loaded = LoadedSlice(spec, executor, list(executor.inputs), list(executor.outputs), batchable)
    tokens = [[0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [float(t) for t in range(20)]]
    bodies = [
        orjson.dumps({"inputs": [{"name": "x", "shape": [len(t)], "datatype": "FP32", "data": t}]})
        for t in tokens
    ]
    headers = [p.RequestHeader(i, -1) for i in range(len(bodies))]
    results, payloads = run_requests(loaded, headers, [memoryview(b) for b in bodies])
    assert [r.status for r in results] == [200, 200, 200]
    for t, payload in zip(tokens, payloads, strict=True):
        expected = np.exp(np.array(t)) / np.exp(np.array(t)).sum()
        got = np.array(orjson.loads(payload)["outputs"][0]["data"])
        np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_kernel_noise_is_the_same_answer_and_another_rows_influence_is_not() -> None:
    """A GPU's TF32 products keep about 3 digits: that much difference between a row run
    alone and beside another is noise; what rows that change each other do is far more."""
    from gpuvisor.runtime.batch_check import _same

    alone = np.array([[0.5, -2.0, 3.0]], dtype=np.float32)
    assert _same(alone * (1 + 5e-4), alone, "FP32")
    assert not _same(alone * 1.1, alone, "FP32")
    assert not _same(alone[:, :2], alone, "FP32")  # another shape is another answer
    assert _same(np.array([[1, 2]]), np.array([[1, 2]]), "INT64")
    assert not _same(np.array([[1, 2]]), np.array([[1, 3]]), "INT64")


def test_a_model_the_check_cannot_run_is_not_merged(tmp_path: Path) -> None:
    """y = x reshaped to 8 columns: it runs on an even number of rows only, so the check's
    single-row requests fail. Unchecked, merging could pair one request's rows with
    another's: its requests run alone, and the note says why."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 8])
    pairs = _model(
        "pairs", [helper.make_node("Reshape", ["x", "shape"], ["y"])], ["N", 4], ["M", 8], [shape]
    )
    executor = _executor(tmp_path, pairs)
    assert executor.batchable
    batchable, note = _decide(executor)
    assert not batchable
    assert note.startswith(
        "requests are not merged into batches: the load-time check could not run it on two "
        "single-row requests ("
    ), note
