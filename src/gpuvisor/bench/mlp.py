"""MLP models for the multi-tenant benchmarks, built as ONNX in code, and what one run costs."""

from __future__ import annotations

import math
import statistics
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gpuvisor.runtime.executors.base import ExecutorDevice
from gpuvisor.runtime.executors.onnx import OnnxExecutor

__all__ = ["BenchModel", "measure_cost"]

Array = np.ndarray[Any, Any]
_SEED = 20240601


@dataclass(frozen=True)
class BenchModel:
    """An ONNX MLP (Gemm+Relu layers, FP32 ``features`` [batch, widths[0]] → ``out``)."""

    name: str
    widths: tuple[int, ...]

    def build(self, dest: Path) -> Path:
        """Write the model to ``dest/<name>.onnx`` (deterministic weights); return its path."""
        rng = np.random.default_rng([_SEED, zlib.crc32(self.name.encode())])
        nodes: list[onnx.NodeProto] = []
        weights: list[TensorProto] = []
        current, layers = "features", len(self.widths) - 1
        for i in range(layers):
            fan_in, fan_out = self.widths[i], self.widths[i + 1]
            w = rng.normal(0.0, 1.0 / math.sqrt(fan_in), (fan_out, fan_in)).astype(np.float32)
            weights += [
                numpy_helper.from_array(w, f"fc{i}.weight"),
                numpy_helper.from_array(np.zeros(fan_out, np.float32), f"fc{i}.bias"),
            ]
            nodes.append(
                helper.make_node(
                    "Gemm", [current, f"fc{i}.weight", f"fc{i}.bias"], [f"fc{i}"], transB=1
                )
            )
            current = f"fc{i}"
            if i < layers - 1:
                nodes.append(helper.make_node("Relu", [current], [f"{current}.relu"]))
                current = f"{current}.relu"
        nodes.append(helper.make_node("Identity", [current], ["out"]))
        graph = helper.make_graph(
            nodes,
            self.name,
            [
                helper.make_tensor_value_info(
                    "features", TensorProto.FLOAT, ["batch", self.widths[0]]
                )
            ],
            [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", self.widths[-1]])],
            weights,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        dest.mkdir(parents=True, exist_ok=True)
        path = (dest / f"{self.name}.onnx").resolve()
        path.write_bytes(model.SerializeToString())
        return path

    def inputs(self, rows: int) -> dict[str, Array]:
        """Return deterministic inputs with ``rows`` rows."""
        rng = np.random.default_rng([_SEED, rows, self.widths[0]])
        return {"features": rng.normal(size=(rows, self.widths[0])).astype(np.float32)}


def measure_cost(
    path: Path, inputs: Mapping[str, Array], seconds: float = 0.3, threads: int = 1
) -> float:
    """Return the median seconds one run of ``inputs`` takes in gpuvisor's ONNX executor
    (``threads`` intra-op threads, as a worker on the CPU device), after a short warm-up."""
    executor = OnnxExecutor(path, ExecutorDevice(kind="cpu", threads=threads))
    try:
        feed = dict(inputs)
        for _ in range(5):
            executor.run(feed)
        times: list[float] = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(times) < 5:
            began = time.perf_counter()
            executor.run(feed)
            times.append(time.perf_counter() - began)
        return statistics.median(times)
    finally:
        executor.close()
