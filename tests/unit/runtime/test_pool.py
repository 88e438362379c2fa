"""Real worker processes: load, run, refuse a tampered model, notice a crash."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
from pathlib import Path

import msgspec
import onnx
import orjson
import psutil
import pytest

from gpuvisor.demo.models import build_demo_models
from gpuvisor.dispatch.dispatcher import BatchCallback
from gpuvisor.dispatch.queues import PendingRequest
from gpuvisor.errors import GpuvisorError, IntegrityError, WorkerCrashed
from gpuvisor.runtime import protocol as p
from gpuvisor.runtime.pool import SliceLaunch, WorkerPool

BODY = orjson.dumps(
    {"inputs": [{"name": "features", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16}]}
)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(build_demo_models(tmp_path_factory.mktemp("models"))["basket-scorer"])


def _launch(
    slice_id: str,
    path: Path,
    tenant: str = "t",
    isolation: str = "process",
    sha256: str | None = None,
    nice: int = 0,
    gpu_uuid: str | None = None,
) -> SliceLaunch:
    load = p.LoadModel(
        slice_id,
        "scorer",
        "1",
        "onnx",
        str(path),
        sha256,
        "cpu",
        0,
        1,
        None,
        4,
        profile_batch_sizes=[1, 2, 4],
        nice=nice,
    )
    return SliceLaunch(slice_id, tenant, "cpu-0", isolation, load, gpu_uuid)


def _request(i: int) -> PendingRequest:
    return PendingRequest(
        request_id=i, tenant="t", body=BODY, header_length=-1, arrival=time.monotonic()
    )


def test_load_run_and_isolation(model: Path) -> None:
    async def scenario() -> None:
        pool = WorkerPool(start_timeout=60)
        pool.start()
        try:
            digest = hashlib.sha256(model.read_bytes()).hexdigest()
            loaded, worker = await pool.load_slice(_launch("a/x/0", model, "a", sha256=digest))
            assert loaded.sha256 == digest and loaded.batchable
            assert sorted(loaded.profile) == [1, 2, 4]
            assert [t.name for t in loaded.inputs] == ["features"]
            # Two process slices of one tenant: two processes. Shared slices of one tenant: one process.
            _, second = await pool.load_slice(_launch("a/y/0", model, "a"))
            assert second.pid != worker.pid != os.getpid()
            _, shared1 = await pool.load_slice(_launch("a/s1/0", model, "a", "shared"))
            _, shared2 = await pool.load_slice(_launch("a/s2/0", model, "a", "shared"))
            _, other_tenant = await pool.load_slice(_launch("b/s1/0", model, "b", "shared"))
            assert shared1.pid == shared2.pid
            assert other_tenant.pid != shared1.pid, "never one process for two tenants"
            outcomes, seconds = await pool.run_batch("a/x/0", [_request(1), _request(2)])
            assert [o.status for o in outcomes] == [200, 200] and seconds > 0
            assert orjson.loads(outcomes[0].body)["outputs"][0]["shape"] == [1, 1]
            outcomes, _ = await pool.run_batch("a/s2/0", [_request(3)])
            assert outcomes[0].status == 200
        finally:
            await pool.close()

    asyncio.run(scenario())


def test_shared_slices_that_load_together_share_one_worker(model: Path) -> None:
    """A tenant's shared slices loading at the same time (after an apply, or a restart of
    their worker) start one process, not one each."""

    async def scenario() -> None:
        pool = WorkerPool(start_timeout=60)
        pool.start()
        try:
            results = await asyncio.gather(
                *(pool.load_slice(_launch(f"a/s{i}/0", model, "a", "shared")) for i in range(3))
            )
            assert len({worker.pid for _, worker in results}) == 1
            assert len(pool.workers) == 1
        finally:
            await pool.close()

    asyncio.run(scenario())


def test_tampered_model_is_refused(model: Path) -> None:
    async def scenario() -> None:
        pool = WorkerPool(start_timeout=60)
        pool.start()
        try:
            with pytest.raises(IntegrityError) as refused:
                await pool.load_slice(_launch("a/x/0", model, sha256="0" * 64))
            assert "0" * 64 in refused.value.message
            assert not pool.workers, "the worker of a refused slice is stopped"
        finally:
            await pool.close()

    asyncio.run(scenario())


def test_a_pinned_model_whose_weights_are_in_another_file_is_refused(
    model: Path, tmp_path: Path
) -> None:
    """A sha256 (or a signature) covers the model's own file: weights kept beside it could be
    changed under it, so such a model cannot be pinned. Unpinned, it loads."""
    split = tmp_path / "split.onnx"
    onnx.save_model(
        onnx.load(str(model)),
        str(split),
        save_as_external_data=True,
        location="split.weights",
        size_threshold=0,
    )
    assert (tmp_path / "split.weights").exists()
    digest = hashlib.sha256(split.read_bytes()).hexdigest()

    async def scenario() -> None:
        pool = WorkerPool(start_timeout=60)
        pool.start()
        try:
            with pytest.raises(IntegrityError) as refused:
                await pool.load_slice(_launch("a/x/0", split, sha256=digest))
            assert "keeps tensors in 1 other file(s) (split.weights)" in refused.value.message
            assert "save the model as one file" in refused.value.message
            loaded, _ = await pool.load_slice(_launch("a/y/0", split))
            assert [t.name for t in loaded.inputs] == ["features"]
        finally:
            await pool.close()

    asyncio.run(scenario())


def test_crash_fails_in_flight_batches_and_resolves_exited(model: Path) -> None:
    async def scenario() -> None:
        pool = WorkerPool(start_timeout=60)
        pool.start()
        try:
            _, worker = await pool.load_slice(_launch("a/x/0", model))
            assert os.path.exists(worker.handoff_path)
            os.kill(worker.pid, signal.SIGKILL)
            code = await asyncio.wait_for(worker.exited, 10)
            assert code == -signal.SIGKILL
            assert not os.path.exists(worker.handoff_path)  # killed, it could not remove it
            with pytest.raises(WorkerCrashed):
                await pool.run_batch("a/x/0", [_request(1)])
        finally:
            await pool.close()

    asyncio.run(scenario())


def test_the_node_releases_a_batch_whose_release_came_after_the_one_before_it_was_done(
    model: Path,
) -> None:
    """A batch waits behind another worker's batch, which was done before its worker got the
    ReleaseAfter, and that worker never reads it (stopped here; killed, in life): the node
    releases the waiting batch itself when the earlier batch's reply comes."""

    async def scenario() -> None:
        pool = WorkerPool(start_timeout=60)
        pool.start()
        try:
            _, first = await pool.load_slice(_launch("a/x/0", model, "a"))
            await pool.load_slice(_launch("b/y/0", model, "b"))
            loop = asyncio.get_running_loop()
            replies: list[asyncio.Future[object]] = [loop.create_future() for _ in range(2)]

            def to(reply: asyncio.Future[object]) -> BatchCallback:
                return lambda outcome, _: reply.set_result(outcome)

            earlier = pool.start_batch("a/x/0", [_request(1)], to(replies[0]))
            time.sleep(0.5)  # the loop reads no reply meanwhile; the worker runs it and answers
            os.kill(first.pid, signal.SIGSTOP)  # it will read nothing more
            try:
                pool.start_batch("b/y/0", [_request(2)], to(replies[1]), after=earlier)
                behind = await asyncio.wait_for(replies[1], 10)
                assert [o.status for o in behind] == [200]  # type: ignore[attr-defined]
                assert [o.status for o in await replies[0]] == [200]  # type: ignore[attr-defined]
            finally:
                os.kill(first.pid, signal.SIGCONT)
        finally:
            await pool.close()

    asyncio.run(scenario())


def test_a_worker_ready_before_it_is_registered_is_not_lost(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's WorkerReady can reach the node while the coroutine that spawned it has not
    registered it yet; the pool keeps it until then instead of dropping it (which left the
    slice waiting for the whole start timeout)."""
    from gpuvisor.runtime import pool as pool_module

    spawn = asyncio.create_subprocess_exec
    pool = WorkerPool(start_timeout=10)

    async def slow_to_return(*args: str, **kwargs: object) -> asyncio.subprocess.Process:
        process = await spawn(*args, **kwargs)  # type: ignore[arg-type]
        worker_id = args[args.index("--worker-id") + 1]
        for _ in range(1000):  # return only once the worker's WorkerReady has been read
            await asyncio.sleep(0.01)
            if worker_id in pool._early_ready:
                break
        return process

    monkeypatch.setattr(pool_module.asyncio, "create_subprocess_exec", slow_to_return)

    async def scenario() -> None:
        pool.start()
        try:
            started = time.monotonic()
            _, worker = await pool.load_slice(_launch("a/x/0", model, "a"))
            assert time.monotonic() - started < 8, "it waited for the start timeout"
            assert (await worker.ready).pid == worker.pid
            assert pool._early_ready == {}
            outcomes, _ = await pool.run_batch("a/x/0", [_request(1)])
            assert [o.status for o in outcomes] == [200]
        finally:
            await pool.close()

    asyncio.run(scenario())


def test_a_batch_its_worker_cannot_read_fails_and_the_worker_serves_on(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node of another version (here: request headers as maps) sends a batch the worker
    cannot decode: that batch fails with an error, at once rather than never, and the same
    worker serves the next one."""
    encode = p.encode

    def skewed(message: p.Message) -> bytes:
        if not isinstance(message, p.ExecuteBatch) or message.batch_id != 1:
            return encode(message)
        fields = msgspec.structs.asdict(message)
        fields["requests"] = [msgspec.structs.asdict(r) for r in message.requests]
        return msgspec.msgpack.encode({"type": "ExecuteBatch", **fields})

    monkeypatch.setattr(p, "encode", skewed)  # the node's side: the worker is its own process

    async def scenario() -> None:
        pool = WorkerPool(start_timeout=60)
        pool.start()
        try:
            _, worker = await pool.load_slice(_launch("a/x/0", model))
            with pytest.raises(GpuvisorError) as failed:
                await asyncio.wait_for(pool.run_batch("a/x/0", [_request(1)]), 10)
            assert failed.value.code == "internal"
            assert "could not read this batch" in failed.value.message
            assert "$.requests[0]" in failed.value.message
            outcomes, _ = await pool.run_batch("a/x/0", [_request(2)])
            assert [o.status for o in outcomes] == [200]
            assert pool.worker_of("a/x/0") is worker and not worker.exited.done()
        finally:
            await pool.close()

    asyncio.run(scenario())


def _thread_names(pid: int) -> dict[int, str]:
    return {
        t.id: Path(f"/proc/{pid}/task/{t.id}/comm").read_text().strip()
        for t in psutil.Process(pid).threads()
    }


def _niceness(pid: int) -> set[int]:
    """The niceness of every thread of process ``pid`` that runs its slices' work (Linux keeps
    one per thread); ZeroMQ's own threads are checked by ``_messaging_niceness``."""
    return {
        os.getpriority(os.PRIO_PROCESS, tid)
        for tid, name in _thread_names(pid).items()
        if not name.startswith("ZMQbg/")
    }


def _messaging_niceness(pid: int) -> set[int]:
    """The niceness of the worker's ZeroMQ threads (its I/O thread and reaper)."""
    names = _thread_names(pid)
    assert any(name.startswith("ZMQbg/IO") for name in names.values()), names
    return {
        os.getpriority(os.PRIO_PROCESS, tid)
        for tid, name in names.items()
        if name.startswith("ZMQbg/")
    }


async def _until_niceness(pid: int, wanted: set[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while _niceness(pid) != wanted:
        assert time.monotonic() < deadline, f"worker {pid} at {_niceness(pid)}, wanted {wanted}"
        await asyncio.sleep(0.05)


def test_a_worker_runs_at_the_niceness_its_most_urgent_slice_asks(model: Path) -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)

    async def scenario() -> None:
        pool = WorkerPool(start_timeout=60)
        pool.start()
        try:
            _, batch = await pool.load_slice(_launch("a/nightly/0", model, "a", nice=10))
            _, chat = await pool.load_slice(_launch("a/chat/0", model, "a"))
            assert _niceness(batch.pid) == {base + 10}, "every thread of a batch-only worker"
            # ... but its messages move at the node's priority, so the device does not idle
            # while the next batch waits for a niced I/O thread
            assert _messaging_niceness(batch.pid) == {base}
            assert _niceness(chat.pid) == {base}
            outcomes, _ = await pool.run_batch("a/nightly/0", [_request(1)])
            assert [o.status for o in outcomes] == [200]

            # A shared worker: batch-only, then a more urgent slice joins, then leaves again.
            _, shared = await pool.load_slice(_launch("b/nightly/0", model, "b", "shared", nice=10))
            assert _niceness(shared.pid) == {base + 10}
            _, same = await pool.load_slice(_launch("b/chat/0", model, "b", "shared"))
            assert same.pid == shared.pid
            # Raising a process's priority again takes CAP_SYS_NICE (root has it); without it
            # the worker keeps its niceness and logs why.
            urgent = {base} if os.geteuid() == 0 else {base + 10}
            await _until_niceness(shared.pid, urgent)
            await pool.unload_slice("b/chat/0")
            await _until_niceness(shared.pid, {base + 10})
        finally:
            await pool.close()

    asyncio.run(scenario())


def _environment(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode().partition("=")[::2] for e in entries if e)


def test_a_worker_sees_only_the_gpu_its_slices_run_on(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the node's own CUDA_VISIBLE_DEVICES (which its GPU list already honours), a
    GPU slice's worker is pinned to its GPU by UUID; the others keep the node's setting."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")

    async def scenario() -> None:
        pool = WorkerPool(start_timeout=60)
        pool.start()
        try:
            _, pinned = await pool.load_slice(_launch("a/m/0", model, "a", gpu_uuid="GPU-abcd"))
            _, other = await pool.load_slice(_launch("b/m/0", model, "b"))
            env = _environment(pinned.pid)
            assert (env["CUDA_VISIBLE_DEVICES"], env["CUDA_DEVICE_ORDER"]) == (
                "GPU-abcd",
                "PCI_BUS_ID",
            )
            assert _environment(other.pid)["CUDA_VISIBLE_DEVICES"] == "1,0"
        finally:
            await pool.close()

    asyncio.run(scenario())
