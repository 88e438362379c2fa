"""Tests for executor loading, metadata helpers and model file integrity checks."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import pytest

from gpuvisor.errors import IntegrityError, ModelError
from gpuvisor.runtime.executors.base import (
    ExecutorDevice,
    is_batchable,
    load_executor,
    reconcile_metadata,
    verify_sha256,
)
from gpuvisor.runtime.tensors import TensorMeta


def test_verify_sha256_returns_the_digest_and_checks_it(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    content = b"model bytes " * 200_000  # several hash chunks
    path.write_bytes(content)
    digest = hashlib.sha256(content).hexdigest()
    assert verify_sha256(path, None) == digest
    assert verify_sha256(path, digest) == digest
    assert verify_sha256(path, digest.upper()) == digest
    wrong = "0" * 64
    with pytest.raises(IntegrityError) as caught:
        verify_sha256(path, wrong)
    assert wrong in caught.value.message
    # not the file's own digest: a tenant could learn that of any file the node reads
    assert digest not in caught.value.message and "actual" not in caught.value.fields


def test_verify_sha256_of_a_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=f"model file not found: {tmp_path / 'nope.onnx'}"):
        verify_sha256(tmp_path / "nope.onnx", None)


@pytest.mark.parametrize(
    ("shapes", "batchable"),
    [
        ([(-1, 3), (-1,)], True),
        ([(-1, 3), (2,)], False),
        ([(), (-1,)], False),
        ([(3, -1)], False),
        ([], False),
    ],
)
def test_is_batchable(shapes: list[tuple[int, ...]], batchable: bool) -> None:
    metas = [TensorMeta(f"t{i}", "FP32", shape) for i, shape in enumerate(shapes)]
    assert is_batchable(metas[:1], metas[1:]) is batchable


def test_reconcile_metadata_lists_every_problem() -> None:
    found = [TensorMeta("a", "FP32", (-1, 2)), TensorMeta("b", "INT64", (-1,))]
    declared = [TensorMeta("a", "FP16", (-1, 2)), TensorMeta("c", "INT64", (-1,))]
    with pytest.raises(ModelError) as caught:
        reconcile_metadata("output", found, declared)
    message = caught.value.message
    assert "output 'a' is FP32 in the model but declared FP16" in message
    assert "the model has output 'b', which the spec does not declare" in message
    assert "declared output 'c' is not in the model" in message
    assert reconcile_metadata("input", found, None) == found


def test_unknown_format_is_a_model_error(tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    path.write_bytes(b"x")
    with pytest.raises(ModelError, match="unknown model format 'tensorflow'"):
        load_executor("tensorflow", path, ExecutorDevice())


@pytest.mark.parametrize("model_format", ["torchscript", "torch-export"])
def test_torch_formats_without_torch_say_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_format: str
) -> None:
    path = tmp_path / "m.pt"
    path.write_bytes(b"x")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "torch" else real_find_spec(name, *args),
    )
    with pytest.raises(ModelError) as caught:
        load_executor(model_format, path, ExecutorDevice())
    assert caught.value.message == (
        f"format {model_format} needs the torch extra: pip install 'gpuvisor[torch]'"
    )


def test_a_source_that_is_no_regular_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    """A FIFO would block whoever opens it for reading for ever, /dev/zero never ends: both
    are refused at once, from a check on the opened file itself."""
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero"), tmp_path):
        with pytest.raises(ModelError, match="is not a regular file"):
            verify_sha256(path, None)
