"""A slice that Failed for its model comes back on its own once the model file is fixed, and is
not loaded again while the file stays as it was. Real workers, a real store, the controller in
this process, on the host CPU."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson

from gpuvisor.control.controller import Controller
from gpuvisor.control.slices import SliceState
from gpuvisor.demo.models import build_demo_model, sample_inputs
from gpuvisor.dispatch.dispatcher import DeviceDispatcher
from gpuvisor.dispatch.queues import PendingRequest
from gpuvisor.inventory.cpu import discover_cpu
from gpuvisor.inventory.device import Topology
from gpuvisor.runtime.pool import WorkerPool
from gpuvisor.spec.kinds import resource_key
from gpuvisor.spec.loader import load_documents, resource_to_dict
from gpuvisor.store.repo import Store, StoredObject
from gpuvisor.telemetry.metrics import Metrics

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


@contextlib.asynccontextmanager
async def cpu_controller(db_url: str, model: Path) -> AsyncIterator[Controller]:
    store = Store(db_url)
    resources = load_documents(MANIFEST.replace("MODEL", str(model)))
    store.apply([StoredObject(*resource_key(r), body=resource_to_dict(r)) for r in resources])
    cpu = discover_cpu(memory=4 << 30, threads=1)
    pool = WorkerPool(start_timeout=120)
    pool.start()
    dispatcher = DeviceDispatcher(cpu.id, pool)
    dispatcher.start()
    ctl = Controller(store, Topology([cpu]), pool, {cpu.id: dispatcher}, Metrics())
    try:
        yield ctl
    finally:
        await ctl.stop()
        await dispatcher.stop()
        await pool.close()
        store.close()


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
        body = {
            "inputs": [
                {
                    "name": name,
                    "shape": list(array.shape),
                    "datatype": "FP32",
                    "data": array.ravel().tolist(),
                }
            ]
        }
        request = PendingRequest(1, "analytics", orjson.dumps(body), -1, 0.0)
        [outcome], _ = await ctl.pool.run_batch(SLICE, [request])
        assert outcome.status == 200, outcome.body
        [answer] = orjson.loads(outcome.body)["outputs"]
        expected = ort.InferenceSession(str(model)).run(None, {name: array})[0]
        np.testing.assert_allclose(
            np.array(answer["data"]).reshape(expected.shape), expected, rtol=1e-6
        )
