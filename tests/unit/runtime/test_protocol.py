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
    p.BatchDone(8, "t/d/0", [], 0.0, 0, error="a message that does not decode"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message: p.Message) -> None:
    assert p.decode(p.encode(message)) == message


@pytest.mark.parametrize(
    "frame",
    [b"\x93not a message", b"\x81\xa1x" + b"\x91" * 10**5 + b"\x01"],
    ids=["garbage", "nested too deep"],
)
def test_garbage_is_refused(frame: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        p.decode(frame)


@pytest.mark.parametrize(
    ("frame", "seen"),
    [
        (b"", p.Unreadable()),
        (b"\x93not a message", p.Unreadable()),
        (msgspec.msgpack.encode(["ExecuteBatch", 3]), p.Unreadable()),
        (
            msgspec.msgpack.encode(
                {"type": "ExecuteBatch", "batch_id": 3, "slice_id": "s", "wait_for": 2, "x": []}
            ),
            p.Unreadable("ExecuteBatch", 3, "s", 2),
        ),
        (
            msgspec.msgpack.encode({"type": "ExecuteBatch", "batch_id": True}),
            p.Unreadable("ExecuteBatch"),
        ),
        (msgspec.msgpack.encode({"type": 5, "batch_id": "3", "slice_id": 4}), p.Unreadable()),
        (msgspec.msgpack.encode({"type": "Reprioritize"}), p.Unreadable("Reprioritize")),
        (b"\x81\xa1x" + b"\x91" * 10**5 + b"\x01", p.Unreadable()),
    ],
    ids=["empty", "garbage", "array", "batch", "bool id", "wrong types", "unknown type", "deep"],
)
def test_glimpse_reads_what_it_still_can(frame: bytes, seen: p.Unreadable) -> None:
    assert p.glimpse(frame) == seen


def test_headers_stay_compact() -> None:
    """A batch header of 8 requests must stay tiny: tensors never travel inside it."""
    header = p.encode(
        p.ExecuteBatch(1, "tenant/deployment/0", [p.RequestHeader(i, -1) for i in range(8)])
    )
    assert len(header) < 100
