"""The Executor interface every model format implements, plus loading and integrity checks."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from gpuvisor.errors import IntegrityError, ModelError
from gpuvisor.runtime.tensors import TensorMeta

__all__ = [
    "FORMATS",
    "Executor",
    "ExecutorDevice",
    "file_sha256",
    "is_batchable",
    "load_executor",
    "read_model",
    "reconcile_metadata",
    "verify_sha256",
]

FORMATS = ("onnx", "torchscript", "torch-export")
_HASH_CHUNK = 1 << 20


@dataclass
class ExecutorDevice:
    """Where a model runs: the CPU or one CUDA device, with its thread and memory budget."""

    kind: Literal["cpu", "cuda"] = "cpu"
    index: int = 0
    threads: int | None = None
    memory_limit: int | None = None  # bytes; None = no cap


class Executor(Protocol):
    """A loaded model that runs a batch of numpy inputs to numpy outputs."""

    inputs: list[TensorMeta]
    outputs: list[TensorMeta]
    platform: str
    batchable: bool  # every input and output has a variable first dim

    def run(
        self, inputs: dict[str, np.ndarray[Any, Any]], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray[Any, Any]]:
        """Run the model; returns the named outputs (all when ``output_names`` is None).

        Raises ExecutionError when the model fails, InvalidRequest for unusable inputs.
        """
        ...

    def close(self) -> None:
        """Release the model and the memory it holds."""
        ...


def is_batchable(inputs: Sequence[TensorMeta], outputs: Sequence[TensorMeta]) -> bool:
    """True when every input and output has a variable first dimension (-1)."""
    tensors = [*inputs, *outputs]
    return bool(tensors) and all(t.shape and t.shape[0] == -1 for t in tensors)


def reconcile_metadata(
    what: Literal["input", "output"],
    found: Sequence[TensorMeta],
    declared: Sequence[TensorMeta] | None,
) -> list[TensorMeta]:
    """Merge what the model file says with what the Model spec declares.

    Declared tensors must match the found ones by name and datatype, with compatible shapes;
    a declared fixed dim narrows a variable one. Returns ``found`` (narrowed) when the two
    agree. Raises ModelError listing every disagreement.
    """
    if declared is None:
        return list(found)
    by_name = {t.name: t for t in declared}
    problems: list[str] = []
    merged: list[TensorMeta] = []
    for tensor in found:
        spec = by_name.pop(tensor.name, None)
        if spec is None:
            problems.append(
                f"the model has {what} '{tensor.name}', which the spec does not declare"
            )
            merged.append(tensor)
            continue
        if spec.datatype != tensor.datatype:
            problems.append(
                f"{what} '{tensor.name}' is {tensor.datatype} in the model but declared {spec.datatype}"
            )
        shape = _narrow_shape(tensor.shape, spec.shape)
        if shape is None:
            problems.append(
                f"{what} '{tensor.name}' has shape {list(tensor.shape)} in the model but is "
                f"declared {list(spec.shape)}"
            )
            shape = tensor.shape
        merged.append(TensorMeta(tensor.name, tensor.datatype, shape))
    problems.extend(f"declared {what} '{name}' is not in the model" for name in by_name)
    if problems:
        raise ModelError("model metadata does not match the spec: " + "; ".join(problems))
    return merged


def _narrow_shape(found: tuple[int, ...], declared: tuple[int, ...]) -> tuple[int, ...] | None:
    if len(found) != len(declared):
        return None
    shape: list[int] = []
    for have, want in zip(found, declared, strict=True):
        if -1 not in (have, want) and have != want:
            return None
        shape.append(want if have == -1 else have)
    return tuple(shape)


def file_sha256(path: Path) -> str:
    """Return the file's SHA-256 hex digest. Raises ModelError when it cannot be read, or is
    not a regular file: a FIFO would block the reader for ever and a device such as
    /dev/zero never ends (the file is opened without blocking and checked before a byte is
    read, so it cannot be swapped for one in between)."""
    digest = hashlib.sha256()
    with os.fdopen(_open_model(path), "rb") as stream:
        try:
            while chunk := stream.read(_HASH_CHUNK):
                digest.update(chunk)
        except OSError as exc:
            raise ModelError(
                f"cannot read model file {path}: {exc.strerror}", path=str(path)
            ) from None
    return digest.hexdigest()


def _open_model(path: Path) -> int:
    """Open a model file for reading and return its descriptor; ModelError when it cannot be
    read or is not a regular file (checked on the open file, so it cannot be swapped)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ModelError(f"model file not found: {path}", path=str(path)) from None
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror}", path=str(path)) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ModelError(
            f"model file {path} is not a regular file (a FIFO, a device or a folder): "
            "point the Model's source at the model file itself",
            path=str(path),
        )
    return fd


def read_model(
    path: Path, expected: str | None, roots: Sequence[str] | None = None
) -> tuple[bytes, str]:
    """Read a model file once and return its bytes and their sha256, for the checks and the
    load to see the same bytes: a file (or a link) swapped between a check by path and a
    load by path would load unchecked. ``expected``: the sha256 the bytes must have.
    ``roots``: folders the file opened must lie in (its own path, links followed)."""
    fd = _open_model(path)
    with os.fdopen(fd, "rb") as stream:
        if roots is not None:
            from gpuvisor.security.model_roots import inside

            try:
                opened = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:  # no /proc: the path as it resolves now
                opened = os.path.realpath(path)
            if not inside(opened, roots):
                raise IntegrityError(
                    f"model file {path} now leads outside the tenant's model folders "
                    f"({', '.join(roots)}; Tenant spec.modelRoots), to {opened}: point it "
                    "back inside",
                    path=str(path),
                    reason="outside_model_roots",
                )
        try:
            data = stream.read()
        except OSError as exc:
            raise ModelError(
                f"cannot read model file {path}: {exc.strerror}", path=str(path)
            ) from None
    actual = hashlib.sha256(data).hexdigest()
    _check_digest(path, actual, expected)
    return data, actual


def _check_digest(path: Path, actual: str, expected: str | None) -> None:
    if expected is not None and actual != expected.lower():
        # the file's own digest is not said: a tenant could otherwise learn the digest of
        # any file the node can read (sha256sum gives it to whoever may read the file)
        raise IntegrityError(
            f"model file {path} does not match the spec's sha256 {expected.lower()}",
            path=str(path),
            expected=expected.lower(),
        )


def verify_sha256(path: Path, expected: str | None) -> str:
    """Return the sha256 hex digest of the file at ``path``.

    Raises ModelError when the file is missing, IntegrityError naming both digests when
    ``expected`` is given and differs.
    """
    actual = file_sha256(Path(path))
    _check_digest(path, actual, expected)
    return actual


def load_executor(
    format: str,
    path: Path,
    device: ExecutorDevice,
    declared_inputs: list[TensorMeta] | None = None,
    declared_outputs: list[TensorMeta] | None = None,
    data: bytes | None = None,
) -> Executor:
    """Load the model at ``path`` in ``format`` onto ``device`` (``data``: the file's bytes,
    read and checked already by ``read_model``, loaded as they are).

    Returns a ready Executor. Raises ModelError when the file is missing, the format is
    unknown, torch is missing for a torch format, or the model cannot be loaded.
    """
    path = Path(path)
    if format not in FORMATS:
        raise ModelError(f"unknown model format '{format}' (expected one of {', '.join(FORMATS)})")
    if data is None and not path.is_file():
        raise ModelError(f"model file not found: {path}", path=str(path))
    if format == "onnx":
        from gpuvisor.runtime.executors.onnx import OnnxExecutor

        return OnnxExecutor(path, device, declared_inputs, declared_outputs, data)
    if importlib.util.find_spec("torch") is None:
        raise ModelError(f"format {format} needs the torch extra: pip install 'gpuvisor[torch]'")
    from gpuvisor.runtime.executors.torch import TorchExportExecutor, TorchScriptExecutor

    if format == "torchscript":
        return TorchScriptExecutor(path, device, declared_inputs, declared_outputs, data)
    return TorchExportExecutor(path, device, declared_inputs, declared_outputs, data)
