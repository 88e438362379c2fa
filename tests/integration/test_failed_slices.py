"""A slice that Failed for its model comes back on its own once the model file is fixed, and is
not loaded again while the file stays as it was; one whose model ran out of memory while
loading is also loaded again later, with a growing delay. Real workers, a real store, the
controller in this process, on the host CPU."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
import pytest
from controllers import running_controller, settle
from onnx import TensorProto, helper, numpy_helper
from onnx_models import rows_model, slow_model

from gpuvisor.control.controller import Controller
from gpuvisor.control.slices import MAX_FAILED_LOADS, Backoff, SliceState, file_stamp
from gpuvisor.demo.models import build_demo_model, sample_inputs
from gpuvisor.dispatch.queues import PendingRequest
from gpuvisor.inventory.cpu import discover_cpu
from gpuvisor.runtime.tensors import json_infer_request

MANIFEST = """
apiVersion: gpuvisor/v1
kind: Tenant
metadata: {name: analytics}
---
apiVersion: gpuvisor/v1
kind: Profile
metadata: {name: small}
spec: {memory: 1Gi}
---
apiVersion: gpuvisor/v1
kind: Model
metadata: {name: scorer, tenant: analytics}
spec: {source: "MODEL"}
---
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {name: scorer, tenant: analytics}
spec: {model: scorer, profile: small}
"""
SLICE = "analytics/scorer/0"


def cpu_controller(
    db_url: str, model: Path, out_of_memory: Backoff = Backoff(30.0, 600.0)
) -> contextlib.AbstractAsyncContextManager[Controller]:
    return running_controller(
        db_url,
        MANIFEST.replace("MODEL", str(model)),
        [discover_cpu(memory=4 << 30, threads=1)],
        out_of_memory=out_of_memory,
    )


async def reconcile_and_settle(ctl: Controller, timeout: float = 120.0) -> SliceState:
    """Reconcile once, then wait until the slice is no longer loading or restarting."""
    await ctl.reconcile()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (state := ctl.slices[SLICE]).state in ("Loading", "Restarting"):
        assert loop.time() < deadline, (state.state, state.reason)
        await asyncio.sleep(0.05)
    return state


def test_a_failed_slice_is_loaded_again_when_its_model_file_changes(
    sqlite_url: str, tmp_path: Path
) -> None:
    asyncio.run(fix_the_file(sqlite_url, tmp_path / "scorer.onnx"))


async def fix_the_file(db_url: str, model: Path) -> None:
    async with cpu_controller(db_url, model) as ctl:
        # no file yet: Failed, and the reason says how it comes back
        state = await reconcile_and_settle(ctl)
        assert state.state == "Failed", (state.state, state.reason)
        assert "not found" in state.reason
        assert "loaded again when the model file changes" in state.reason
        # a first start that failed, not a stalled update: no rollout is under way
        progress = ctl.rollout("analytics", "scorer")
        assert (progress.first_start, progress.stalled, progress.describe()) == (True, {}, "")

        # nothing changed: no new attempt (the state and its time stay as they were)
        since = state.since
        again = await reconcile_and_settle(ctl)
        assert again is state and again.state == "Failed" and again.since == since

        # a file that is not a model: tried, and Failed for that reason instead
        model.write_bytes(b"not an onnx model")
        state = await reconcile_and_settle(ctl)
        assert state.state == "Failed", (state.state, state.reason)
        assert "not found" not in state.reason

        # the real model: Ready, and it serves
        model.write_bytes(build_demo_model("basket-scorer").SerializeToString())
        state = await reconcile_and_settle(ctl)
        assert state.state == "Ready", (state.state, state.reason)
        (name, array), *_ = sample_inputs("basket-scorer").items()
        await assert_serves(ctl, model, name, array)


async def assert_serves(ctl: Controller, model: Path, name: str, array: np.ndarray) -> None:
    """The slice answers a JSON request with what onnxruntime computes from the model file."""
    request = PendingRequest(1, "analytics", json_infer_request({name: array}), -1, 0.0)
    [outcome], _ = await ctl.pool.run_batch(SLICE, [request])
    assert outcome.status == 200, outcome.body
    [answer] = orjson.loads(outcome.body)["outputs"]
    expected = ort.InferenceSession(str(model)).run(None, {name: array})[0]
    np.testing.assert_allclose(
        np.array(answer["data"]).reshape(expected.shape), expected, rtol=1e-6
    )


def filler_model(elements: int) -> bytes:
    """y = x + sum(ones(elements)): running it allocates ``elements`` floats, so with 2**40 of
    them (4 TiB) every run, and with it the load's profiling, fails to allocate memory. The file
    has the same size whatever ``elements`` is."""
    shape = numpy_helper.from_array(np.array([elements], dtype=np.int64), "shape")
    ones = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    return rows_model(
        "filler",
        [
            helper.make_node("ConstantOfShape", ["shape"], ["filler"], value=ones),
            helper.make_node("ReduceSum", ["filler"], ["total"], keepdims=0),
            helper.make_node("Add", ["x", "total"], ["y"]),
        ],
        [shape],
    )


def test_a_slice_that_ran_out_of_memory_is_loaded_again_later(
    sqlite_url: str, tmp_path: Path
) -> None:
    asyncio.run(memory_comes_back(sqlite_url, tmp_path / "scorer.onnx"))


async def memory_comes_back(db_url: str, model: Path) -> None:
    model.write_bytes(filler_model(2**40))
    async with cpu_controller(db_url, model, out_of_memory=Backoff(0.5, 1.0)) as ctl:
        state = await reconcile_and_settle(ctl)
        assert state.state == "Failed", (state.state, state.reason)
        assert "the model ran out of memory running a batch of 1 while loading" in state.reason
        assert "failed to allocate memory" in state.reason.lower()
        assert "ran out of memory once; loaded again 0.5s after this failure" in state.reason
        assert state.memory_failures == 1 and state.retry_at is not None
        counted = ctl.metrics.allocation_failures.labels(
            "cpu-0", "analytics", "scorer", "out_of_memory"
        )._value.get()
        assert counted == 1

        # not due yet: no new attempt
        since = state.since
        again = await reconcile_and_settle(ctl)
        assert again is state and again.since == since

        # due: loaded again with nothing changed, fails again, and waits longer (up to the cap)
        await asyncio.sleep(max(0.0, state.retry_at - time.monotonic()))
        second = await reconcile_and_settle(ctl)
        assert second is not state and second.state == "Failed", (second.state, second.reason)
        assert second.memory_failures == 2
        assert "ran out of memory 2 times in a row; loaded again 1s after" in second.reason

        # the memory is there now (the same file, as far as its stamp tells: the slice comes
        # back through the timer, not through a change of its model file)
        stamp = file_stamp(str(model))
        before = os.stat(model)
        with open(model, "r+b") as f:
            f.write(filler_model(4))
        os.utime(model, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert file_stamp(str(model)) == stamp
        assert second.retry_at is not None
        await asyncio.sleep(max(0.0, second.retry_at - time.monotonic()))
        ready = await reconcile_and_settle(ctl)
        assert ready.state == "Ready", (ready.state, ready.reason)
        assert ready.memory_failures == 0 and ready.retry_at is None
        await assert_serves(ctl, model, "x", np.arange(8, dtype=np.float32).reshape(2, 4))


def test_a_link_swapped_out_of_the_tenants_model_folders_fails_the_reload(
    sqlite_url: str, tmp_path: Path
) -> None:
    asyncio.run(swapped_link(sqlite_url, tmp_path))


async def swapped_link(db_url: str, tmp_path: Path) -> None:
    root, other = tmp_path / "root", tmp_path / "other"
    root.mkdir()
    other.mkdir()
    (root / "scorer.onnx").write_bytes(build_demo_model("basket-scorer").SerializeToString())
    (other / "secret.onnx").write_bytes(build_demo_model("sku-lookup").SerializeToString())
    link = root / "current.onnx"
    link.symlink_to(root / "scorer.onnx")
    manifest = MANIFEST.replace("MODEL", str(link)).replace(
        "metadata: {name: analytics}",
        f"metadata: {{name: analytics}}\nspec: {{modelRoots: ['{root}']}}",
    )
    async with running_controller(
        db_url, manifest, [discover_cpu(memory=4 << 30, threads=1)]
    ) as ctl:
        assert (await reconcile_and_settle(ctl)).state == "Ready"
        link.unlink()
        link.symlink_to(other / "secret.onnx")  # another tenant's model, by the same name
        # loaded again (through the repository API here; a worker restart does the same)
        await ctl.unload("analytics", "scorer")
        await ctl.load("analytics", "scorer")
        state = await reconcile_and_settle(ctl)
        assert state.state == "Failed", (state.state, state.reason)
        assert "now leads outside tenant 'analytics''s model folders" in state.reason


def test_a_model_that_never_loads_in_time_ends_failed_not_retried_for_ever(
    sqlite_url: str, tmp_path: Path
) -> None:
    asyncio.run(never_loads_in_time(sqlite_url, tmp_path / "slow.onnx"))


async def never_loads_in_time(db_url: str, model: Path) -> None:
    model.write_bytes(slow_model(5_000_000))  # seconds per run; a load runs it several times
    async with running_controller(
        db_url,
        MANIFEST.replace("MODEL", str(model)),
        [discover_cpu(memory=4 << 30, threads=1)],
        start_timeout=3.0,
        restart=Backoff(0.1, 0.2),
    ) as ctl:
        await ctl.reconcile()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 90
        while (state := ctl.slices[SLICE]).state != "Failed":
            assert loop.time() < deadline, (state.state, state.reason)
            await asyncio.sleep(0.1)
        assert f"its model did not load {MAX_FAILED_LOADS} times in a row" in state.reason
        assert "did not load the model within 3s (workers.startTimeout)" in state.reason
        assert state.restarts == MAX_FAILED_LOADS
        counted = ctl.metrics.worker_restarts.labels("analytics", "scorer")._value.get()
        assert counted == MAX_FAILED_LOADS
        assert not ctl.pool.workers, "no worker is left running the model"


def test_a_worker_that_cannot_be_started_is_retried_until_it_can(
    sqlite_url: str, tmp_path: Path
) -> None:
    asyncio.run(started_once_it_can(sqlite_url, tmp_path / "scorer.onnx"))


async def started_once_it_can(db_url: str, model: Path) -> None:
    """The node could not start a process (no file descriptors left, say): the slice says so
    and is tried again, with no limit, and serves once a worker starts."""
    model.write_bytes(build_demo_model("basket-scorer").SerializeToString())
    async with cpu_controller(db_url, model) as ctl:
        python, ctl.pool.python = ctl.pool.python, "/nonexistent/python3"
        ctl.restart = Backoff(0.1, 0.2)
        await ctl.reconcile()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while (state := ctl.slices[SLICE]).restarts < MAX_FAILED_LOADS + 1:
            assert loop.time() < deadline, (state.state, state.reason)
            await asyncio.sleep(0.05)
        assert state.state == "Restarting", (state.state, state.reason)
        assert "starting a worker process failed: [Errno 2]" in state.reason
        ctl.pool.python = python
        ready = await reconcile_and_settle(ctl)
        assert ready.state == "Ready", (ready.state, ready.reason)
        await assert_serves(ctl, model, "features", sample_inputs("basket-scorer")["features"])


def test_a_model_file_changed_under_a_restarted_worker_is_said_in_the_log(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    asyncio.run(changed_under_a_restart(sqlite_url, tmp_path / "scorer.onnx"))
    [line] = [r.getMessage() for r in caplog.records if "changed since it was loaded" in r.message]
    assert line.startswith(f"slice {SLICE}: its model file ")
    assert "it serves the new content as version 1 (give the Model a sha256" in line


async def changed_under_a_restart(db_url: str, model: Path) -> None:
    model.write_bytes(rows_model("one", [helper.make_node("Identity", ["x"], ["y"])]))
    async with cpu_controller(db_url, model) as ctl:
        ctl.restart = Backoff(0.1, 0.2)
        first = await reconcile_and_settle(ctl)
        assert first.state == "Ready" and first.worker_pid is not None
        model.write_bytes(rows_model("two", [helper.make_node("Neg", ["x"], ["y"])]))
        os.kill(first.worker_pid, signal.SIGKILL)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not (first.restarts == 1 and first.state == "Ready"):
            assert loop.time() < deadline, (first.state, first.reason)
            await asyncio.sleep(0.05)
        await assert_serves(ctl, model, "x", np.ones((1, 4), dtype=np.float32))


def test_a_slice_whose_file_appears_when_there_is_no_room_is_placed_once_room_frees_up(
    sqlite_url: str, tmp_path: Path
) -> None:
    asyncio.run(room_after_the_file(sqlite_url, tmp_path))


async def room_after_the_file(db_url: str, folder: Path) -> None:
    late, ok = folder / "late.onnx", folder / "ok.onnx"
    ok.write_bytes(build_demo_model("basket-scorer").SerializeToString())
    two = (
        MANIFEST.replace("MODEL", str(late)).replace(
            "{memory: 1Gi}", "{memory: 1Gi, computeShare: 0.6}"
        )
        + f"""---
apiVersion: gpuvisor/v1
kind: Model
metadata: {{name: ok, tenant: analytics}}
spec: {{source: "{ok}"}}
---
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {{name: zother, tenant: analytics}}
spec: {{model: ok, profile: small}}
"""
    )
    async with running_controller(db_url, two, [discover_cpu(memory=4 << 30, threads=1)]) as ctl:
        # the missing file fails the slice, which gives its share back: the other one loads
        state = await reconcile_and_settle(ctl)
        await ctl.reconcile()
        await settle(ctl)
        assert state.state == "Failed" and "not found" in state.reason
        assert ctl.slices["analytics/zother/0"].state == "Ready"
        # the file appears while the other holds the share it needs: Pending
        late.write_bytes(build_demo_model("basket-scorer").SerializeToString())
        state = await reconcile_and_settle(ctl)
        assert state.state == "Pending" and "compute shares would sum to" in state.reason
        # room frees up: the next reconcile places it
        ctl.store.delete("Deployment", "analytics", "zother")
        await ctl.reconcile()
        await settle(ctl)
        state = await reconcile_and_settle(ctl)
        assert state.state == "Ready", (state.state, state.reason)
