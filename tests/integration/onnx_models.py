"""Small ONNX models for the tests, built with onnx.helper: each maps x [N, 4] to y [N, 4]."""

from __future__ import annotations

from collections.abc import Sequence

import onnx
from onnx import TensorProto, helper

__all__ = ["adder_model", "looper_model", "rows_model", "slow_model"]


def rows_model(
    name: str, nodes: Sequence[onnx.NodeProto], initializers: Sequence[onnx.TensorProto] = ()
) -> bytes:
    """A checked model (opset 17) of ``nodes`` from input ``x`` to output ``y``, both FP32
    [N, 4], serialized."""
    graph = helper.make_graph(
        list(nodes),
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=list(initializers),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def adder_model(constant: float) -> bytes:
    """y = x + constant: versions built with different constants answer differently."""
    c = helper.make_tensor("c", TensorProto.FLOAT, [1], [constant])
    return rows_model("adder", [helper.make_node("Add", ["x", "c"], ["y"])], [c])


def _add_one_step() -> onnx.GraphProto:
    """A Loop body that adds 1 to its [N, 4] value."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["v_in", "one"], ["v_out"]),
        ],
        "step",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, ["N", 4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, ["N", 4]),
        ],
        initializer=[helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )
    return body


def looper_model() -> bytes:
    """y = x + max(x): adds 1 to x max(x) times, one Loop iteration at a time."""
    body = _add_one_step()
    return rows_model(
        "looper",
        [
            helper.make_node("ReduceMax", ["x"], ["most"], keepdims=0),
            helper.make_node("Cast", ["most"], ["trips"], to=TensorProto.INT64),
            helper.make_node("Loop", ["trips", "go", "x"], ["y"], body=body),
        ],
        [helper.make_tensor("go", TensorProto.BOOL, [], [True])],
    )


def slow_model(trips: int) -> bytes:
    """y = x + trips, one Loop iteration at a time, whatever x holds: every run (the runs
    a load makes to profile the model too) takes ``trips`` iterations."""
    body = _add_one_step()
    return rows_model(
        "slow",
        [helper.make_node("Loop", ["trips", "go", "x"], ["y"], body=body)],
        [
            helper.make_tensor("go", TensorProto.BOOL, [], [True]),
            helper.make_tensor("trips", TensorProto.INT64, [], [trips]),
        ],
    )
