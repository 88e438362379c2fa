"""A controller in the test's own process, over real workers and a real store, set up as the
node sets it up: what the control tests drive one reconcile at a time."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from gpuvisor.control.controller import Controller
from gpuvisor.dispatch.dispatcher import DeviceDispatcher
from gpuvisor.dispatch.fairshare import FairSharePolicy
from gpuvisor.inventory.device import Device, Topology
from gpuvisor.runtime.pool import WorkerPool
from gpuvisor.spec.kinds import resource_key
from gpuvisor.spec.loader import load_documents, resource_to_dict
from gpuvisor.store.repo import Store, StoredObject
from gpuvisor.telemetry.metrics import Metrics

__all__ = ["apply_manifest", "running_controller", "settle"]


def apply_manifest(store: Store, text: str) -> None:
    """Store every object of a manifest, as an apply does (without its checks)."""
    resources = load_documents(text)
    store.apply([StoredObject(*resource_key(r), body=resource_to_dict(r)) for r in resources])


@contextlib.asynccontextmanager
async def running_controller(
    db_url: str, manifest: str, devices: Sequence[Device], **options: Any
) -> AsyncIterator[Controller]:
    """A controller over ``devices`` with ``manifest`` stored (not yet reconciled); each
    device has its dispatcher with the node's fair-share policy. ``options`` go to the
    Controller (``drain_timeout``, ``out_of_memory``…), except ``start_timeout``: the
    workers' (120 s unless given)."""
    store = Store(db_url)
    apply_manifest(store, manifest)
    pool = WorkerPool(start_timeout=options.pop("start_timeout", 120))
    pool.start()
    dispatchers = {d.id: DeviceDispatcher(d.id, pool, FairSharePolicy(d.quantum)) for d in devices}
    for dispatcher in dispatchers.values():
        dispatcher.start()
    ctl = Controller(store, Topology(list(devices)), pool, dispatchers, Metrics(), **options)
    try:
        yield ctl
    finally:
        await ctl.stop()
        for dispatcher in dispatchers.values():
            await dispatcher.stop()
        await pool.close()
        store.close()


async def settle(ctl: Controller, timeout: float = 120.0) -> None:
    """Wait until no slice is loading, restarting or stopping."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while any(s.state in ("Loading", "Restarting", "Stopping") for s in ctl.slices.values()):
        assert loop.time() < deadline, {s.id: (s.state, s.reason) for s in ctl.slices.values()}
        await asyncio.sleep(0.05)
