"""Executor for ONNX models on onnxruntime, on the CPU or a CUDA device with a memory cap."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from gpuvisor.errors import ExecutionError, GpuvisorError, InvalidRequest, ModelError
from gpuvisor.runtime.executors.base import ExecutorDevice, is_batchable, reconcile_metadata
from gpuvisor.runtime.tensors import TensorMeta

__all__ = ["ONNX_DATATYPES", "OnnxExecutor", "external_data_files"]

log = logging.getLogger("gpuvisor.runtime")

Array = np.ndarray[Any, Any]

ONNX_DATATYPES: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


def external_data_files(path: Path, data: bytes | None = None) -> list[str]:
    """The files an ONNX model keeps tensors in beside its own (``save_as_external_data``),
    by their location as the model names them; [] for a model in one file. ``data``: the
    file's bytes, read already. Raises ModelError when the file is no ONNX model."""
    try:
        if data is not None:
            model = onnx.load_model_from_string(data)
        else:
            model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelError(f"cannot read {path} as an ONNX model: {exc}", path=str(path)) from None
    locations: list[str] = []
    for tensor in _all_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            where = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if where not in locations:
                locations.append(where)
    return locations


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a graph holds: initializers, constants in attributes, subgraphs' too."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _all_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_tensors(subgraph)


class OnnxExecutor:
    """An onnxruntime InferenceSession behind the Executor interface."""

    platform = "onnxruntime_onnx"

    def __init__(
        self,
        path: Path,
        device: ExecutorDevice,
        declared_inputs: list[TensorMeta] | None = None,
        declared_outputs: list[TensorMeta] | None = None,
        data: bytes | None = None,
    ) -> None:
        """Load the model at ``path`` (``data``: its bytes, read already, which are loaded
        rather than the file opened again); raises ModelError with onnxruntime's message on
        failure."""
        self.device = device
        options = ort.SessionOptions()
        options.intra_op_num_threads = device.threads or 0  # 0 = onnxruntime's default
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            self._session: ort.InferenceSession | None = ort.InferenceSession(
                data if data is not None else str(path),
                sess_options=options,
                providers=_providers(device),
            )
        except Exception as exc:
            raise ModelError(
                f"onnxruntime cannot load {path}: {_short(exc)}", path=str(path)
            ) from None
        self.providers: list[str] = list(self._session.get_providers())
        if device.kind == "cuda" and _CUDA not in self.providers:
            log.warning("model %s runs on the CPU: onnxruntime could not start CUDA", path)
        found_inputs = [_meta(arg, path) for arg in self._session.get_inputs()]
        found_outputs = [_meta(arg, path) for arg in self._session.get_outputs()]
        if any(not t.shape for t in [*found_inputs, *found_outputs]):
            # onnxruntime says [] for a scalar and for a tensor of unknown rank alike
            unranked = _unranked(path)
            found_inputs = _with_declared_rank(
                "input", found_inputs, declared_inputs, unranked, path
            )
            found_outputs = _with_declared_rank(
                "output", found_outputs, declared_outputs, unranked, path
            )
        self.inputs = reconcile_metadata("input", found_inputs, declared_inputs)
        self.outputs = reconcile_metadata("output", found_outputs, declared_outputs)
        self.batchable = is_batchable(self.inputs, self.outputs)
        self._input_types = {t.name: t.datatype for t in self.inputs}
        self._output_types = {t.name: t.datatype for t in self.outputs}

    def run(
        self, inputs: dict[str, Array], output_names: Sequence[str] | None = None
    ) -> dict[str, Array]:
        """Run the model; returns the named outputs (all when ``output_names`` is None).

        Raises InvalidRequest for missing inputs, unknown outputs or non-UTF-8 strings, and
        for input values the model refuses (onnxruntime's INVALID_ARGUMENT: an index out of
        a lookup table's range, say); ExecutionError when onnxruntime fails otherwise.
        """
        if self._session is None:
            raise ExecutionError("the model was closed")
        names = list(self._output_types) if output_names is None else list(output_names)
        unknown = [n for n in names if n not in self._output_types]
        if unknown:
            raise InvalidRequest(f"unknown output {', '.join(unknown)} requested")
        missing = [n for n in self._input_types if n not in inputs]
        if missing:
            raise InvalidRequest(f"missing input {', '.join(missing)}")
        feed = {
            name: _to_strings(array, name) if self._input_types[name] == "BYTES" else array
            for name, array in inputs.items()
            if name in self._input_types
        }
        try:
            values = self._session.run(names, feed)
        except InvalidArgument as exc:
            raise InvalidRequest(f"the model refused this input: {_short(exc)}") from None
        except Exception as exc:
            if isinstance(exc, GpuvisorError):
                raise
            raise ExecutionError(f"onnxruntime failed: {_short(exc)}") from None
        return {
            name: _to_bytes(value) if self._output_types[name] == "BYTES" else value
            for name, value in zip(names, values, strict=True)
        }

    def close(self) -> None:
        """Drop the session; onnxruntime frees its memory arena with it."""
        self._session = None


def _providers(device: ExecutorDevice) -> list[Any]:
    if device.kind != "cuda":
        return [_CPU]
    if _CUDA not in ort.get_available_providers():
        log.warning(
            "onnxruntime has no CUDA provider (install onnxruntime-gpu); cuda:%d falls back to "
            "the CPU",
            device.index,
        )
        return [_CPU]
    cuda: dict[str, Any] = {"device_id": device.index, "arena_extend_strategy": "kSameAsRequested"}
    if device.memory_limit is not None:
        cuda["gpu_mem_limit"] = device.memory_limit
    return [(_CUDA, cuda), _CPU]


def _unranked(path: Path) -> set[str]:
    """The graph inputs and outputs whose rank the model leaves open (no shape at all)."""
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # onnxruntime read it: what onnx cannot is left as onnxruntime says
        return set()
    return {
        vi.name
        for vi in [*graph.input, *graph.output]
        if vi.type.HasField("tensor_type") and not vi.type.tensor_type.HasField("shape")
    }


def _with_declared_rank(
    what: str,
    found: list[TensorMeta],
    declared: list[TensorMeta] | None,
    unranked: set[str],
    path: Path,
) -> list[TensorMeta]:
    """``found``, with the declared shape of each tensor the model gives no rank; an input
    with neither could take scalars only (a wrong shape for every other request): refused."""
    by_name = {t.name: t for t in declared or []}
    out = []
    for tensor in found:
        if tensor.name in unranked:
            spec = by_name.get(tensor.name)
            if spec is not None:
                tensor = TensorMeta(tensor.name, tensor.datatype, spec.shape)
            elif what == "input":
                raise ModelError(
                    f"model {path}: input '{tensor.name}' has no rank in the model: declare its "
                    "shape in the Model's spec.inputs (for example [-1, 4]; -1 for a size that "
                    "varies)",
                    path=str(path),
                )
        out.append(tensor)
    return out


def _meta(arg: Any, path: Path) -> TensorMeta:
    datatype = ONNX_DATATYPES.get(arg.type)
    if datatype is None:
        raise ModelError(
            f"model {path}: tensor '{arg.name}' has type {arg.type}, which gpuvisor cannot serve "
            f"(supported: {', '.join(ONNX_DATATYPES)})",
            path=str(path),
        )
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
    return TensorMeta(arg.name, datatype, shape)


# where in onnxruntime's sources a check failed, and the check: nothing a client can act on
_SOURCE = re.compile(r"/onnxruntime_src/\S+:\d+ (?:[^\n]*? was false\. )?")


# the C++ function a load failed in, with its whole signature
_FUNCTION = re.compile(r"(?:[\w<>*&]+(?:::[\w<>*&]+)* )?onnxruntime::[\w:]+\([^)]*\) ?")


def _short(exc: Exception) -> str:
    """onnxruntime's message without its source locations and C++ signatures."""
    return _FUNCTION.sub("", _SOURCE.sub("", str(exc)))


def _to_strings(array: Array, name: str) -> Array:
    """onnxruntime string tensors want str objects; OIP BYTES arrive as bytes."""
    try:
        items = [i.decode() if isinstance(i, bytes) else str(i) for i in array.reshape(-1).tolist()]
    except UnicodeDecodeError:
        raise InvalidRequest(
            f"input '{name}' holds bytes that are not UTF-8; this model takes text strings"
        ) from None
    strings = np.empty(len(items), dtype=object)
    strings[:] = items
    return strings.reshape(array.shape)


def _to_bytes(array: Array) -> Array:
    items = [
        i.encode() if isinstance(i, str) else i for i in np.asarray(array).reshape(-1).tolist()
    ]
    encoded = np.empty(len(items), dtype=object)
    encoded[:] = items
    return encoded.reshape(np.shape(array))
