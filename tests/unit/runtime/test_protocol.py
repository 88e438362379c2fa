"""IPC messages survive encoding; garbage is refused."""

from __future__ import annotations

import msgspec
import pytest

from gpuvisor.runtime import protocol as p

MESSAGES: list[p.Message] = [
    p.LoadModel(
        "t/d/0",
        "d",
        "3",
        "onnx",
        "/m.onnx",
        None,
        "cpu",
        0,
        1,
        2**28,
        8,
        declared_inputs=[p.TensorInfo("x", "FP32", [-1, 4])],
        profile_batch_sizes=[1, 2, 4, 8],
    ),
    p.UnloadModel("t/d/0"),
    p.ExecuteBatch(7, "t/d/0", [p.RequestHeader(1, -1), p.RequestHeader(2, 120)]),
    p.Shutdown(),
    p.WorkerReady("w1", 1234),
    p.ModelLoaded(
        "t/d/0",
        "onnxruntime_onnx",
        [p.TensorInfo("x", "FP32", [-1, 4])],
        [p.TensorInfo("y", "FP32", [-1, 1])],
        True,
        "ab" * 32,
        0.1,
        10**8,
        {1: 0.001, 8: 0.004},
    ),
    p.LoadFailed("t/d/0", "integrity_error", "sha256 mismatch"),
    p.BatchDone(
        7, "t/d/0", [p.RequestResult(1, 200, -1, 1), p.RequestResult(2, 400, -1, 0)], 0.002, 1
    ),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message: p.Message) -> None:
    assert p.decode(p.encode(message)) == message


def test_garbage_is_refused() -> None:
    with pytest.raises(msgspec.DecodeError):
        p.decode(b"\x93not a message")


def test_headers_stay_compact() -> None:
    """A batch header of 8 requests must stay tiny: tensors never travel inside it."""
    header = p.encode(
        p.ExecuteBatch(1, "tenant/deployment/0", [p.RequestHeader(i, -1) for i in range(8)])
    )
    assert len(header) < 100
