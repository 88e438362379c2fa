"""Worker processes: spawning, the slices and batches they run, and their lifetimes.

Process spawning lives here and nowhere else. The pool binds one ROUTER socket (the link,
``runtime/link.py``); a worker is one OS process per ``process``-isolation slice, or one per
(tenant, device) for ``shared`` slices: never one process for two tenants.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpuvisor.dispatch.dispatcher import BatchCallback
from gpuvisor.dispatch.queues import Outcome, PendingRequest
from gpuvisor.errors import (
    GpuvisorError,
    ModelError,
    Unavailable,
    WorkerCrashed,
    error_from_code,
)
from gpuvisor.logs import worker_log_environment
from gpuvisor.runtime import protocol as p
from gpuvisor.runtime.link import WorkerLink, WorkerProcess

__all__ = ["SliceLaunch", "WorkerPool"]

log = logging.getLogger("gpuvisor.runtime")

_RUNTIME_PREFIX = "gpuvisor-"


def sweep_stale_runtime_dirs() -> None:
    """Remove the runtime folders (sockets) of this user's nodes that died without removing
    their own (SIGKILL): ``gpuvisor-<pid>-*`` whose process is gone. A folder whose pid is
    alive, or whose name has no pid, is left alone."""
    uid = os.getuid()
    for path in Path(tempfile.gettempdir()).glob(f"{_RUNTIME_PREFIX}*-*"):
        pid = path.name[len(_RUNTIME_PREFIX) :].split("-", 1)[0]
        try:
            if not pid.isdigit() or path.lstat().st_uid != uid or not path.is_dir():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue  # alive under another user, or gone between two looks


@dataclass(frozen=True)
class SliceLaunch:
    """Everything the pool needs to start a slice: where its worker lives and what to load."""

    slice_id: str
    tenant: str
    device_id: str
    isolation: str  # shared | process | partition | exclusive
    load: p.LoadModel
    gpu_uuid: str | None = None  # the GPU the worker is pinned to (it sees no other)

    @property
    def worker_key(self) -> str:
        if self.isolation == "shared":
            return f"shared:{self.tenant}:{self.device_id}"
        return f"slice:{self.slice_id}"


class WorkerPool(WorkerLink):
    """Starts workers, loads slices into them, runs batches on them, and notices when they die."""

    def __init__(self, start_timeout: float = 120.0, runtime_dir: Path | None = None) -> None:
        self.start_timeout = start_timeout
        self.python = sys.executable  # the interpreter workers run on
        # ipc:// paths must stay short (about 100 bytes), so they live in a fresh temp dir,
        # named after this process so that a node killed before it could remove its own is
        # swept up by the next one
        self._own_dir = runtime_dir is None
        if runtime_dir is None:
            sweep_stale_runtime_dirs()
            runtime_dir = Path(tempfile.mkdtemp(prefix=f"{_RUNTIME_PREFIX}{os.getpid()}-"))
        self.runtime_dir = runtime_dir
        super().__init__(self.runtime_dir)
        self.by_key: dict[str, WorkerProcess] = {}
        self._spawning: dict[str, asyncio.Future[WorkerProcess]] = {}  # key -> its start
        self._wanted: dict[str, int] = {}  # key -> loads waiting for its worker to start
        self.slice_worker: dict[str, WorkerProcess] = {}
        self._ids = itertools.count(1)
        self._batch_ids = itertools.count(1)
        self._batch_worker: dict[int, WorkerProcess] = {}  # outstanding batch id -> its worker
        self._waiters: dict[int, list[WorkerProcess]] = {}  # batch id -> workers waiting for it
        self._watchers: set[asyncio.Task[None]] = set()

    # ---- lifecycle ----------------------------------------------------------------------

    async def close(self) -> None:
        """Stop every worker (Shutdown, then SIGTERM, then SIGKILL) and the socket."""
        await asyncio.gather(*(self._stop_worker(w) for w in list(self.workers.values())))
        if self._loop is not None:
            self._loop.remove_reader(self.socket.fileno())
            self._loop = None
        self.socket.close(0)
        self.context.term()
        if self._own_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    # ---- slices -------------------------------------------------------------------------

    async def load_slice(self, launch: SliceLaunch) -> tuple[p.ModelLoaded, WorkerProcess]:
        """Start (or reuse) the slice's worker, load its model, and return what was loaded.

        Raises ModelError when the model cannot be loaded or verified, Unavailable when
        the worker does not start in time or dies while loading.
        """
        key = launch.worker_key
        self._wanted[key] = self._wanted.get(key, 0) + 1
        try:
            worker = await self._worker_for(launch)
        except asyncio.CancelledError:
            # the load was given up (its slice stopped) while its worker started: a worker
            # nobody else waits for would run on with no slice, so it is stopped once started
            self._give_up(key)
            raise
        finally:
            self._wanted[key] -= 1
            if not self._wanted[key]:
                del self._wanted[key]
        loaded: asyncio.Future[p.ModelLoaded] = asyncio.get_running_loop().create_future()
        worker.loads[launch.slice_id] = loaded
        worker.slices.add(launch.slice_id)
        self.slice_worker[launch.slice_id] = worker
        await self._send(worker, launch.load)
        try:
            result = await asyncio.wait_for(asyncio.shield(loaded), self.start_timeout)
        except TimeoutError:
            # the worker is busy in the model (it cannot read a Shutdown): stop it promptly
            await self.unload_slice(launch.slice_id, grace=0.25)
            raise Unavailable(
                f"worker {worker.worker_id} did not load the model within "
                f"{self.start_timeout:.0f}s (workers.startTimeout)",
                stage="load",
            ) from None
        except ModelError:
            await self.unload_slice(launch.slice_id)
            raise
        finally:
            worker.loads.pop(launch.slice_id, None)
        return result, worker

    async def unload_slice(self, slice_id: str, grace: float = 5.0) -> None:
        """Unload a slice; its worker stops when no slice is left in it (given ``grace``
        seconds after a Shutdown, and again after a SIGTERM, before it is killed)."""
        worker = self.slice_worker.pop(slice_id, None)
        if worker is None:
            return
        worker.slices.discard(slice_id)
        if worker.slices:
            with contextlib.suppress(Unavailable):
                await self._send(worker, p.UnloadModel(slice_id))
        else:
            await self._stop_worker(worker, grace)

    def start_batch(
        self,
        slice_id: str,
        batch: Sequence[PendingRequest],
        done: BatchCallback,
        after: int | None = None,
    ) -> int:
        """Send a batch to the slice's worker and return its id; ``done`` gets its outcomes (the
        dispatcher's runner). With ``after`` (the id of a batch still running on the same
        device), the batch starts only once that one is done: at once behind it on the same
        worker, or, on another worker, when that worker hands the device over.

        Raises WorkerCrashed when the slice's worker is not running, Unavailable when it
        cannot be reached; once sent, a crash of the worker reaches ``done`` instead.
        """
        worker = self.slice_worker.get(slice_id)
        if worker is None or worker.exited.done():
            raise WorkerCrashed(
                f"the worker of slice {slice_id} is not running; it is being restarted",
                retry_after=1.0,
            )
        batch_id = next(self._batch_ids)

        def finished(message: p.BatchDone | GpuvisorError, frames: list[bytes]) -> None:
            if isinstance(message, GpuvisorError):
                done(message, 0.0)
                return
            if message.revoked:
                done(None, 0.0)
                return
            if message.error:  # the worker could not read the batch (a version mismatch?)
                error = f"worker {worker.worker_id} could not read this batch: {message.error}"
                done(GpuvisorError(error), 0.0)
                return
            outcomes = [
                Outcome(res.status, frame, res.header_length)
                for res, frame in zip(message.results, frames)
            ]
            for request, res in zip(batch, message.results):
                request.rows = max(request.rows, res.rows)
            done(outcomes, message.device_seconds)

        wait_for = self._wait_behind(after, worker) if after is not None else 0
        self._send_now(
            worker,
            p.ExecuteBatch(
                batch_id,
                slice_id,
                [p.RequestHeader(r.request_id, r.header_length) for r in batch],
                wait_for,
            ),
            [r.body for r in batch],
        )
        worker.batches[batch_id] = finished
        self._batch_worker[batch_id] = worker
        return batch_id

    def revoke(self, handle: int) -> None:
        """Take back batch ``handle`` unless it has started: its ``done`` then gets None (it
        never ran), or, if it had started, its outcomes as usual."""
        worker = self._batch_worker.get(handle)
        if worker is not None and not worker.exited.done():
            with contextlib.suppress(Unavailable):
                self._send_now(worker, p.Revoke(handle))

    def abort(self, handle: int, reason: str) -> None:
        """Kill the worker running batch ``handle`` (it hangs): what it has outstanding fails
        with 503 and ``reason``, and its slices' supervisors restart it."""
        worker = self._batch_worker.get(handle)
        if worker is None or worker.exited.done():
            return
        worker.stopped_because = reason
        log.warning(
            "stopping worker %s (pid %d) of %s: %s",
            worker.worker_id,
            worker.pid,
            ", ".join(sorted(worker.slices)),
            reason,
        )
        with contextlib.suppress(ProcessLookupError):
            worker.process.send_signal(signal.SIGKILL)

    def _wait_behind(self, after: int, worker: WorkerProcess) -> int:
        """Arrange for ``worker``'s next batch to start when batch ``after`` is done; return
        the ExecuteBatch ``wait_for`` (0 when there is nothing to wait for across workers)."""
        earlier = self._batch_worker.get(after)
        if earlier is None or earlier is worker or earlier.exited.done():
            return 0  # done already, or queued ahead on the same worker
        try:
            self._send_now(earlier, p.ReleaseAfter(after, worker.handoff_path))
        except Unavailable:
            return 0
        self._waiters.setdefault(after, []).append(worker)
        return after

    def _release_waiters(
        self, batch_id: int, failed: bool, handed_to: frozenset[str] = frozenset()
    ) -> None:
        """Batch ``batch_id`` is over: release from here the workers waiting behind it that
        its worker did not tell (``handed_to``): all of them when it could not (a failed
        datagram, a crash), and any whose ReleaseAfter reached it only after the batch was
        done. That worker would tell them as it reads the ReleaseAfter, but it may never
        read it (it can be killed first), and the device is free now either way."""
        waiters = self._waiters.pop(batch_id, ())
        for waiter in waiters:
            if (failed or waiter.handoff_path not in handed_to) and not waiter.exited.done():
                with contextlib.suppress(Unavailable):
                    self._send_now(waiter, p.Go(batch_id))

    async def run_batch(
        self, slice_id: str, batch: Sequence[PendingRequest]
    ) -> tuple[list[Outcome], float]:
        """Run one batch and wait for it: ``start_batch`` for callers outside a dispatcher."""
        result: asyncio.Future[tuple[list[Outcome], float]] = (
            asyncio.get_running_loop().create_future()
        )

        def done(outcome: Sequence[Outcome] | GpuvisorError | None, seconds: float) -> None:
            if result.done():
                return
            if outcome is None:  # not reached: only a batch sent ``after`` another is revoked
                result.set_exception(Unavailable("the batch was taken back before it ran"))
            elif isinstance(outcome, GpuvisorError):
                result.set_exception(outcome)
            else:
                result.set_result((list(outcome), seconds))

        self.start_batch(slice_id, batch, done)
        return await result

    def worker_of(self, slice_id: str) -> WorkerProcess | None:
        return self.slice_worker.get(slice_id)

    # ---- processes ----------------------------------------------------------------------

    async def _worker_for(self, launch: SliceLaunch) -> WorkerProcess:
        """The running worker for the launch's key, started once however many of its slices
        load at the same time (a tenant's shared slices share one process)."""
        key = launch.worker_key
        spawning = self._spawning.get(key)
        if spawning is None:
            worker = self.by_key.get(key)
            if worker is not None and not worker.exited.done():
                return worker
            spawning = asyncio.ensure_future(
                self._spawn(key, launch.tenant, launch.load.threads, launch.gpu_uuid)
            )
            self._spawning[key] = spawning
            spawning.add_done_callback(functools.partial(self._spawned, key))
        return await asyncio.shield(spawning)

    def _give_up(self, key: str) -> None:
        """A load waiting for worker ``key`` to start was cancelled: once the worker has
        started, stop it unless another load waits for it or it holds a slice."""

        def stop_if_unused(_: object = None) -> None:
            worker = self.by_key.get(key)
            if worker is None or worker.slices or worker.loads or self._wanted.get(key):
                return
            task = asyncio.get_running_loop().create_task(self._stop_worker(worker, 0.25))
            self._watchers.add(task)
            task.add_done_callback(self._watchers.discard)

        spawning = self._spawning.get(key)
        if spawning is not None and not spawning.done():
            spawning.add_done_callback(stop_if_unused)
        else:
            asyncio.get_running_loop().call_soon(stop_if_unused)

    def _spawned(self, key: str, spawning: asyncio.Future[WorkerProcess]) -> None:
        if self._spawning.get(key) is spawning:
            del self._spawning[key]
        if not spawning.cancelled():
            spawning.exception()  # its loads see it; retrieved here when none is left waiting

    async def _spawn(
        self, key: str, tenant: str, threads: int | None, gpu_uuid: str | None = None
    ) -> WorkerProcess:
        worker_id = f"w{next(self._ids)}-{os.getpid()}"
        env = {**os.environ, **worker_log_environment()}  # logs as the node does
        if gpu_uuid:
            # A worker serves one device: pinned by UUID, it sees that GPU alone, as cuda:0.
            # NVML's index (the node's) is CUDA's only under PCI bus order and with no
            # CUDA_VISIBLE_DEVICES of the node's own in the way.
            env["CUDA_VISIBLE_DEVICES"] = gpu_uuid
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        handoff_path = str(self.runtime_dir / f"{worker_id}.go")
        if threads:
            # Keep math libraries inside the worker's thread budget.
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                env[var] = str(threads)
        process = await asyncio.create_subprocess_exec(
            self.python,
            "-m",
            "gpuvisor.runtime.worker",
            "--endpoint",
            self.endpoint,
            "--worker-id",
            worker_id,
            "--handoff",
            handoff_path,
            stdin=asyncio.subprocess.DEVNULL,
            env=env,
        )
        loop = asyncio.get_running_loop()
        worker = WorkerProcess(
            worker_id,
            key,
            tenant,
            process,
            loop.create_future(),
            loop.create_future(),
            handoff_path=handoff_path,
        )
        self.workers[worker_id] = worker
        self.by_key[key] = worker
        early = self._early_ready.pop(worker_id, None)
        if early is not None:
            worker.ready.set_result(early)
        watcher = asyncio.create_task(self._watch(worker), name=f"watch-{worker_id}")
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        log.info("started worker %s (pid %d) for %s", worker_id, process.pid, key)
        try:
            await asyncio.wait_for(asyncio.shield(worker.ready), self.start_timeout)
        except TimeoutError:
            await self._stop_worker(worker)
            raise Unavailable(
                f"worker {worker_id} did not start within {self.start_timeout:.0f}s"
            ) from None
        except Unavailable:
            raise
        return worker

    async def _watch(self, worker: WorkerProcess) -> None:
        returncode = await worker.process.wait()
        # a worker serves one tenant (never two): the first part of any of its slices' ids
        tenant = next((sid.split("/", 1)[0] for sid in worker.slices), "")
        self.workers.pop(worker.worker_id, None)
        if self.by_key.get(worker.key) is worker:
            del self.by_key[worker.key]
        for slice_id in list(worker.slices):
            if self.slice_worker.get(slice_id) is worker:
                del self.slice_worker[slice_id]
        if worker.stopped_because:
            what = (
                f"{worker.stopped_because}: worker {worker.worker_id} (pid {worker.pid}) "
                "was stopped"
            )
        else:
            what = f"worker {worker.worker_id} (pid {worker.pid}) exited with code {returncode}"
        crash = WorkerCrashed(
            f"{what} while serving this request; it is being restarted", retry_after=1.0
        )
        crash_loading = WorkerCrashed(f"{what} while loading the model", stage="load")
        crash_starting = WorkerCrashed(f"{what} while starting")
        batches = list(worker.batches.values())
        for batch_id in worker.batches:
            self._batch_worker.pop(batch_id, None)
            self._release_waiters(batch_id, failed=True)
        worker.batches.clear()
        for finished in batches:
            try:
                finished(crash, [])
            except Exception:
                log.exception("failing a batch of crashed worker %s failed", worker.worker_id)
        pending: list[tuple[asyncio.Future[Any], WorkerCrashed]] = [
            *((load, crash_loading) for load in worker.loads.values()),
            (worker.ready, crash_starting),
        ]
        for future, error in pending:
            if not future.done():
                future.set_exception(error)
                future.exception()  # mark retrieved: nobody may be waiting any more
        if not worker.exited.done():
            worker.exited.set_result(returncode)
        # a worker that was killed could not remove its handoff socket's file itself
        with contextlib.suppress(OSError):
            os.unlink(worker.handoff_path)
        level = logging.INFO if returncode in (0, -signal.SIGTERM) else logging.WARNING
        log.log(
            level,
            "worker %s (pid %d) exited with code %s",
            worker.worker_id,
            worker.pid,
            returncode,
            extra={"tenant": tenant} if tenant else None,
        )

    async def _stop_worker(self, worker: WorkerProcess, grace: float = 5.0) -> None:
        if worker.exited.done():
            return
        with contextlib.suppress(Unavailable):
            await self._send(worker, p.Shutdown())
        try:
            await asyncio.wait_for(asyncio.shield(worker.exited), grace)
            return
        except TimeoutError:
            pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(sig)
            try:
                await asyncio.wait_for(asyncio.shield(worker.exited), grace)
                return
            except TimeoutError:
                continue

    # ---- what the workers send ----------------------------------------------------------

    def _handle(self, worker: WorkerProcess, message: p.Message, payload: list[bytes]) -> None:
        if isinstance(message, p.BatchDone):
            finished = worker.batches.pop(message.batch_id, None)
            self._batch_worker.pop(message.batch_id, None)
            self._release_waiters(
                message.batch_id, message.handoff_failed, frozenset(message.handed_to)
            )
            if finished is not None:
                finished(message, payload)
        elif isinstance(message, p.ModelLoaded):
            loaded = worker.loads.get(message.slice_id)
            if loaded is not None and not loaded.done():
                loaded.set_result(message)
        elif isinstance(message, p.LoadFailed):
            failed = worker.loads.get(message.slice_id)
            if failed is not None and not failed.done():
                error = error_from_code(message.code, message.message)
                failed.set_exception(
                    error if isinstance(error, ModelError) else ModelError(message.message)
                )
        elif isinstance(message, p.WorkerReady) and not worker.ready.done():
            worker.ready.set_result(message)
