"""The device handoff between real worker processes: a batch sent ``after`` another worker's
batch starts only when that one is done, released by the earlier worker (or by the node when
that worker dies)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from gpuvisor.bench.mlp import BenchModel
from gpuvisor.bench.oip_clients import oip_body
from gpuvisor.dispatch.dispatcher import BatchCallback
from gpuvisor.dispatch.queues import Outcome, PendingRequest
from gpuvisor.errors import GpuvisorError, WorkerCrashed
from gpuvisor.runtime import protocol as p
from gpuvisor.runtime.pool import SliceLaunch, WorkerPool

SLOW = BenchModel("slow-mlp", (512,) * 25)  # ~50-150 ms for 64 rows on one thread
FAST = BenchModel("fast-mlp", (16, 16, 1))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    dest = tmp_path_factory.mktemp("handoff-models")
    return {m.name: m.build(dest) for m in (SLOW, FAST)}


def _launch(slice_id: str, path: Path, name: str, isolation: str = "process") -> SliceLaunch:
    load = p.LoadModel(slice_id, name, "1", "onnx", str(path), None, "cpu", 0, 1, None, 64)
    return SliceLaunch(slice_id, "t", "cpu-0", isolation, load)


def _request(i: int, model: BenchModel, rows: int) -> PendingRequest:
    body, header_length = oip_body(model.inputs(rows))
    return PendingRequest(i, "t", body, header_length, time.monotonic(), rows=rows)


class Finish:
    """Records when each batch's ``done`` ran, what it got and its device seconds."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.results: dict[str, Sequence[Outcome] | GpuvisorError | None] = {}
        self.at: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.all_done = asyncio.Event()
        self.expected = 0

    def callback(self, name: str) -> BatchCallback:
        def done(result: Sequence[Outcome] | GpuvisorError | None, seconds: float) -> None:
            self.order.append(name)
            self.results[name] = result
            self.at[name] = time.monotonic()
            self.seconds[name] = seconds
            if len(self.order) == self.expected:
                self.all_done.set()

        return done


async def _pool_with(models: dict[str, Path], isolation: str = "process") -> WorkerPool:
    pool = WorkerPool(start_timeout=60)
    pool.start()
    await pool.load_slice(_launch("slow/0", models[SLOW.name], SLOW.name, isolation))
    await pool.load_slice(_launch("fast/0", models[FAST.name], FAST.name, isolation))
    return pool


def test_a_batch_sent_after_another_workers_batch_waits_for_it(models: dict[str, Path]) -> None:
    async def scenario() -> list[tuple[float, float]]:
        pool = await _pool_with(models)
        try:
            runs = []
            for chained in (False, True):
                finish = Finish()
                finish.expected = 2
                slow_request, fast_request = _request(1, SLOW, 256), _request(2, FAST, 1)
                sent = time.monotonic()
                slow = pool.start_batch("slow/0", [slow_request], finish.callback("slow"))
                pool.start_batch(
                    "fast/0",
                    [fast_request],
                    finish.callback("fast"),
                    after=slow if chained else None,
                )
                await asyncio.wait_for(finish.all_done.wait(), 30)
                for result in finish.results.values():
                    assert isinstance(result, Sequence)
                    assert [o.status for o in result] == [200]
                runs.append((finish.at["fast"] - sent, finish.seconds["slow"]))
            return runs
        finally:
            await pool.close()

    (free_answer, free_slow), (chained_answer, chained_slow) = asyncio.run(scenario())
    # Two workers run side by side unless told otherwise: the fast batch is answered while
    # the slow one still runs.
    assert free_answer < free_slow
    # Sent after the slow batch, the fast one starts only when the slow worker hands over.
    assert chained_answer >= chained_slow


def test_after_a_batch_of_the_same_worker_runs_behind_it(models: dict[str, Path]) -> None:
    async def scenario() -> list[str]:
        pool = await _pool_with(models, isolation="shared")  # one process for both slices
        try:
            finish = Finish()
            finish.expected = 2
            slow = pool.start_batch("slow/0", [_request(1, SLOW, 64)], finish.callback("slow"))
            pool.start_batch("fast/0", [_request(2, FAST, 1)], finish.callback("fast"), slow)
            await asyncio.wait_for(finish.all_done.wait(), 30)
            return finish.order
        finally:
            await pool.close()

    assert asyncio.run(scenario()) == ["slow", "fast"]


def test_a_batch_waiting_on_a_crashed_worker_is_released_by_the_node(
    models: dict[str, Path],
) -> None:
    async def scenario() -> dict[str, Sequence[Outcome] | GpuvisorError]:
        pool = await _pool_with(models)
        try:
            finish = Finish()
            finish.expected = 2
            slow = pool.start_batch("slow/0", [_request(1, SLOW, 64)], finish.callback("slow"))
            pool.start_batch("fast/0", [_request(2, FAST, 1)], finish.callback("fast"), slow)
            worker = pool.worker_of("slow/0")
            assert worker is not None
            os.kill(worker.pid, signal.SIGKILL)
            await asyncio.wait_for(finish.all_done.wait(), 30)
            return finish.results
        finally:
            await pool.close()

    results = asyncio.run(scenario())
    assert isinstance(results["slow"], WorkerCrashed)
    fast = results["fast"]
    assert not isinstance(fast, GpuvisorError) and [o.status for o in fast] == [200]


def test_after_a_finished_batch_starts_at_once(models: dict[str, Path]) -> None:
    async def scenario() -> float:
        pool = await _pool_with(models)
        try:
            first = Finish()
            first.expected = 1
            fast = pool.start_batch("fast/0", [_request(1, FAST, 1)], first.callback("a"))
            await asyncio.wait_for(first.all_done.wait(), 30)
            second = Finish()
            second.expected = 1
            started = time.monotonic()
            pool.start_batch("slow/0", [_request(2, SLOW, 1)], second.callback("b"), fast)
            await asyncio.wait_for(second.all_done.wait(), 30)
            return time.monotonic() - started
        finally:
            await pool.close()

    # Nothing to wait for: answered in about its own run time (the wait would be forever).
    assert asyncio.run(scenario()) < 5.0


def _revoke_scenario(
    models: dict[str, Path], staged: tuple[str, BenchModel, int], following: tuple[str, BenchModel]
) -> Finish:
    """A slow batch runs on slow/0 ("running"); a batch ``staged`` behind it is taken back at
    once; a batch ``following`` is sent behind the staged one ("next"). Times in ``at`` are
    from the first send."""

    async def scenario() -> Finish:
        pool = await _pool_with(models)
        try:
            finish = Finish()
            finish.expected = 3
            sent = time.monotonic()
            running = pool.start_batch(
                "slow/0", [_request(1, SLOW, 256)], finish.callback("running")
            )
            slice_id, model, rows = staged
            handle = pool.start_batch(
                slice_id, [_request(2, model, rows)], finish.callback("staged"), after=running
            )
            pool.revoke(handle)
            slice_id, model = following
            pool.start_batch(slice_id, [_request(3, model, 1)], finish.callback("next"), handle)
            await asyncio.wait_for(finish.all_done.wait(), 30)
            finish.at = {name: at - sent for name, at in finish.at.items()}
            return finish
        finally:
            await pool.close()

    return asyncio.run(scenario())


def test_a_revoked_batch_runs_nothing_but_keeps_its_place(models: dict[str, Path]) -> None:
    finish = _revoke_scenario(models, ("fast/0", FAST, 1), ("slow/0", SLOW))
    assert finish.results["staged"] is None and finish.seconds["staged"] == 0.0
    # taken back, it still passed the device on in order: after the slow batch, before "next"
    assert finish.at["staged"] >= finish.seconds["running"]
    assert isinstance(finish.results["next"], Sequence)
    assert [o.status for o in finish.results["next"]] == [200]


def test_a_batch_that_started_is_not_revoked(models: dict[str, Path]) -> None:
    async def scenario() -> Sequence[Outcome] | GpuvisorError | None:
        pool = await _pool_with(models)
        try:
            finish = Finish()
            finish.expected = 1
            handle = pool.start_batch("slow/0", [_request(1, SLOW, 256)], finish.callback("a"))
            await asyncio.sleep(0.01)  # it is running by now (or done)
            pool.revoke(handle)
            await asyncio.wait_for(finish.all_done.wait(), 30)
            return finish.results["a"]
        finally:
            await pool.close()

    result = asyncio.run(scenario())
    assert isinstance(result, Sequence) and [o.status for o in result] == [200]


def test_a_revoked_batch_behind_a_batch_of_its_own_worker_hands_on_in_order(
    models: dict[str, Path],
) -> None:
    finish = _revoke_scenario(models, ("slow/0", SLOW, 256), ("fast/0", FAST))
    assert finish.results["staged"] is None and finish.seconds["staged"] == 0.0
    assert isinstance(finish.results["next"], Sequence)
    assert [o.status for o in finish.results["next"]] == [200]
    # "next" ran once the running batch was done, and did not wait for the revoked one (a
    # whole slow batch) to run
    assert finish.seconds["running"] <= finish.at["next"] < 2 * finish.seconds["running"] + 1.0
