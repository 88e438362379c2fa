"""A real Worker over a real ZeroMQ link (the test is the node's ROUTER): a message it cannot
decode is logged and dropped, answered where what it was can still be read, and the worker
serves on."""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import msgspec
import orjson
import pytest
import zmq

from gpuvisor.demo.models import build_demo_models
from gpuvisor.runtime import protocol as p
from gpuvisor.runtime.worker_loop import Worker

WORKER_ID = "w-test"
SLICE = "t/scorer/0"
BODY = orjson.dumps(
    {"inputs": [{"name": "features", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16}]}
)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(build_demo_models(tmp_path_factory.mktemp("models"))["basket-scorer"])


class Link:
    """The node's end of a worker's link: a ROUTER on ipc://, and a Worker serving in a thread."""

    def __init__(self, directory: str) -> None:
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        endpoint = f"ipc://{directory}/node.sock"
        self.router.bind(endpoint)
        self.worker = Worker(endpoint, WORKER_ID)
        self.thread = threading.Thread(target=self.worker.serve, name=WORKER_ID, daemon=True)
        self.thread.start()
        assert isinstance(self.receive()[0], p.WorkerReady)

    def send(self, *frames: bytes) -> None:
        self.router.send_multipart([WORKER_ID.encode(), *frames])

    def send_message(self, message: p.Message, *payload: bytes) -> None:
        self.send(p.encode(message), *payload)

    def receive(self, timeout: float = 10.0) -> tuple[p.Message, list[bytes]]:
        """Return the worker's next message and its payload frames; fail if none comes."""
        if not self.router.poll(int(timeout * 1000)):
            state = "still serving" if self.thread.is_alive() else "its serve() has ended"
            raise AssertionError(f"no message from the worker in {timeout:.0f}s ({state})")
        frames = self.router.recv_multipart()
        return p.decode(frames[1]), frames[2:]

    def load(self, model: Path) -> p.Message:
        self.send_message(
            p.LoadModel(SLICE, "scorer", "1", "onnx", str(model), None, "cpu", 0, 1, None, 4)
        )
        return self.receive()[0]

    def close(self) -> None:
        if self.thread.is_alive():
            self.send_message(p.Shutdown())
            self.thread.join(5)
        for loaded in self.worker.slices.values():
            loaded.executor.close()
        self.worker.socket.close(0)
        self.router.close(0)
        self.context.term()


@pytest.fixture
def link() -> Iterator[Link]:
    # ipc:// paths must stay short (about 100 bytes), shorter than pytest's tmp_path can be
    with tempfile.TemporaryDirectory(prefix="gpuvisor-") as directory:
        link = Link(directory)
        try:
            yield link
        finally:
            link.close()


def _batch(batch_id: int) -> p.ExecuteBatch:
    return p.ExecuteBatch(batch_id, SLICE, [p.RequestHeader(batch_id, -1)])


CANNOT_ANSWER = "cannot be answered"
# a map whose first field nests 10**5 arrays deep, then a readable type and batch id
NESTED = b"\x83\xa1x" + b"\x91" * 10**5 + b"\x01\xa4type\xacExecuteBatch\xa8batch_id\x09"


@pytest.mark.parametrize(
    ("frames", "logged"),
    [
        pytest.param([b""], CANNOT_ANSWER, id="empty header"),
        pytest.param([b"\xc1 not msgpack"], CANNOT_ANSWER, id="not msgpack"),
        pytest.param([p.encode(_batch(9))[:-3], BODY], CANNOT_ANSWER, id="truncated batch"),
        pytest.param([p.encode(_batch(9)) + b"\x00", BODY], "trailing", id="trailing bytes"),
        pytest.param([msgspec.msgpack.encode([1, 2])], CANNOT_ANSWER, id="not a map"),
        pytest.param([NESTED, BODY], "nested too deeply", id="nested too deep"),
        pytest.param(
            [msgspec.msgpack.encode({"type": "Reprioritize", "slice_id": SLICE})],
            "(Reprioritize, ",
            id="unknown type",
        ),
        pytest.param(
            [msgspec.msgpack.encode({"type": "ExecuteBatch", "batch_id": "9"}), BODY],
            CANNOT_ANSWER,
            id="batch id unreadable",
        ),
    ],
)
def test_an_undecodable_message_is_dropped_and_the_worker_serves_on(
    link: Link,
    model: Path,
    frames: list[bytes],
    logged: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="gpuvisor.worker"):
        link.send(*frames)
        assert isinstance(link.load(model), p.ModelLoaded)
        link.send_message(_batch(1), BODY)
        done, bodies = link.receive()
    assert isinstance(done, p.BatchDone) and done.batch_id == 1 and not done.error
    assert [r.status for r in done.results] == [200]
    assert orjson.loads(bodies[0])["outputs"][0]["shape"] == [1, 1]
    [warning] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "does not decode" in warning, warning
    assert f"{len(frames[0])}-byte header, {len(frames) - 1} payload frames" in warning, warning
    assert logged in warning, warning


def test_a_batch_with_a_readable_id_fails_at_its_turn(link: Link, model: Path) -> None:
    """A batch from a node of another version (here: requests as maps) is answered as failed,
    in its place among the batches around it, and takes no device time."""
    assert isinstance(link.load(model), p.ModelLoaded)
    skewed = {
        "type": "ExecuteBatch",
        "batch_id": 2,
        "slice_id": SLICE,
        "requests": [{"request_id": 2, "header_length": -1}],
    }
    link.send_message(_batch(1), BODY)
    link.send(msgspec.msgpack.encode(skewed), BODY)
    link.send_message(_batch(3), BODY)
    replies = [link.receive() for _ in range(3)]
    done = [message for message, _ in replies]
    assert all(isinstance(message, p.BatchDone) for message in done)
    first, failed, last = (message for message in done if isinstance(message, p.BatchDone))
    assert [first.batch_id, failed.batch_id, last.batch_id] == [1, 2, 3]
    assert [r.status for r in first.results] == [200] == [r.status for r in last.results]
    assert failed.slice_id == SLICE and failed.results == [] and replies[1][1] == []
    assert failed.device_seconds == 0.0 and not failed.revoked
    assert "(ExecuteBatch, " in failed.error and "$.requests[0]" in failed.error, failed.error


def test_a_load_with_a_readable_slice_id_is_answered_load_failed(link: Link, model: Path) -> None:
    skewed = {"type": "LoadModel", "slice_id": SLICE, "model_name": "scorer", "format": 1}
    link.send(msgspec.msgpack.encode(skewed))
    failed, _ = link.receive()
    assert isinstance(failed, p.LoadFailed) and failed.slice_id == SLICE
    assert failed.code == "internal" and "(LoadModel, " in failed.message, failed.message
    assert isinstance(link.load(model), p.ModelLoaded)
