"""Executors for TorchScript and torch.export programs, on the CPU or one CUDA device."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpuvisor.errors import ExecutionError, GpuvisorError, InvalidRequest, ModelError
from gpuvisor.runtime.executors.base import ExecutorDevice, is_batchable, reconcile_metadata
from gpuvisor.runtime.tensors import DATATYPES, TensorMeta

__all__ = ["METADATA_FILE", "TORCH_DATATYPES", "TorchExportExecutor", "TorchScriptExecutor"]

log = logging.getLogger("gpuvisor.runtime")

Array = np.ndarray[Any, Any]

METADATA_FILE = "gpuvisor.json"  # TorchScript extra file: {"inputs": [...], "outputs": [...]}

TORCH_DATATYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "UINT8",
    torch.int8: "INT8",
    torch.int16: "INT16",
    torch.int32: "INT32",
    torch.int64: "INT64",
    torch.float16: "FP16",
    torch.float32: "FP32",
    torch.float64: "FP64",
}
for _bits in (16, 32, 64):  # unsigned wide dtypes exist only in newer torch releases
    if (_dtype := getattr(torch, f"uint{_bits}", None)) is not None:
        TORCH_DATATYPES[_dtype] = f"UINT{_bits}"


class _TorchExecutor:
    """Shared device set-up, input conversion and output collection of both torch formats."""

    platform = "pytorch"
    inputs: list[TensorMeta]
    outputs: list[TensorMeta]
    batchable: bool

    def __init__(self, device: ExecutorDevice) -> None:
        self.torch_device = _select_device(device)
        self._model: Any = None
        if self.torch_device.type == "cuda" and device.memory_limit is not None:
            cap_memory(self, device.index, device.memory_limit)

    def _finish_metadata(self, path: Path) -> None:
        for tensor in [*self.inputs, *self.outputs]:
            if tensor.datatype not in DATATYPES or tensor.datatype == "BYTES":
                raise ModelError(
                    f"model {path}: tensor '{tensor.name}' has datatype {tensor.datatype}, which "
                    "torch models cannot take (BYTES needs an ONNX model)",
                    path=str(path),
                )
        self.batchable = is_batchable(self.inputs, self.outputs)
        self._output_names = [t.name for t in self.outputs]
        self._call_order = [t.name for t in self.inputs]  # the model's arguments, in order
        self._declared_outputs = {t.name: t for t in self.outputs}

    def run(
        self, inputs: dict[str, Array], output_names: Sequence[str] | None = None
    ) -> dict[str, Array]:
        """Run the model; returns the named outputs (all when ``output_names`` is None).

        Raises InvalidRequest for missing inputs or unknown outputs, ExecutionError when the
        model fails.
        """
        if self._model is None:
            raise ExecutionError("the model was closed")
        names = self._output_names if output_names is None else list(output_names)
        unknown = [n for n in names if n not in self._output_names]
        missing = [t.name for t in self.inputs if t.name not in inputs]
        if unknown or missing:
            raise InvalidRequest(
                f"unknown output {', '.join(unknown)} requested"
                if unknown
                else f"missing input {', '.join(missing)}"
            )
        try:
            with torch.inference_mode():
                args = [self._to_tensor(inputs[name]) for name in self._call_order]
                produced = self._collect(self._model(*args))
                for name in names:
                    self._check_output(name, produced[name])
                return {name: produced[name].detach().cpu().numpy() for name in names}
        except GpuvisorError:
            raise
        except AssertionError as exc:
            if str(exc).startswith("Guard failed"):  # a torch.export program's input guard
                raise InvalidRequest(f"the model refused this input's shape: {exc}") from None
            raise ExecutionError(f"torch failed: {exc}") from None
        except Exception as exc:
            raise ExecutionError(f"torch failed: {exc}") from None

    def _check_output(self, name: str, tensor: torch.Tensor) -> None:
        """Refuse an output the model's metadata does not describe: cast to the declared
        datatype, or read with another rank, it would be a wrong answer, not an error."""
        want = self._declared_outputs[name]
        got = TORCH_DATATYPES.get(tensor.dtype, str(tensor.dtype))
        if got != want.datatype or tensor.dim() != len(want.shape):
            raise ExecutionError(
                f"output '{name}' is {got} with {tensor.dim()} dimension(s), but the model's "
                f"metadata declares {want.datatype} {list(want.shape)}: correct its "
                "gpuvisor.json, or the Model's spec.outputs"
            )

    def _to_tensor(self, array: Array) -> torch.Tensor:
        if not array.flags.writeable:  # torch.from_numpy warns on read-only buffers
            array = array.copy()
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.torch_device)

    def _collect(self, result: Any) -> dict[str, torch.Tensor]:
        if isinstance(result, dict) and set(self._output_names) <= set(result):
            return {name: result[name] for name in self._output_names}
        leaves = _tensor_leaves(result)
        if len(leaves) != len(self._output_names):
            raise ExecutionError(
                f"the model returned {len(leaves)} tensors but declares "
                f"{len(self._output_names)} outputs ({', '.join(self._output_names)})"
            )
        return dict(zip(self._output_names, leaves, strict=True))

    def close(self) -> None:
        """Drop the model and give cached CUDA memory back."""
        self._model = None
        if self.torch_device.type == "cuda":
            release_memory_cap(self, self.torch_device.index or 0)
            torch.cuda.empty_cache()


class TorchScriptExecutor(_TorchExecutor):
    """A ``torch.jit`` module; I/O metadata from its ``gpuvisor.json`` extra file or the spec."""

    platform = "pytorch_libtorch"

    def __init__(
        self,
        path: Path,
        device: ExecutorDevice,
        declared_inputs: list[TensorMeta] | None = None,
        declared_outputs: list[TensorMeta] | None = None,
        data: bytes | None = None,
    ) -> None:
        """Load the module at ``path`` (``data``: its bytes, read already); raises ModelError
        when it cannot load or lacks metadata."""
        super().__init__(device)
        extra = {METADATA_FILE: ""}
        source: str | io.BytesIO = io.BytesIO(data) if data is not None else str(path)
        try:
            module = torch.jit.load(  # type: ignore[no-untyped-call]
                source, map_location=self.torch_device, _extra_files=extra
            )
        except Exception as exc:
            raise ModelError(f"torch.jit cannot load {path}: {exc}", path=str(path)) from None
        self._model = module.eval()
        if extra[METADATA_FILE]:
            found_inputs, found_outputs = _parse_metadata_file(extra[METADATA_FILE], path)
            self.inputs = reconcile_metadata("input", found_inputs, declared_inputs)
            self.outputs = reconcile_metadata("output", found_outputs, declared_outputs)
        elif declared_inputs is not None and declared_outputs is not None:
            self.inputs, self.outputs = list(declared_inputs), list(declared_outputs)
        else:
            raise ModelError(
                f"TorchScript model {path} does not say what its inputs and outputs are: save it "
                f"with torch.jit.save(module, path, _extra_files={{'{METADATA_FILE}': "
                'json.dumps({"inputs": [{"name", "datatype", "shape"}, ...], "outputs": [...]})}) '
                "or declare spec.inputs and spec.outputs in the Model",
                path=str(path),
            )
        self._finish_metadata(path)
        self._call_order = _forward_order(module, self._call_order, path)


def _forward_order(module: Any, declared: list[str], path: Path) -> list[str]:
    """The declared inputs in the order ``forward`` takes them, by its arguments' names: the
    metadata's order is not the call's (``forward(a, b)`` declared as b, a). Raises ModelError
    when several inputs are declared and their names are not forward's."""
    try:
        arguments = [a.name for a in module.forward.schema.arguments][1:]  # without self
    except (AttributeError, RuntimeError):
        return declared
    if sorted(arguments) == sorted(declared):
        return arguments
    if len(declared) > 1:
        raise ModelError(
            f"TorchScript model {path}: its inputs are declared as {', '.join(declared)}, but "
            f"its forward takes {', '.join(arguments) or 'no arguments'}: name the inputs "
            "after forward's arguments (in any order), so that each tensor goes to its own",
            path=str(path),
        )
    return declared


class TorchExportExecutor(_TorchExecutor):
    """A ``torch.export`` program; metadata from its graph, outputs named output__0, ..."""

    platform = "pytorch_export"

    def __init__(
        self,
        path: Path,
        device: ExecutorDevice,
        declared_inputs: list[TensorMeta] | None = None,
        declared_outputs: list[TensorMeta] | None = None,
        data: bytes | None = None,
    ) -> None:
        """Load the program at ``path`` (``data``: its bytes, read already); raises ModelError
        when it cannot be loaded or served."""
        super().__init__(device)
        try:
            program = torch.export.load(io.BytesIO(data) if data is not None else str(path))
            found_inputs, found_outputs = _program_metadata(program, path)
            self._model = program.module().to(self.torch_device)
        except GpuvisorError:
            raise
        except Exception as exc:
            raise ModelError(f"torch.export cannot load {path}: {exc}", path=str(path)) from None
        self.inputs = reconcile_metadata("input", found_inputs, declared_inputs)
        self.outputs = reconcile_metadata("output", found_outputs, declared_outputs)
        self._finish_metadata(path)


def _tensor_leaves(result: Any) -> list[torch.Tensor]:
    """The tensors of a model's result (a tensor, or tuples, lists and dicts of them), in order."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, dict):
        result = list(result.values())
    if isinstance(result, (list, tuple)):
        return [leaf for item in result for leaf in _tensor_leaves(item)]
    return []


def _select_device(device: ExecutorDevice) -> torch.device:
    if device.threads:
        torch.set_num_threads(device.threads)
    if device.kind != "cuda":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        log.warning("torch has no CUDA device; cuda:%d falls back to the CPU", device.index)
        return torch.device("cpu")
    return torch.device("cuda", device.index)


# The memory caps of the torch models this worker holds, per CUDA device: torch caps a
# whole process (set_per_process_memory_fraction), and a `shared` worker holds several of
# its tenant's models, so the process's cap is the sum of theirs.
_CAPS: dict[int, dict[int, int]] = {}


def cap_memory(owner: object, index: int, memory_limit: int) -> None:
    """Count ``owner``'s memory cap on CUDA device ``index`` and set the process's cap."""
    _CAPS.setdefault(index, {})[id(owner)] = memory_limit
    _apply_caps(index)


def release_memory_cap(owner: object, index: int) -> None:
    """``owner`` is gone: its cap no longer counts towards the process's."""
    if _CAPS.get(index, {}).pop(id(owner), None) is not None:
        _apply_caps(index)


def _apply_caps(index: int) -> None:
    caps = _CAPS.get(index, {})
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = min(1.0, sum(caps.values()) / total) if caps else 1.0
    torch.cuda.set_per_process_memory_fraction(fraction, index)


def _parse_metadata_file(text: str, path: Path) -> tuple[list[TensorMeta], list[TensorMeta]]:
    try:
        doc = json.loads(text)
        return (
            [_tensor_meta(item) for item in doc["inputs"]],
            [_tensor_meta(item) for item in doc["outputs"]],
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(
            f"model {path}: its {METADATA_FILE} is not "
            '{"inputs": [{"name", "datatype", "shape"}, ...], "outputs": [...]}: '
            f"{exc!r}",
            path=str(path),
        ) from None


def _tensor_meta(item: dict[str, Any]) -> TensorMeta:
    name, datatype, shape = item["name"], item["datatype"], item["shape"]
    if not isinstance(name, str) or datatype not in DATATYPES:
        raise ValueError(f"bad tensor entry {item!r}")
    return TensorMeta(name, datatype, tuple(int(d) for d in shape))


def _program_metadata(program: Any, path: Path) -> tuple[list[TensorMeta], list[TensorMeta]]:
    from torch.export.graph_signature import InputKind, OutputKind

    nodes = {node.name: node for node in program.graph.nodes}
    signature = program.graph_signature
    user_inputs = [s.arg.name for s in signature.input_specs if s.kind == InputKind.USER_INPUT]
    user_outputs = [s.arg.name for s in signature.output_specs if s.kind == OutputKind.USER_OUTPUT]
    inputs = [_fake_meta(name, nodes.get(name), path) for name in user_inputs]
    outputs = [
        _fake_meta(f"output__{index}", nodes.get(name), path)
        for index, name in enumerate(user_outputs)
    ]
    return inputs, outputs


def _fake_meta(name: str, node: Any, path: Path) -> TensorMeta:
    value = None if node is None else node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        raise ModelError(f"model {path}: '{name}' is not a tensor, which gpuvisor cannot serve")
    datatype = TORCH_DATATYPES.get(value.dtype)
    if datatype is None:
        raise ModelError(
            f"model {path}: tensor '{name}' has dtype {value.dtype}, which gpuvisor cannot serve",
            path=str(path),
        )
    shape = tuple(d if isinstance(d, int) else -1 for d in value.shape)
    return TensorMeta(name, datatype, shape)
