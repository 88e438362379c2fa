"""The node's end of the ZeroMQ link to its workers: the ROUTER socket, sending, reading replies."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from gpuvisor.errors import GpuvisorError, Unavailable
from gpuvisor.runtime import protocol as p

__all__ = ["ReplyHandler", "WorkerLink", "WorkerProcess"]

log = logging.getLogger("gpuvisor.runtime")


# What a batch's reply (or the crash of its worker) is handed to.
ReplyHandler = Callable[["p.BatchDone | GpuvisorError", list[bytes]], None]


@dataclass(eq=False)
class WorkerProcess:
    """One running worker process and what is outstanding on it."""

    worker_id: str
    key: str
    tenant: str
    process: asyncio.subprocess.Process
    ready: asyncio.Future[p.WorkerReady]
    exited: asyncio.Future[int]
    handoff_path: str = ""  # the worker's handoff (Unix datagram) socket
    slices: set[str] = field(default_factory=set)
    loads: dict[str, asyncio.Future[p.ModelLoaded]] = field(default_factory=dict)
    batches: dict[int, ReplyHandler] = field(default_factory=dict)
    stopped_because: str = ""  # why the node killed it (a hung batch), for its requests' error

    @property
    def pid(self) -> int:
        return self.process.pid


class WorkerLink:
    """The ROUTER socket the workers connect to: sends go out at once, and what the workers
    send is read in the event loop's reader callback and handed to ``_handle`` (the pool's)."""

    def __init__(self, runtime_dir: Path) -> None:
        self.endpoint = f"ipc://{runtime_dir}/node.sock"
        # A plain (not asyncio) socket driven by loop.add_reader: replies are handled in the
        # reader callback itself, and sends go out synchronously, with no task or future between
        # the dispatcher and the worker (each of those costs a loop iteration under load).
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.bind(self.endpoint)
        self.workers: dict[str, WorkerProcess] = {}  # by worker id
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_scheduled = False
        self._early_ready: dict[str, p.WorkerReady] = {}  # from workers not registered yet

    def start(self) -> None:
        """Start receiving worker messages on the running event loop."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self.socket.fileno(), self._drain)
            self._schedule_drain()

    async def _send(
        self, worker: WorkerProcess, message: p.Message, frames: Sequence[bytes] = ()
    ) -> None:
        self._send_now(worker, message, frames)

    def _send_now(
        self, worker: WorkerProcess, message: p.Message, frames: Sequence[bytes] = ()
    ) -> None:
        """Send without waiting; raise Unavailable when the worker cannot take the message now.

        A worker executes one batch at a time and the dispatcher bounds what is outstanding,
        so its pipe (1,000 messages) never fills in normal operation.
        """
        try:
            self.socket.send_multipart(
                [worker.worker_id.encode(), p.encode(message), *frames],
                flags=zmq.NOBLOCK,
                copy=False,
            )
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:  # its connection is gone: it exited or is exiting
                why = "its connection is gone (the worker has exited or is exiting)"
            elif exc.errno == zmq.EAGAIN:
                why = "its queue of messages is full"
            else:
                why = str(exc)
            raise Unavailable(
                f"worker {worker.worker_id} is not reachable: {why}", retry_after=1.0
            ) from exc
        # Sending can consume the edge-triggered readiness of the socket's file descriptor
        # while a reply is already waiting: look again once the loop is free.
        self._schedule_drain()

    def _schedule_drain(self) -> None:
        if self._loop is not None and not self._drain_scheduled:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        """Handle every message waiting on the socket (the reader callback)."""
        self._drain_scheduled = False
        socket = self.socket
        while int(socket.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            # Copied frames: replies are small, and zero-copy Frame objects cost more to make
            # than the copy they save.
            frames = socket.recv_multipart(zmq.NOBLOCK)
            if len(frames) < 2:
                continue
            worker_id = frames[0].decode()
            worker = self.workers.get(worker_id)
            try:
                message = p.decode(frames[1])
            except Exception:
                log.warning("worker %s sent an undecodable message", worker_id)
                continue
            if worker is None:
                if isinstance(message, p.WorkerReady):
                    # it was quicker than the spawning coroutine: kept until it is registered
                    self._early_ready[worker_id] = message
                continue
            try:
                self._handle(worker, message, frames[2:])
            except Exception:  # one bad message must not stop the node hearing its workers
                log.exception("handling a message from worker %s failed", worker.worker_id)

    def _handle(self, worker: WorkerProcess, message: p.Message, payload: list[bytes]) -> None:
        """Act on one message from ``worker``: ``WorkerPool._handle``."""
        raise NotImplementedError
