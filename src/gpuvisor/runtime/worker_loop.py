"""The worker's loop over the node's messages: loading slices and running batches in turn."""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import msgspec
import psutil
import zmq

from gpuvisor.errors import GpuvisorError, IntegrityError
from gpuvisor.runtime import protocol as p
from gpuvisor.runtime.batch_check import decide_batching
from gpuvisor.runtime.execution import LoadedSlice, profile_batches, run_requests
from gpuvisor.runtime.executors.base import ExecutorDevice, load_executor, verify_sha256
from gpuvisor.runtime.niceness import set_niceness
from gpuvisor.runtime.tensors import TensorMeta, encode_error

__all__ = ["Worker"]

log = logging.getLogger("gpuvisor.worker")

_PARENT_POLL_MS = 1000
_REMEMBERED = 1024  # batch ids kept in the released / completed sets
_TOKEN = struct.Struct("<q")  # a handoff datagram: the id of the batch that is done


def _meta_list(infos: list[p.TensorInfo] | None) -> list[TensorMeta] | None:
    if infos is None:
        return None
    return [TensorMeta(i.name, i.datatype, tuple(i.shape)) for i in infos]


def _info_list(metas: Sequence[TensorMeta]) -> list[p.TensorInfo]:
    return [p.TensorInfo(m.name, m.datatype, list(m.shape)) for m in metas]


def _remember(ids: dict[int, None], batch_id: int) -> None:
    ids[batch_id] = None
    if len(ids) > _REMEMBERED:
        del ids[next(iter(ids))]


class Worker:
    """Receives messages from the node and answers them, one at a time.

    Batches run in the order they arrive. A batch with ``wait_for`` starts only once that
    batch (another worker's) is done: its worker's datagram on this worker's handoff socket,
    or the node's ``Go``, says so. Control messages (``ReleaseAfter``, ``Go``, ``Shutdown``)
    are taken as soon as they are read, even while a batch waits or runs.

    A message that does not decode is logged and dropped, never fatal: the worker serves its
    other slices on. What it is can be answered only as far as it can be read (``glimpse``):
    a batch whose id is readable is answered as failed at its turn, a load whose slice id is
    readable is answered ``LoadFailed``; a batch with no readable id holds its device until the
    node's batch timeout (``workers.batchTimeout``) takes it as hung and restarts the worker.
    """

    def __init__(self, endpoint: str, worker_id: str, handoff_path: str | None = None) -> None:
        self.worker_id = worker_id
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.IDENTITY, worker_id.encode())
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self.handoff: socket.socket | None = None
        if handoff_path:
            self.handoff = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.handoff.bind(handoff_path)
            self.handoff.setblocking(False)
        self.poller = zmq.Poller()
        self.poller.register(self.socket, zmq.POLLIN)
        if self.handoff is not None:
            self.poller.register(self.handoff.fileno(), zmq.POLLIN)
        self.slices: dict[str, LoadedSlice] = {}
        self.parent_pid = os.getppid()
        self.process = psutil.Process()
        self.pending: deque[tuple[p.Message, list[memoryview]]] = deque()
        self.released: dict[int, None] = {}  # other workers' batches known to be done
        self.completed: dict[int, None] = {}  # this worker's batches that are done
        self.release_after: dict[int, list[str]] = {}  # own batch id -> handoff paths
        self.revoked: dict[int, None] = {}  # own batches taken back before they started
        self.handoff_failures: set[int] = set()  # passed-over batches whose handoff failed
        self.handed_early: dict[int, list[str]] = {}  # passed-over batches -> paths told
        self.unreadable: dict[int, str] = {}  # own batches that did not decode -> what was wrong
        self.stopping = False
        self.base_nice = os.getpriority(os.PRIO_PROCESS, 0)
        self.nice = self.base_nice
        # GPUVISOR_BATCH_TRACE=<file>: append "<worker> <batch> <start> <end> <revoked>" per
        # batch (monotonic seconds, comparable across processes), to check what ran when.
        trace = os.environ.get("GPUVISOR_BATCH_TRACE")
        self.trace = open(trace, "a", buffering=1) if trace else None  # noqa: SIM115

    def send(self, message: p.Message, frames: Sequence[bytes] = ()) -> None:
        self.socket.send_multipart([p.encode(message), *frames], copy=False)

    def serve(self) -> None:
        """Serve until told to shut down or until the node process disappears."""
        self.send(p.WorkerReady(self.worker_id, os.getpid()))
        while not self.stopping:
            if not self.pending:
                if not self.read(_PARENT_POLL_MS) and self.orphaned():
                    return
                continue
            message, frames = self.pending.popleft()
            if isinstance(message, p.ExecuteBatch):
                if self.wait_for(message.wait_for):
                    self.execute(message, frames)
            elif isinstance(message, p.LoadModel):
                self.load(message)
            elif isinstance(message, p.UnloadModel):
                loaded = self.slices.pop(message.slice_id, None)
                if loaded is not None:
                    loaded.executor.close()
                    self.apply_nice()

    def orphaned(self) -> bool:
        if os.getppid() != self.parent_pid:
            log.warning("node process %d is gone; worker %s exits", self.parent_pid, self.worker_id)
            return True
        return False

    def read(self, timeout_ms: int) -> bool:
        """Read what has arrived (waiting up to ``timeout_ms``): handoff datagrams and control
        messages take effect now, everything else queues in ``pending``. False: nothing came."""
        ready = dict(self.poller.poll(timeout_ms))
        if not ready:
            return False
        if self.handoff is not None and self.handoff.fileno() in ready:
            while True:
                try:
                    data = self.handoff.recv(64)
                except BlockingIOError:
                    break
                if len(data) == _TOKEN.size:
                    _remember(self.released, _TOKEN.unpack(data)[0])
        if self.socket in ready:
            socket = self.socket
            # ask whether a message waits rather than reading until zmq.Again: raising that
            # exception cost more than the check, once per read
            while int(socket.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                frames = socket.recv_multipart(zmq.NOBLOCK, copy=False)
                header, payload = frames[0].buffer, [f.buffer for f in frames[1:]]
                try:
                    message = p.decode(header)
                except msgspec.DecodeError as exc:
                    self.drop_unreadable(header, len(payload), exc)
                    continue
                self.take(message, payload)
        return True

    def drop_unreadable(self, header: memoryview, payload: int, error: msgspec.DecodeError) -> None:
        """Log a message whose header does not decode, and answer it where it can be told what
        it was: a batch fails at its turn (``unreadable``), a load fails at once."""
        seen = p.glimpse(header)
        problem = (
            f"a message that does not decode ({seen.type or 'type unreadable'}, "
            f"{header.nbytes}-byte header, {payload} payload frames): {error}"
        )
        if seen.type == "ExecuteBatch" and seen.batch_id is not None:
            log.warning(
                "worker %s drops %s; batch %d is answered as failed",
                self.worker_id,
                problem,
                seen.batch_id,
            )
            self.unreadable[seen.batch_id] = problem
            # an empty batch in the readable one's place, so that it keeps its turn on the device
            empty = p.ExecuteBatch(seen.batch_id, seen.slice_id or "", [], seen.wait_for or 0)
            self.pending.append((empty, []))
        elif seen.type == "LoadModel" and seen.slice_id is not None:
            log.warning(
                "worker %s drops %s; the load of slice %s is answered as failed",
                self.worker_id,
                problem,
                seen.slice_id,
            )
            self.send(
                p.LoadFailed(
                    seen.slice_id, "internal", f"the worker could not read the load: {problem}"
                )
            )
        elif seen.type in (None, "ExecuteBatch"):
            batch = "if it is a batch, it" if seen.type is None else "the batch"
            log.warning(
                "worker %s drops %s; %s cannot be answered (no batch id can be read from it): "
                "the node's batch timeout (workers.batchTimeout) will restart this worker",
                self.worker_id,
                problem,
                batch,
            )
        else:
            log.warning("worker %s drops %s", self.worker_id, problem)

    def take(self, message: p.Message, frames: list[memoryview]) -> None:
        if isinstance(message, p.ReleaseAfter):
            if message.batch_id in self.completed:
                self.release(message.batch_id, [message.path])
            else:
                self.release_after.setdefault(message.batch_id, []).append(message.path)
        elif isinstance(message, p.Go):
            _remember(self.released, message.batch_id)
        elif isinstance(message, p.Revoke):
            if message.batch_id not in self.completed:
                _remember(self.revoked, message.batch_id)
        elif isinstance(message, p.Shutdown):
            self.stopping = True
        else:
            self.pending.append((message, frames))

    def wait_for(self, batch_id: int) -> bool:
        """Block until batch ``batch_id`` is done (0: nothing to wait for); False if the worker
        was told to stop (or lost its node) meanwhile."""
        while batch_id and batch_id not in self.released and batch_id not in self.completed:
            if self.stopping or (not self.read(_PARENT_POLL_MS) and self.orphaned()):
                return False
        return not self.stopping

    def pass_over_revoked(self) -> None:
        """Batches of this worker that were taken back and are next in line run nothing: their
        turn is now, so hand the device on to whoever waits behind them at once, rather than
        after this batch's reply has gone out (their own empty replies follow as usual)."""
        for message, _ in self.pending:
            if not isinstance(message, p.ExecuteBatch) or message.batch_id not in self.revoked:
                return
            waited = message.wait_for
            if waited and waited not in self.released and waited not in self.completed:
                return
            _remember(self.completed, message.batch_id)
            paths = self.release_after.pop(message.batch_id, [])
            told = self.release(message.batch_id, paths)
            self.handed_early[message.batch_id] = told
            if len(told) < len(paths):
                self.handoff_failures.add(message.batch_id)

    def release(self, batch_id: int, paths: Sequence[str]) -> list[str]:
        """Tell the workers waiting behind ``batch_id`` that it is done; return the paths that
        were told (the node releases the others itself)."""
        if self.handoff is None:
            return []
        told = []
        for path in paths:
            try:
                self.handoff.sendto(_TOKEN.pack(batch_id), path)
            except OSError as exc:
                log.warning("handoff of batch %d to %s failed: %s", batch_id, path, exc)
                continue
            told.append(path)
        return told

    def load(self, spec: p.LoadModel) -> None:
        started = time.perf_counter()
        try:
            digest = verify_sha256(Path(spec.path), spec.sha256)
            if spec.sha256 is not None and spec.format == "onnx":
                refuse_external_data(Path(spec.path))
            device = ExecutorDevice(
                kind="cuda" if spec.device_kind == "cuda" else "cpu",
                index=spec.device_index,
                threads=spec.threads,
                memory_limit=spec.memory_limit,
            )
            executor = load_executor(
                spec.format,
                Path(spec.path),
                device,
                declared_inputs=_meta_list(spec.declared_inputs),
                declared_outputs=_meta_list(spec.declared_outputs),
            )
            inputs, outputs = list(executor.inputs), list(executor.outputs)
            batchable, note = decide_batching(executor, inputs, outputs, spec.batchable)
            loaded = LoadedSlice(spec, executor, inputs, outputs, batchable)
            sizes = [b for b in spec.profile_batch_sizes if b <= max(1, spec.max_batch_size)]
            profile = profile_batches(loaded, sizes or [1], spec.profile_repeats)
        except GpuvisorError as exc:
            self.send(p.LoadFailed(spec.slice_id, exc.code, exc.message))
            return
        except Exception as exc:  # a broken model file can raise anything from the framework
            self.send(p.LoadFailed(spec.slice_id, "model_error", f"{type(exc).__name__}: {exc}"))
            return
        self.slices[spec.slice_id] = loaded
        self.apply_nice()
        self.send(
            p.ModelLoaded(
                slice_id=spec.slice_id,
                platform=executor.platform,
                inputs=_info_list(loaded.inputs),
                outputs=_info_list(loaded.outputs),
                batchable=batchable,
                sha256=digest,
                load_seconds=time.perf_counter() - started,
                rss_bytes=self.process.memory_info().rss,
                profile=profile,
                batching_note=note,
            )
        )

    def apply_nice(self) -> None:
        """Run at the niceness the most urgent of this worker's slices asks for (the node's own
        plus the smallest ``nice`` among them): a worker serving only batch-class slices yields
        the CPU to the node and to every other worker. Raising the priority again (a more
        urgent slice joined a shared worker) needs CAP_SYS_NICE; without it the worker keeps
        its niceness and says so."""
        if not self.slices:
            return
        wanted = min(19, self.base_nice + min(s.spec.nice for s in self.slices.values()))
        if wanted == self.nice:
            return
        try:
            set_niceness(wanted)
        except OSError as exc:
            log.warning(
                "worker %s stays at niceness %d (wanted %d for its slices %s): %s",
                self.worker_id,
                self.nice,
                wanted,
                ", ".join(sorted(self.slices)),
                exc,
            )
            return
        log.info("worker %s runs at niceness %d", self.worker_id, wanted)
        self.nice = wanted

    def execute(self, batch: p.ExecuteBatch, bodies: list[memoryview]) -> None:
        self.read(0)  # a Revoke may be waiting
        started = time.perf_counter()
        loaded = self.slices.get(batch.slice_id)
        results: list[p.RequestResult] = []
        out_frames: list[bytes] = []
        revoked = batch.batch_id in self.revoked
        error = self.unreadable.pop(batch.batch_id, "")
        handoff_failed = batch.batch_id in self.handoff_failures
        self.handoff_failures.discard(batch.batch_id)
        if revoked:
            del self.revoked[batch.batch_id]
        elif error:
            pass  # nothing of it could be read to run: the node fails the batch with ``error``
        elif loaded is None:
            for header in batch.requests:
                results.append(p.RequestResult(header.request_id, 503, -1, 0))
                out_frames.append(
                    encode_error(
                        f"model of slice {batch.slice_id} is not loaded in this worker",
                        "unavailable",
                    )
                )
        else:
            results, out_frames = run_requests(loaded, batch.requests, bodies)
        ended = time.perf_counter()
        device_seconds = 0.0 if revoked or error else ended - started
        if self.trace is not None:
            self.trace.write(
                f"{self.worker_id} {batch.batch_id} {started:.6f} {ended:.6f} {int(revoked)}\n"
            )
        # The device is free: hand it to whoever waits behind this batch before telling the
        # node (a ReleaseAfter may have arrived while the batch ran).
        self.read(0)
        _remember(self.completed, batch.batch_id)
        paths = self.release_after.pop(batch.batch_id, [])
        told = self.release(batch.batch_id, paths) + self.handed_early.pop(batch.batch_id, [])
        handoff_failed = handoff_failed or len(told) < len(paths)
        self.pass_over_revoked()
        self.send(
            p.BatchDone(
                batch_id=batch.batch_id,
                slice_id=batch.slice_id,
                results=results,
                device_seconds=device_seconds,
                rows=sum(r.rows for r in results),
                handoff_failed=handoff_failed,
                handed_to=told,
                revoked=revoked,
                error=error,
            ),
            out_frames,
        )


def refuse_external_data(path: Path) -> None:
    """Raise IntegrityError for an ONNX model that keeps tensors in other files: a pinned
    sha256 (or a signature) covers the model's own file only, and its weights could be
    changed under it."""
    from gpuvisor.runtime.executors.onnx import external_data_files

    files = external_data_files(path)
    if files:
        raise IntegrityError(
            f"model file {path} keeps tensors in {len(files)} other file(s) "
            f"({', '.join(files[:3])}{', …' if len(files) > 3 else ''}), which its sha256 "
            "or signature does not cover: save the model as one file (onnx.save_model "
            "without save_as_external_data) to pin or sign it",
            path=str(path),
        )
