"""Actual state: the slices this node runs, and the supervisor that keeps each one serving."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gpuvisor.dispatch.dispatcher import DeviceDispatcher
from gpuvisor.dispatch.queues import SliceQueue
from gpuvisor.errors import ModelError, Unavailable, WorkerCrashed, is_out_of_memory
from gpuvisor.runtime import protocol as p
from gpuvisor.runtime.pool import SliceLaunch, WorkerPool
from gpuvisor.telemetry.metrics import Metrics
from gpuvisor.units import format_size

__all__ = [
    "Backoff",
    "SliceState",
    "SliceSupervisor",
    "file_stamp",
    "memory_retry_due",
    "model_file_changed",
]

log = logging.getLogger("gpuvisor.control")

#: consecutive loads that time out or whose worker dies before the model is loaded, after
#: which the slice is Failed (until its model file changes) rather than tried for ever
MAX_FAILED_LOADS = 3

#: What a model file looked like when it was read: (inode, size, mtime in ns); None: no file.
FileStamp = tuple[int, int, int] | None


def file_stamp(path: str) -> FileStamp:
    """Return the stamp of the file at ``path``, None when it does not exist (or cannot be read):
    when it changes, the file was replaced, rewritten or created."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class Backoff:
    """Delays that start at ``first`` seconds and double with each consecutive attempt, up to
    ``most`` seconds."""

    first: float
    most: float

    def delay(self, attempt: int) -> float:
        """The delay before try ``attempt + 1`` (``attempt`` 1: the first delay)."""
        return min(self.first * 2.0 ** min(max(attempt - 1, 0), 60), self.most)


@dataclass(eq=False)
class SliceState:
    """One instance of a deployment's replica: where it is placed, its state and why.

    A replica normally has one instance, whose id is the replica's (``tenant/deployment/0``).
    While a rolling update replaces it, a second one, with the new spec, loads beside it under
    ``<replica id>#2`` (or ``#3``…); the old one serves until the new one is Ready."""

    id: str
    tenant: str
    deployment: str
    replica: int
    spec_hash: str
    pool: str
    profile: str
    memory: int
    compute_share: float
    isolation: str
    latency_class: str
    model_name: str
    model_version: str
    launch: p.LoadModel | None = None
    device_id: str | None = None
    state: str = "Pending"  # Pending | Loading | Ready | Restarting | Failed | Stopping
    reason: str = ""
    worker_pid: int | None = None
    restarts: int = 0
    loaded: p.ModelLoaded | None = None
    queue: SliceQueue | None = None
    since: float = field(default_factory=time.time)
    mig_profile: str | None = None
    mig_start: int | None = None  # the MIG instance a partition-tier slice holds
    numa: str = "any"
    dedicated: bool = False  # placed through a dedicated pool: no other tenant on its device
    unplaced: dict[str, str] = field(default_factory=dict)  # device -> why not, when Pending
    anti_affinity: bool = False
    disallow_migration: bool = False
    # Failed because of its model (unloadable, refused, over its memory cap): the stamp of the
    # model file as that attempt found it. The controller loads the slice again once the file
    # changes (False: not failed for its model, nothing to watch).
    failed_on_model: bool = False
    failed_model_stamp: FileStamp = None
    # Loads that ran out of memory in a row, and (monotonic) when the controller loads the slice
    # again: memory that others held may be free by then, with no change to the slice.
    memory_failures: int = 0
    retry_at: float | None = None
    replica_id: str = ""  # the replica this is an instance of ("": the same as ``id``)
    replaces: str | None = None  # the instance this one takes over from once it is Ready
    # it took the place of an instance that served (no room beside it): until it is Ready, its
    # replica is down for the update, which then waits rather than take another one down
    took_over: bool = False
    # started at the node's start with the spec its replica served before (an update was under
    # way): it serves until its replacement is Ready, which starts once it has loaded
    restored: bool = False
    moved: str = ""  # why it left the device it was on ("moved: gpu-1 is cordoned"), if it did

    def __post_init__(self) -> None:
        if not self.replica_id:
            self.replica_id = self.id

    def set_state(self, state: str, reason: str = "") -> None:
        """Enter ``state`` (``since`` is when it was entered: a new reason alone, such as a
        rolling update's note on a Ready instance, leaves it)."""
        if state != self.state:
            self.since = time.time()
        self.state, self.reason = state, reason

    def to_dict(self) -> dict[str, Any]:
        loaded = self.loaded
        return {
            "id": self.id,
            "replica": self.replica,
            "replaces": self.replaces,
            "tenant": self.tenant,
            "deployment": self.deployment,
            "device": self.device_id,
            "state": self.state,
            "reason": self.reason,
            "pid": self.worker_pid,
            "restarts": self.restarts,
            "profile": self.profile,
            "pool": self.pool,
            "isolation": self.isolation,
            "latencyClass": self.latency_class,
            "memory": self.memory,
            "computeShare": self.compute_share,
            "migInstance": f"{self.mig_profile}@{self.mig_start}"
            if self.mig_start is not None
            else None,
            "model": f"{self.model_name}@{self.model_version}",
            "queued": len(self.queue.items) if self.queue else 0,
            "rssBytes": loaded.rss_bytes if loaded else None,
            "profileSeconds": {str(k): v for k, v in loaded.profile.items()} if loaded else {},
            "batchable": loaded.batchable if loaded else None,
            "batchingNote": loaded.batching_note if loaded else "",
            "since": self.since,
            "unplacedReasons": dict(self.unplaced),
        }


class SliceSupervisor:
    """Loads a slice, registers it with its device's dispatcher, and restarts its worker with
    exponential backoff whenever it exits, until the slice is stopped."""

    def __init__(
        self,
        slice_: SliceState,
        launch: SliceLaunch,
        pool: WorkerPool,
        dispatcher: DeviceDispatcher,
        metrics: Metrics,
        make_queue: Callable[[SliceState], SliceQueue],
        restart: Backoff = Backoff(0.5, 30.0),
        out_of_memory: Backoff = Backoff(30.0, 600.0),
        on_ready: Callable[[SliceState], None] | None = None,
        verify_model: Callable[[], str | None] | None = None,
    ) -> None:
        self.slice = slice_
        self.launch = launch
        self.pool = pool
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.make_queue = make_queue
        self.restart = restart
        self.out_of_memory = out_of_memory
        self.on_ready = on_ready
        # checks the model's signature and file before each load; returns the signed sha256
        self.verify_model = verify_model
        self.stopping = False
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"supervise-{self.slice.id}")
        self.task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """A supervisor that stopped on an error it did not expect leaves its slice Failed
        with the error, not in a state that says it is loading or serving."""
        exc = None if task.cancelled() else task.exception()
        if exc is None:
            return
        s = self.slice
        log.error(
            "supervising slice %s failed",
            s.id,
            exc_info=(type(exc), exc, exc.__traceback__),
            extra={"tenant": s.tenant},
        )
        if not self.stopping:
            s.set_state("Failed", f"internal error while supervising it: {exc!r}")

    async def stop(self, drain: float = 0.0, reason: str = "") -> None:
        """Stop serving: take no new requests, let what is queued or running finish for up
        to ``drain`` seconds, fail what is left, unload the model, end the supervisor."""
        self.stopping = True
        self.slice.set_state("Stopping", reason)
        queue = self.slice.queue
        if drain > 0 and queue is not None:
            deadline = time.monotonic() + drain
            while (queue.items or queue.in_flight) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        self.dispatcher.remove_slice(
            self.slice.id, Unavailable(f"slice {self.slice.id} is stopping")
        )
        await self.pool.unload_slice(self.slice.id)
        if self.task is not None:
            self.task.cancel()
            # an error the supervisor ended on was logged when it ended (``_ended``)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task

    async def _run(self) -> None:
        s = self.slice
        exits = 0  # consecutive worker exits and failed starts: the restart delay grows with them
        failed_loads = 0  # consecutive loads that timed out or whose worker died
        while not self.stopping:
            stamp = file_stamp(self.launch.load.path)  # before reading it: no change is missed
            if self.verify_model is not None:
                s.set_state("Loading", "checking the model file")
                try:
                    # the worker then refuses a file that changes between this check and its load
                    self.launch.load.sha256 = await asyncio.to_thread(self.verify_model)
                except ModelError as exc:
                    self._fail(exc.message, stamp)
                    log.warning(
                        "slice %s refused its model: %s",
                        s.id,
                        exc.message,
                        extra={"tenant": s.tenant},
                    )
                    return
            if self.stopping:
                return
            s.set_state("Loading", "starting worker and loading the model")
            try:
                loaded, worker = await self.pool.load_slice(self.launch)
            except ModelError as exc:
                if self.stopping:
                    return  # stopped while it loaded: nothing to fail
                out_of_memory = is_out_of_memory(exc.message.encode())
                self._fail(exc.message, stamp, out_of_memory)
                if out_of_memory:
                    self._count_allocation_failure("out_of_memory")
                log.warning(
                    "slice %s failed to load: %s", s.id, exc.message, extra={"tenant": s.tenant}
                )
                return
            except (Unavailable, OSError) as exc:
                if self.stopping:
                    return  # its worker was stopped under it: nothing to restart
                # a worker that did not start or load in time, or died first; or the node
                # could not start a process at all (no file descriptors, say)
                message = (
                    exc.message
                    if isinstance(exc, Unavailable)
                    else f"starting a worker process failed: {exc}"
                )
                s.restarts += 1
                self.metrics.worker_restarts.labels(s.tenant, s.deployment).inc()
                if isinstance(exc, Unavailable) and exc.fields.get("stage") == "load":
                    failed_loads += 1
                    if failed_loads >= MAX_FAILED_LOADS:
                        self._fail(
                            f"its model did not load {failed_loads} times in a row (last: "
                            f"{message}; a load longer than workers.startTimeout is stopped)",
                            stamp,
                        )
                        log.warning(
                            "slice %s failed: %s", s.id, s.reason, extra={"tenant": s.tenant}
                        )
                        return
                exits += 1
                delay = self.restart.delay(exits)
                s.set_state("Restarting", f"{message}; retrying in {delay:.1f}s")
                log.warning(
                    "slice %s: %s; retrying in %.1fs",
                    s.id,
                    message,
                    delay,
                    extra={"tenant": s.tenant},
                )
                await asyncio.sleep(delay)
                continue
            failed_loads = 0
            if self.stopping:
                # stopped while it loaded (a newer spec, a delete): it must not serve, nor
                # retire the instance it was to replace
                await self.pool.unload_slice(s.id)
                return
            over = self._memory_overrun(loaded)
            if over:
                self._fail(over, stamp)
                self._count_allocation_failure("over_cap")
                log.warning("slice %s failed: %s", s.id, over, extra={"tenant": s.tenant})
                await self.pool.unload_slice(s.id)
                return
            if s.loaded is not None and s.loaded.sha256 != loaded.sha256:
                # loaded again after its worker exited: no sha256 in the spec pins the file
                log.warning(
                    "slice %s: its model file %s changed since it was loaded (sha256 %s… is "
                    "now %s…); it serves the new content as version %s (give the Model a "
                    "sha256 to refuse a changed file)",
                    s.id,
                    self.launch.load.path,
                    s.loaded.sha256[:12],
                    loaded.sha256[:12],
                    s.model_version,
                    extra={"tenant": s.tenant},
                )
            s.loaded, s.worker_pid = loaded, worker.pid
            s.queue = self.make_queue(s)
            self.dispatcher.add_slice(s.queue)
            s.memory_failures, s.retry_at = 0, None
            s.set_state("Ready")
            self._observe_memory(loaded)
            log.info(
                "slice %s ready on %s (worker pid %d, load %.2fs)",
                s.id,
                s.device_id,
                worker.pid,
                loaded.load_seconds,
                extra={"tenant": s.tenant},
            )
            if loaded.batching_note:
                log.warning("slice %s: %s", s.id, loaded.batching_note, extra={"tenant": s.tenant})
            if self.on_ready is not None:
                self.on_ready(s)
            started = time.monotonic()
            code = await asyncio.shield(worker.exited)
            if time.monotonic() - started > 30.0:
                exits = 0  # it ran stably: start the backoff over
            exits += 1
            delay = self.restart.delay(exits)
            self.dispatcher.remove_slice(
                s.id,
                WorkerCrashed(
                    f"the worker of {s.deployment} exited (code {code}); it is being restarted",
                    retry_after=max(1.0, delay),
                ),
            )
            s.worker_pid = None
            if self.stopping:
                return
            s.restarts += 1
            self.metrics.worker_restarts.labels(s.tenant, s.deployment).inc()
            s.set_state("Restarting", f"worker exited with code {code}; restarting in {delay:.1f}s")
            log.warning(
                "worker of slice %s exited with code %s; restarting in %.1fs",
                s.id,
                code,
                delay,
                extra={"tenant": s.tenant},
            )
            await asyncio.sleep(delay)

    def _fail(self, message: str, stamp: FileStamp, out_of_memory: bool = False) -> None:
        """The slice cannot serve its model as it is: Failed until the model file changes (the
        controller then loads it again), the deployment changes, or it is loaded by hand. A
        load that ran out of memory is also tried again later, with a growing delay."""
        s = self.slice
        s.failed_on_model, s.failed_model_stamp = True, stamp
        if not out_of_memory:
            s.set_state("Failed", f"{message} (loaded again when the model file changes)")
            return
        s.memory_failures += 1
        delay = self.out_of_memory.delay(s.memory_failures)
        s.retry_at = time.monotonic() + delay
        times = "once" if s.memory_failures == 1 else f"{s.memory_failures} times in a row"
        s.set_state(
            "Failed",
            f"{message} (ran out of memory {times}; loaded again {delay:g}s after this "
            "failure, or when the model file changes)",
        )

    def _memory_overrun(self, loaded: p.ModelLoaded) -> str | None:
        s = self.slice
        if s.isolation != "process" or self.launch.load.device_kind != "cpu":
            return None
        if loaded.rss_bytes > s.memory:
            return (
                f"worker uses {format_size(loaded.rss_bytes)} after loading the model, over the "
                f"{format_size(s.memory)} memory cap of profile '{s.profile}'; use a larger profile"
            )
        return None

    def _count_allocation_failure(self, reason: str) -> None:
        s = self.slice
        self.metrics.allocation_failures.labels(
            s.device_id or "", s.tenant, s.deployment, reason
        ).inc()

    def _observe_memory(self, loaded: p.ModelLoaded) -> None:
        s = self.slice
        labels = (s.device_id or "", s.tenant, s.deployment, s.id)
        self.metrics.slice_memory_limit.labels(*labels).set(s.memory)
        self.metrics.slice_memory_used.labels(*labels).set(loaded.rss_bytes)


def model_file_changed(state: SliceState, supervisor: SliceSupervisor | None) -> bool:
    """Whether a slice that Failed for its model should be loaded again: its model file was
    replaced, rewritten or created since the attempt that failed. ``supervisor``: the
    slice's, if it still has one."""
    if state.state != "Failed" or not state.failed_on_model or state.launch is None:
        return False
    if supervisor is not None and supervisor.task is not None and not supervisor.task.done():
        return False  # still giving back what it held
    if file_stamp(state.launch.path) == state.failed_model_stamp:
        return False
    log.info(
        "slice %s: its model file %s changed; loading it again",
        state.id,
        state.launch.path,
        extra={"tenant": state.tenant},
    )
    return True


def memory_retry_due(state: SliceState, supervisor: SliceSupervisor | None) -> bool:
    """Whether a slice whose model ran out of memory while loading is due to be loaded
    again (others may have given memory back since). ``supervisor``: the slice's, if it
    still has one."""
    if state.state != "Failed" or state.retry_at is None or time.monotonic() < state.retry_at:
        return False
    if supervisor is not None and supervisor.task is not None and not supervisor.task.done():
        return False
    log.info(
        "slice %s: loading it again after running out of memory (%d time(s) in a row)",
        state.id,
        state.memory_failures,
        extra={"tenant": state.tenant},
    )
    return True
