"""Every message that crosses the node ⇄ worker process boundary.

Transport: ZeroMQ. The node binds one ROUTER socket; each worker connects a DEALER
whose identity is its worker id. A message is ``[header, *payload_frames]``: the
header is a msgspec struct encoded with msgpack; tensor bytes (raw request bodies,
encoded response bodies) travel as their own frames, never inside the header, so
nothing on the hot path is JSON-encoded or pickled.

Handoff: the dispatcher may send a device's next batch before the running one ends. A batch
that must not start before another worker's batch has finished carries ``wait_for``; the
worker running that earlier batch is told (``ReleaseAfter``) to send a datagram with the
batch id to the waiting worker's handoff socket the moment it is done, so the device passes
from one worker to the next without a round trip through the node. ``Go`` is the node's own
release, for when the earlier worker cannot give it (it crashed, or its datagram failed) or
did not (the ReleaseAfter reached it after the batch was done: its ``BatchDone`` lists in
``handed_to`` whom it told).
``Revoke`` takes back a batch that has not started: when its turn comes it runs nothing,
hands the device on at once and answers ``BatchDone`` with ``revoked`` set.

Versions: a header that does not decode (corrupt, or from a node or worker of another version)
is dropped by whoever reads it, never fatal. ``glimpse`` reads what it still can; when that is
an ``ExecuteBatch``'s id, the worker answers ``BatchDone`` with ``error`` set at the batch's
turn, so that the node fails that batch rather than wait for it forever (and a ``LoadModel``'s
slice id, ``LoadFailed``).
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = [
    "BatchDone",
    "ExecuteBatch",
    "Go",
    "LoadFailed",
    "LoadModel",
    "Message",
    "ModelLoaded",
    "ReleaseAfter",
    "RequestHeader",
    "RequestResult",
    "Revoke",
    "Shutdown",
    "TensorInfo",
    "UnloadModel",
    "Unreadable",
    "WorkerReady",
    "decode",
    "encode",
    "glimpse",
]


class TensorInfo(msgspec.Struct, frozen=True):
    name: str
    datatype: str
    shape: list[int]


# ---- node → worker -------------------------------------------------------------------


class LoadModel(msgspec.Struct, tag=True):
    """Load one slice's model into the worker, verify it, and profile its batch latencies."""

    slice_id: str
    model_name: str
    model_version: str
    format: str
    path: str
    sha256: str | None
    device_kind: str  # "cpu" | "cuda"
    device_index: int
    threads: int | None
    memory_limit: int | None
    max_batch_size: int
    batchable: bool | None = None  # Model spec.batchable: None decides at load
    declared_inputs: list[TensorInfo] | None = None
    declared_outputs: list[TensorInfo] | None = None
    profile_batch_sizes: list[int] = []
    profile_repeats: int = 3
    nice: int = 0  # OS niceness this slice asks of its worker process
    # the tenant's model folders (Tenant spec.modelRoots) the file must lie in, links
    # followed, as the worker opens it; None: not confined
    roots: list[str] | None = None


class UnloadModel(msgspec.Struct, tag=True):
    slice_id: str


class RequestHeader(msgspec.Struct, frozen=True, array_like=True):
    request_id: int
    header_length: int  # Inference-Header-Content-Length, -1 when the body is plain JSON


class ExecuteBatch(msgspec.Struct, tag=True, omit_defaults=True):
    """Run these requests (raw bodies follow as frames, in order) as one batch."""

    batch_id: int
    slice_id: str
    requests: list[RequestHeader]
    wait_for: int = 0  # start only once this batch (of another worker) is done; 0: start now


class ReleaseAfter(msgspec.Struct, tag=True):
    """When batch ``batch_id`` of this worker is done (or now, if it is), send the batch id as
    a datagram to the handoff socket at ``path``: the next batch on the device waits there."""

    batch_id: int
    path: str


class Go(msgspec.Struct, tag=True):
    """Batch ``batch_id`` (of another worker) is done or will never be: stop waiting for it."""

    batch_id: int


class Revoke(msgspec.Struct, tag=True):
    """Do not run batch ``batch_id`` if it has not started (it keeps its place in the device's
    order, as an empty batch); a batch that started runs to its end."""

    batch_id: int


class Shutdown(msgspec.Struct, tag=True):
    pass


# ---- worker → node -------------------------------------------------------------------


class WorkerReady(msgspec.Struct, tag=True):
    worker_id: str
    pid: int


class ModelLoaded(msgspec.Struct, tag=True):
    slice_id: str
    platform: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    batchable: bool
    sha256: str
    load_seconds: float
    rss_bytes: int
    # measured seconds per batch, keyed by batch size (rows)
    profile: dict[int, float]
    batching_note: str = ""  # why requests are not merged although the shapes would allow it


class LoadFailed(msgspec.Struct, tag=True):
    slice_id: str
    code: str
    message: str


class RequestResult(msgspec.Struct, frozen=True, array_like=True):
    request_id: int
    status: int  # HTTP status: 200, or the error's status
    header_length: int  # -1 when the response body is plain JSON
    rows: int


class BatchDone(msgspec.Struct, tag=True, omit_defaults=True):
    """Results of one batch; one body frame per result follows, in order."""

    batch_id: int
    slice_id: str
    results: list[RequestResult]
    device_seconds: float  # time the batch held the device (decode + run + encode)
    rows: int
    handoff_failed: bool = False  # a ReleaseAfter datagram for this batch could not be sent
    # the handoff paths told (by datagram) that this batch is done; a worker waiting behind
    # it whose ReleaseAfter came too late to be here is released by the node instead
    handed_to: list[str] = []
    revoked: bool = False  # the batch was revoked before it started: nothing ran, no results
    error: str = ""  # the worker could not read the batch: nothing ran, no results


Message = (
    LoadModel
    | UnloadModel
    | ExecuteBatch
    | ReleaseAfter
    | Go
    | Revoke
    | Shutdown
    | WorkerReady
    | ModelLoaded
    | LoadFailed
    | BatchDone
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    """Return the msgpack header frame for a message."""
    return _encoder.encode(message)


def decode(frame: bytes | memoryview) -> Message:
    """Return the message in a header frame; raises msgspec.DecodeError on garbage."""
    try:
        message: Message = _decoder.decode(frame)
    except RecursionError as exc:  # msgspec's depth limit: garbage too, nested absurdly deep
        raise msgspec.DecodeError(f"header nested too deeply: {exc}") from exc
    return message


class Unreadable(msgspec.Struct, frozen=True):
    """What ``glimpse`` could read of a header that does not decode: the message's type tag
    and, for a batch, its ids; None for each that cannot be read. Never sent."""

    type: str | None = None
    batch_id: int | None = None
    slice_id: str | None = None
    wait_for: int | None = None


def glimpse(frame: bytes | memoryview) -> Unreadable:
    """Return what can still be read of a header frame that ``decode`` refuses: the fields
    that are there with the right types, when the frame is a msgpack map at all."""
    try:
        fields = msgspec.msgpack.decode(frame)
    except (msgspec.DecodeError, RecursionError):
        return Unreadable()
    if not isinstance(fields, dict):
        return Unreadable()

    def read(name: str, kind: type[int] | type[str]) -> Any:
        value = fields.get(name)
        # bool is an int to Python, never an id here
        return value if isinstance(value, kind) and not isinstance(value, bool) else None

    return Unreadable(
        read("type", str), read("batch_id", int), read("slice_id", str), read("wait_for", int)
    )
