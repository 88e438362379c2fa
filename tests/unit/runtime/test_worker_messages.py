"""A real Worker over a real ZeroMQ link (the test is the node's ROUTER): a message it cannot
decode is logged and dropped, answered where what it was can still be read, and the worker
serves on."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
import zmq

from gpuvisor.bench.mlp import BenchModel
from gpuvisor.bench.oip_clients import oip_body
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


SLOW = BenchModel("slow-mlp", (512,) * 25)  # ~50-150 ms for 64 rows on one thread


def test_a_batch_ready_behind_another_starts_without_waiting_for_the_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner goes from a batch to the next one that may start at once, leaving the reply
    to the main thread: both batches run while the link is held busy, and their replies then
    come in order."""
    trace = tmp_path / "batches"
    monkeypatch.setenv("GPUVISOR_BATCH_TRACE", str(trace))
    slow = SLOW.build(tmp_path)
    body, header_length = oip_body(SLOW.inputs(64))
    with tempfile.TemporaryDirectory(prefix="gpuvisor-") as directory:
        link = Link(directory)
        try:
            assert isinstance(link.load(slow), p.ModelLoaded)
            warm_up = p.ExecuteBatch(9, SLICE, [p.RequestHeader(9, header_length)])
            link.send_message(warm_up, body)  # the slice's batches now count as long
            assert isinstance(link.receive(60)[0], p.BatchDone)
            for batch_id in (1, 2):
                request = p.RequestHeader(batch_id, header_length)
                link.send_message(p.ExecuteBatch(batch_id, SLICE, [request]), body)
            deadline = time.monotonic() + 10
            while not _queued(link.worker, 2):
                assert time.monotonic() < deadline, "batch 2 never reached the runner's queue"
                time.sleep(0.001)
            with link.worker.link_lock:  # neither thread can send or read meanwhile
                while len(_lines(trace)) < 3:
                    assert time.monotonic() < deadline + 30, _lines(trace)
                    time.sleep(0.005)
            replies = [link.receive()[0] for _ in range(2)]
        finally:
            link.close()
    assert [line.split()[1] for line in _lines(trace)] == ["9", "1", "2"]
    done = [r for r in replies if isinstance(r, p.BatchDone)]
    assert [d.batch_id for d in done] == [1, 2]
    assert all([r.status for r in d.results] == [200] for d in done)


def _queued(worker: Worker, batch_id: int) -> bool:
    with worker.lock:
        return any(getattr(m, "batch_id", None) == batch_id for m, _ in worker.pending)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_a_runner_that_fails_ends_the_worker_with_its_error(
    link: Link, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the runner thread must not leave a worker that reads messages and runs
    nothing: ``serve`` raises it, so the process ends as a crash and the node restarts it."""
    ended: list[BaseException] = []

    def broken(spec: p.LoadModel) -> None:
        raise RuntimeError("the runner broke")

    monkeypatch.setattr(link.worker, "load", broken)
    monkeypatch.setattr(
        threading,
        "excepthook",
        lambda args: ended.append(args.exc_value),  # type: ignore[arg-type]
    )
    link.send_message(
        p.LoadModel(SLICE, "scorer", "1", "onnx", str(model), None, "cpu", 0, 1, None, 4)
    )
    link.thread.join(10)
    assert not link.thread.is_alive()
    assert [str(e) for e in ended] == ["the runner broke"]


def test_shutdown_read_by_the_runner_ends_the_worker_at_once(link: Link, model: Path) -> None:
    """An idle worker's runner reads the link: a Shutdown it reads must end the main thread
    too, not at that thread's next look at the clock (a second later)."""
    assert isinstance(link.load(model), p.ModelLoaded)
    link.send_message(p.Shutdown())
    link.thread.join(0.9)
    assert not link.thread.is_alive()


def _load(
    link: Link, path: Path, sha256: str | None = None, roots: list[str] | None = None
) -> p.Message:
    link.send_message(
        p.LoadModel(
            SLICE, "scorer", "1", "onnx", str(path), sha256, "cpu", 0, 1, None, 4, roots=roots
        )
    )
    return link.receive()[0]


def test_a_confined_file_is_checked_where_the_worker_opens_it(
    link: Link, model: Path, tmp_path: Path
) -> None:
    """The node's roots travel with the load: the file the worker opens, links followed,
    must lie in them (a link swapped after the node's check does not pass)."""
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    mine.mkdir()
    theirs.mkdir()
    (theirs / "secret.onnx").write_bytes(model.read_bytes())
    escape = mine / "current.onnx"
    escape.symlink_to(theirs / "secret.onnx")
    failed = _load(link, escape, roots=[str(mine)])
    assert isinstance(failed, p.LoadFailed) and failed.code == "integrity_error"
    assert "now leads outside the tenant's model folders" in failed.message
    escape.unlink()
    escape.symlink_to(model)
    shutil.copy(model, mine / "own.onnx")
    escape.unlink()
    escape.symlink_to(mine / "own.onnx")
    assert isinstance(_load(link, escape, roots=[str(mine)]), p.ModelLoaded)


def test_a_pinned_file_loads_the_bytes_its_digest_was_taken_of(
    link: Link, model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is replaced right after the worker read and checked it: what loads is what
    was checked, not what the path holds by then."""
    import gpuvisor.runtime.worker_loop as worker_loop

    source = tmp_path / "model.onnx"
    source.write_bytes(model.read_bytes())
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    other = SLOW.build(tmp_path)  # another model, with other inputs
    read = worker_loop.read_model

    def read_then_swap(*args: Any, **kwargs: Any) -> tuple[bytes, str]:
        checked = read(*args, **kwargs)
        os.replace(other, source)  # the swap a racing writer would make
        return checked

    monkeypatch.setattr(worker_loop, "read_model", read_then_swap)
    loaded = _load(link, source, sha256=digest)
    assert isinstance(loaded, p.ModelLoaded) and loaded.sha256 == digest
    # the demo scorer's 16 features, not the other model's 512
    assert [(i.name, i.shape[1:]) for i in loaded.inputs] == [("features", [16])]


def _slow_batch(batch_id: int, slice_id: str, rows: int = 64) -> tuple[p.ExecuteBatch, bytes]:
    body, header_length = oip_body(SLOW.inputs(rows))
    return p.ExecuteBatch(batch_id, slice_id, [p.RequestHeader(batch_id, header_length)]), body


def _load_slow(link: Link, slice_id: str, path: Path) -> None:
    link.send_message(
        p.LoadModel(slice_id, "slow", "1", "onnx", str(path), None, "cpu", 0, 1, None, 64)
    )


def test_batches_queued_when_the_worker_stops_are_given_back_not_lost(
    link: Link, tmp_path: Path
) -> None:
    """The batch that runs is answered; those still queued are answered as taken back
    (nothing ran), so the node queues or answers their requests rather than report a crash."""
    _load_slow(link, SLICE, SLOW.build(tmp_path))
    assert isinstance(link.receive(60)[0], p.ModelLoaded)
    for batch_id in (1, 2, 3):
        batch, body = _slow_batch(batch_id, SLICE)
        link.send_message(batch, body)
    time.sleep(0.01)
    link.send_message(p.Shutdown())
    replies = [link.receive(60)[0] for _ in range(3)]
    done = [r for r in replies if isinstance(r, p.BatchDone)]
    assert [d.batch_id for d in done] == [1, 2, 3]
    ran = [d for d in done if not d.revoked]
    assert ran and all([r.status for r in d.results] == [200] for d in ran)
    assert all(d.results == [] and d.device_seconds == 0.0 for d in done if d.revoked)
    assert done[-1].revoked  # the last one cannot have started before the Shutdown


BIG = BenchModel("big-mlp", (1024,) * 10)  # its load profiles batches of up to 256 rows


def test_a_load_beside_serving_slices_does_not_hold_up_their_batches(
    link: Link, model: Path, tmp_path: Path
) -> None:
    """A shared worker serves a slice; another slice's model loads (and profiles, for a
    while): the first slice's batch, granted the device meanwhile, runs at once."""
    assert isinstance(link.load(model), p.ModelLoaded)
    big = BIG.build(tmp_path)
    link.send_message(
        p.LoadModel("t/big/0", "big", "1", "onnx", str(big), None, "cpu", 0, 1, None, 256)
    )
    time.sleep(0.05)  # the load is under way
    link.send_message(_batch(7), BODY)
    first, _ = link.receive(60)
    second, _ = link.receive(60)
    assert isinstance(first, p.BatchDone) and first.batch_id == 7
    assert [r.status for r in first.results] == [200]
    assert isinstance(second, p.ModelLoaded) and second.slice_id == "t/big/0"
    assert second.load_seconds > first.device_seconds


def test_a_slice_unloaded_while_it_loads_never_serves(
    link: Link, model: Path, tmp_path: Path
) -> None:
    assert isinstance(link.load(model), p.ModelLoaded)
    big = BIG.build(tmp_path)
    link.send_message(
        p.LoadModel("t/big/0", "big", "1", "onnx", str(big), None, "cpu", 0, 1, None, 256)
    )
    time.sleep(0.05)
    link.send_message(p.UnloadModel("t/big/0"))
    failed, _ = link.receive(60)
    assert isinstance(failed, p.LoadFailed) and "unloaded while its model loaded" in failed.message
    assert "t/big/0" not in link.worker.slices
