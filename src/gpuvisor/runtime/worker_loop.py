"""The worker's loop over the node's messages: loading slices and running batches in turn."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec
import psutil
import zmq

from gpuvisor.errors import GpuvisorError, IntegrityError
from gpuvisor.runtime import protocol as p
from gpuvisor.runtime.batch_check import decide_batching
from gpuvisor.runtime.execution import LoadedSlice, profile_batches, run_requests
from gpuvisor.runtime.executors.base import (
    ExecutorDevice,
    load_executor,
    read_model,
    verify_sha256,
)
from gpuvisor.runtime.niceness import set_niceness
from gpuvisor.runtime.tensors import TensorMeta, encode_error

__all__ = ["Worker"]

log = logging.getLogger("gpuvisor.worker")

_PARENT_POLL_MS = 1000
# A batch expected to run longer than this (as its slice's last one did) has the main thread
# read the link meanwhile, so that the next batch is decoded and ready when it ends; a
# shorter one is over before a second thread could help, and waking it costs more than it saves.
_WATCH_AFTER = 0.001
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


class _Wake:
    """A flag one thread sets and another waits for with ``select``/``poll`` (a pipe)."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def fileno(self) -> int:
        return self._read

    def set(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: it is set already
            os.write(self._write, b"\0")

    def clear(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read, 4096):
                pass

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)


class Worker:
    """Receives messages from the node and answers them; runs its slices' work in turn.

    The runner thread (``run``) does the work: it reads the node's messages, takes control
    messages (``ReleaseAfter``, ``Go``, ``Revoke``, ``Shutdown``) at once and the rest
    (batches, loads, unloads) in arrival order. A batch with ``wait_for`` starts only once
    that batch (another worker's) is done, which that worker's datagram on this worker's
    handoff socket, or the node's ``Go``, says.

    The main thread (``serve``) helps while a long batch runs (longer than ``_WATCH_AFTER``,
    as the slice's last batch took): it reads the messages that come meanwhile, so the next
    batch is decoded by the time this one ends, and the runner, finding it ready, starts it at
    once and leaves this one's reply for the main thread to send. Otherwise the runner sends
    its replies itself, the shortest way back to the node, and short batches cost no wake-up
    of a second thread. A load beside slices that serve already (a ``shared`` worker) runs
    in a loader thread, one at a time, so their batches do not wait seconds behind it. The
    link's socket is used by one thread at a time (``link_lock``); the state the threads
    share is guarded by ``lock``.

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
        self.link_fd = int(self.socket.getsockopt(zmq.FD))
        self.handoff: socket.socket | None = None
        if handoff_path:
            self.handoff = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.handoff.bind(handoff_path)
            self.handoff.setblocking(False)
        self.slices: dict[str, LoadedSlice] = {}
        self.parent_pid = os.getppid()
        self.process = psutil.Process()
        self.lock = threading.Lock()
        self.link_lock = threading.RLock()
        self.wake_main = _Wake()  # a long batch started, or replies wait to be sent
        self.wake_runner = _Wake()  # the main thread queued work, released a batch or stops
        # guarded by ``lock``:
        self.pending: deque[tuple[p.Message, list[memoryview]]] = deque()
        self.released: dict[int, None] = {}  # other workers' batches known to be done
        self.completed: dict[int, None] = {}  # this worker's batches that are done
        self.release_after: dict[int, list[str]] = {}  # own batch id -> handoff paths
        self.revoked: dict[int, None] = {}  # own batches taken back before they started
        self.unreadable: dict[int, str] = {}  # own batches that did not decode -> what was wrong
        self.watched = False  # the main thread reads the link (a long batch runs)
        self.to_load: deque[p.LoadModel] = deque()  # loads beside serving slices, in turn
        self.loading: set[str] = set()  # slices whose load is under way
        self.cancelled: set[str] = set()  # of those, the ones unloaded meanwhile
        self.loader: threading.Thread | None = None
        self.stopping = False
        # the runner's own:
        self.handoff_failures: set[int] = set()  # passed-over batches whose handoff failed
        self.handed_early: dict[int, list[str]] = {}  # passed-over batches -> paths told
        self.runner_ident = 0  # the runner thread's ``threading.get_ident()``
        self.took: dict[str, float] = {}  # slice id -> seconds its last batch ran
        self.outbox: deque[tuple[p.Message, Sequence[bytes]]] = deque()  # replies, in order
        self.wake_later = False  # replies wait in the outbox for the next batch to start
        self.failure: Exception | None = None  # what ended the runner, if it failed
        self.base_nice = os.getpriority(os.PRIO_PROCESS, 0)
        self.nice = self.base_nice
        # GPUVISOR_BATCH_TRACE=<file>: append "<worker> <batch> <start> <end> <revoked>" per
        # batch (monotonic seconds, comparable across processes), to check what ran when.
        trace = os.environ.get("GPUVISOR_BATCH_TRACE")
        self.trace = open(trace, "a", buffering=1) if trace else None  # noqa: SIM115

    # ---- the link -------------------------------------------------------------------------

    def send(self, message: p.Message, frames: Sequence[bytes] = ()) -> None:
        with self.link_lock:
            self.socket.send_multipart([p.encode(message), *frames], copy=False)
            self._signal_waiting()

    def give_back_unstarted(self) -> None:
        """Answer the batches still queued when the worker stops as taken back (nothing ran):
        the node queues their requests again, or answers them as its slice's are, rather
        than as lost in a crash."""
        with self.lock:
            unstarted = [m for m, _ in self.pending if isinstance(m, p.ExecuteBatch)]
            self.pending.clear()
        for batch in unstarted:
            self.send(p.BatchDone(batch.batch_id, batch.slice_id, [], 0.0, 0, revoked=True))

    def flush(self) -> None:
        """Send the replies the runner left while it went on to the next batch, in order."""
        while self.outbox:
            with self.link_lock:
                # popped under the link's lock: a reply the runner sends itself cannot overtake
                if not self.outbox:
                    return
                message, frames = self.outbox.popleft()
                self.socket.send_multipart([p.encode(message), *frames], copy=False)
                self._signal_waiting()

    def _signal_waiting(self) -> None:
        """Sending can take the signal that a message waits (``ZMQ_FD`` is edge-triggered)
        from the thread that waits for it: wake that thread, or the message would wait (a
        ReleaseAfter unread at its batch's end costs the next worker a trip through the node).
        The main thread while it watches the link, else the runner; not the runner for its
        own sends, as it reads the link itself before it waits (waking it, or both, after
        every reply cost a small model's requests a tenth of their throughput)."""
        if int(self.socket.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            if self.watched:
                self.wake_main.set()
            elif threading.get_ident() != self.runner_ident:
                self.wake_runner.set()

    def read(self) -> bool:
        """Take every message that has arrived: control messages take effect now, everything
        else queues for the runner. False: nothing came."""
        came = False
        with self.link_lock:  # held throughout: two readers must not reorder messages
            # ask whether a message waits rather than reading until zmq.Again: raising that
            # exception cost more than the check, once per read
            while int(self.socket.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
                came = True
                header, payload = frames[0].buffer, [f.buffer for f in frames[1:]]
                try:
                    message = p.decode(header)
                except msgspec.DecodeError as exc:
                    self.drop_unreadable(header, len(payload), exc)
                    continue
                self.take(message, payload)
        return came

    def orphaned(self) -> bool:
        if os.getppid() != self.parent_pid:
            log.warning("node process %d is gone; worker %s exits", self.parent_pid, self.worker_id)
            return True
        return False

    # ---- the main thread ------------------------------------------------------------------

    def serve(self) -> None:
        """Serve until told to shut down or until the node process disappears."""
        runner = threading.Thread(target=self.run, name=f"{self.worker_id}-runner", daemon=True)
        runner.start()
        try:
            self.send(p.WorkerReady(self.worker_id, os.getpid()))
            while not self.stopping:
                with self.lock:
                    watched = self.watched
                fds = [self.wake_main.fileno(), self.link_fd] if watched else [self.wake_main]
                came, _, _ = select.select(fds, [], [], _PARENT_POLL_MS / 1000)
                self.wake_main.clear()
                self.flush()
                if watched and self.read():
                    continue
                if not came and self.orphaned():
                    break
        finally:
            with self.lock:
                self.stopping = True
            self.wake_runner.set()
            runner.join()
            self.flush()
            self.give_back_unstarted()
        if self.failure is not None:
            raise self.failure  # a bug: end the worker as a crash, which the node restarts

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
            # an empty batch in the readable one's place, so that it keeps its turn on the device
            empty = p.ExecuteBatch(seen.batch_id, seen.slice_id or "", [], seen.wait_for or 0)
            with self.lock:
                self.unreadable[seen.batch_id] = problem
                self.pending.append((empty, []))
            self.wake_runner.set()
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
        done_already = False
        with self.lock:
            if isinstance(message, p.ReleaseAfter):
                done_already = message.batch_id in self.completed
                if not done_already:
                    self.release_after.setdefault(message.batch_id, []).append(message.path)
            elif isinstance(message, p.Go):
                _remember(self.released, message.batch_id)
            elif isinstance(message, p.Revoke):
                if message.batch_id not in self.completed:
                    _remember(self.revoked, message.batch_id)
                return  # the runner looks for it when the batch's turn comes
            elif isinstance(message, p.Shutdown):
                self.stopping = True
            else:
                self.pending.append((message, frames))
        if done_already:
            self.release(message.batch_id, [message.path])  # type: ignore[union-attr]
        elif threading.get_ident() != self.runner_ident:
            self.wake_runner.set()

    # ---- the runner thread -----------------------------------------------------------------

    def run(self) -> None:
        """Take the queued work in order, each item once it may start, until told to stop."""
        self.runner_ident = threading.get_ident()
        try:
            while True:
                with self.lock:
                    if self.stopping:
                        return
                    item = self.pending.popleft() if self.ready_next() else None
                if item is None and not self.read():
                    self.flush()  # replies the main thread has not sent yet
                    self.wake_later = False
                    with self.lock:
                        self.watched = False
                    self.wait()
                if item is None:
                    continue
                message, frames = item
                if self.wake_later and not isinstance(message, p.ExecuteBatch):
                    self.wake_later = False
                    self.wake_main.set()
                if isinstance(message, p.ExecuteBatch):
                    self.execute(message, frames)
                elif isinstance(message, p.LoadModel):
                    if self.slices:  # others serve: they go on while it loads
                        self.load_beside(message)
                    else:
                        self.load(message)
                elif isinstance(message, p.UnloadModel):
                    with self.lock:
                        if message.slice_id in self.loading:
                            self.cancelled.add(message.slice_id)
                    loaded = self.slices.pop(message.slice_id, None)
                    self.took.pop(message.slice_id, None)
                    if loaded is not None:
                        loaded.executor.close()
                        self.apply_nice()
        except Exception as exc:
            self.failure = exc
            with self.lock:
                self.stopping = True
        finally:
            self.wake_main.set()  # the runner read Shutdown, or failed: the main thread ends too

    def ready_next(self) -> bool:
        """Whether the next queued item may start now (``lock`` held)."""
        if not self.pending:
            return False
        message = self.pending[0][0]
        if not isinstance(message, p.ExecuteBatch):
            return True
        waited = message.wait_for
        return not waited or waited in self.released or waited in self.completed

    def wait(self) -> None:
        """Sleep until a message or a handoff datagram comes or the main thread has news (or
        a while has passed, to look at ``stopping`` again)."""
        fds = [self.wake_runner.fileno(), self.link_fd]
        if self.handoff is not None:
            fds.append(self.handoff.fileno())
        ready, _, _ = select.select(fds, [], [], _PARENT_POLL_MS / 1000)
        if self.wake_runner.fileno() in ready:
            self.wake_runner.clear()
        if self.handoff is None or self.handoff.fileno() not in ready:
            return
        while True:
            try:
                data = self.handoff.recv(64)
            except BlockingIOError:
                return
            if len(data) == _TOKEN.size:
                with self.lock:
                    _remember(self.released, _TOKEN.unpack(data)[0])

    def reply(self, message: p.Message, frames: Sequence[bytes] = ()) -> None:
        """Send a reply from the runner: through the main thread when it watches the link and
        the next batch may start now, else itself (the shortest way back to the node)."""
        with self.lock:
            go_on = self.watched and self.ready_next() and not self.stopping
        if go_on:
            # woken now, the main thread would take the CPU and the GIL from the runner before
            # the next batch starts: it is woken once that batch runs (``execute``)
            self.outbox.append((message, frames))
            self.wake_later = True
        elif self.outbox:
            self.outbox.append((message, frames))
            self.wake_main.set()
        else:
            self.send(message, frames)

    def watch(self) -> None:
        """Have the main thread read the link while a long batch runs."""
        with self.lock:
            if self.watched:
                return
            self.watched = True
        self.wake_main.set()

    def pass_over_revoked(self) -> None:
        """Batches of this worker that were taken back and are next in line run nothing: their
        turn is now, so hand the device on to whoever waits behind them at once, rather than
        after this batch's reply has gone out (their own empty replies follow as usual)."""
        with self.lock:
            passed = []
            for message, _ in self.pending:
                if not isinstance(message, p.ExecuteBatch) or message.batch_id not in self.revoked:
                    break
                waited = message.wait_for
                if waited and waited not in self.released and waited not in self.completed:
                    break
                _remember(self.completed, message.batch_id)
                passed.append((message.batch_id, self.release_after.pop(message.batch_id, [])))
        for batch_id, paths in passed:
            told = self.release(batch_id, paths)
            self.handed_early[batch_id] = told
            if len(told) < len(paths):
                self.handoff_failures.add(batch_id)

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

    def load_beside(self, spec: p.LoadModel) -> None:
        """Load a slice in the loader thread, in turn with other loads: a load (with its
        profiling) takes seconds, and the batches of the slices this worker serves already,
        granted the device meanwhile, would wait behind it, holding the device idle."""
        with self.lock:
            self.loading.add(spec.slice_id)
            self.to_load.append(spec)
            if self.loader is not None and self.loader.is_alive():
                return
            self.loader = threading.Thread(
                target=self._load_in_turn, name=f"{self.worker_id}-loader", daemon=True
            )
        self.loader.start()

    def _load_in_turn(self) -> None:
        try:
            while True:
                with self.lock:
                    if self.stopping or not self.to_load:
                        self.loader = None
                        return
                    spec = self.to_load.popleft()
                self.load(spec, answer=self.send)
        except Exception as exc:  # a bug: end the worker as a crash, as the runner does
            self.failure = exc
            with self.lock:
                self.stopping = True
            self.wake_main.set()

    def load(self, spec: p.LoadModel, answer: Callable[[p.Message], None] | None = None) -> None:
        """Load a slice and answer ModelLoaded or LoadFailed (``answer``: how, from a thread
        other than the runner)."""
        reply = answer or self.reply
        started = time.perf_counter()
        try:
            path = Path(spec.path)
            data = None
            if spec.sha256 is not None or spec.roots is not None:
                # checked and loaded from the same bytes: a file swapped after a check by
                # path would otherwise load unchecked
                data, digest = read_model(path, spec.sha256, spec.roots)
                if spec.format == "onnx":
                    refuse_external_data(path, data, pinned=spec.sha256 is not None)
            else:
                digest = verify_sha256(path, None)
            device = ExecutorDevice(
                kind="cuda" if spec.device_kind == "cuda" else "cpu",
                index=spec.device_index,
                threads=spec.threads,
                memory_limit=spec.memory_limit,
            )
            executor = load_executor(
                spec.format,
                path,
                device,
                declared_inputs=_meta_list(spec.declared_inputs),
                declared_outputs=_meta_list(spec.declared_outputs),
                data=data,
            )
            del data  # the executor holds what it needs
            inputs, outputs = list(executor.inputs), list(executor.outputs)
            batchable, note = decide_batching(executor, inputs, outputs, spec.batchable)
            loaded = LoadedSlice(spec, executor, inputs, outputs, batchable)
            sizes = [b for b in spec.profile_batch_sizes if b <= max(1, spec.max_batch_size)]
            profile = profile_batches(loaded, sizes or [1], spec.profile_repeats)
        except GpuvisorError as exc:
            self._loaded(spec.slice_id)
            reply(p.LoadFailed(spec.slice_id, exc.code, exc.message))
            return
        except Exception as exc:  # a broken model file can raise anything from the framework
            self._loaded(spec.slice_id)
            reply(p.LoadFailed(spec.slice_id, "model_error", f"{type(exc).__name__}: {exc}"))
            return
        if self._loaded(spec.slice_id):  # unloaded while it loaded: it never serves
            executor.close()
            reply(
                p.LoadFailed(
                    spec.slice_id, "unavailable", "the slice was unloaded while its model loaded"
                )
            )
            return
        self.slices[spec.slice_id] = loaded
        self.took[spec.slice_id] = min(profile.values(), default=0.0)
        self.apply_nice()
        reply(
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

    def _loaded(self, slice_id: str) -> bool:
        """A load of ``slice_id`` is over; whether it was unloaded meanwhile."""
        with self.lock:
            self.loading.discard(slice_id)
            cancelled = slice_id in self.cancelled
            self.cancelled.discard(slice_id)
        return cancelled

    def apply_nice(self) -> None:
        """Run at the niceness the most urgent of this worker's slices asks for (the node's own
        plus the smallest ``nice`` among them): a worker serving only batch-class slices yields
        the CPU to the node and to every other worker. Raising the priority again (a more
        urgent slice joined a shared worker) needs CAP_SYS_NICE; without it the worker keeps
        its niceness and says so."""
        slices = list(self.slices.values())  # one copy: the loader thread may add one meanwhile
        if not slices:
            return
        wanted = min(19, self.base_nice + min(s.spec.nice for s in slices))
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
        watched = self.took.get(batch.slice_id, 0.0) > _WATCH_AFTER
        with self.lock:
            read_already = self.watched  # the main thread read the link until now
        if watched:
            self.watch()
        if not read_already:
            self.read()  # a Revoke may be waiting (one sent during a load, say)
        started = time.perf_counter()
        if self.wake_later:  # the last batch's reply, for the main thread to send meanwhile
            self.wake_later = False
            self.wake_main.set()
        loaded = self.slices.get(batch.slice_id)
        results: list[p.RequestResult] = []
        out_frames: list[bytes] = []
        with self.lock:
            revoked = batch.batch_id in self.revoked
            if revoked:
                del self.revoked[batch.batch_id]
            error = self.unreadable.pop(batch.batch_id, "")
        handoff_failed = batch.batch_id in self.handoff_failures
        self.handoff_failures.discard(batch.batch_id)
        if revoked or error:
            pass  # nothing runs (taken back, or unreadable: the node fails it with ``error``)
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
        if loaded is not None and device_seconds:
            self.took[batch.slice_id] = device_seconds
        # The device is free: hand it to whoever waits behind this batch before telling the
        # node (a ReleaseAfter may have arrived while the batch ran, unread unless the main
        # thread watched; one read from now on is answered as it is read).
        if not watched:
            self.read()
        with self.lock:
            _remember(self.completed, batch.batch_id)
            paths = self.release_after.pop(batch.batch_id, [])
        told = self.release(batch.batch_id, paths) + self.handed_early.pop(batch.batch_id, [])
        handoff_failed = handoff_failed or len(told) < len(paths)
        self.pass_over_revoked()
        if self.trace is not None:
            self.trace.write(
                f"{self.worker_id} {batch.batch_id} {started:.6f} {ended:.6f} {int(revoked)}\n"
            )
        self.reply(
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


def refuse_external_data(path: Path, data: bytes | None = None, pinned: bool = True) -> None:
    """Raise IntegrityError for an ONNX model that keeps tensors in other files: a pinned
    sha256 (or a signature) covers the model's own file only, and its weights could be
    changed under it; a model confined to its tenant's folders is checked file by file as it
    is read, which its other files would not be. ``data``: the file's bytes, read already."""
    from gpuvisor.runtime.executors.onnx import external_data_files

    files = external_data_files(path, data)
    if files:
        covered = (
            "which its sha256 or signature does not cover: save the model as one file "
            "(onnx.save_model without save_as_external_data) to pin or sign it"
            if pinned
            else "which the check of the tenant's model folders does not cover: save the "
            "model as one file (onnx.save_model without save_as_external_data)"
        )
        raise IntegrityError(
            f"model file {path} keeps tensors in {len(files)} other file(s) "
            f"({', '.join(files[:3])}{', …' if len(files) > 3 else ''}), {covered}",
            path=str(path),
        )
