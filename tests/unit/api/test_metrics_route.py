"""/metrics as a scrape sees it: the slices gauge says each instance's state at the scrape,
not at the last reconcile (a worker restarts, a slice loads, between two of them)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gpuvisor.api.app import create_app
from gpuvisor.control.controller import Controller
from gpuvisor.control.slices import SliceState
from gpuvisor.inventory.device import Topology
from gpuvisor.node import Node, NodeOptions
from gpuvisor.runtime.pool import WorkerPool
from gpuvisor.store.repo import Store


def _states(text: str) -> dict[str, float]:
    [family] = [f for f in text_string_to_metric_families(text) if f.name == "gpuvisor_slices"]
    return {s.labels["state"]: s.value for s in family.samples if s.value}


def test_the_slices_gauge_follows_a_state_change_made_between_reconciles(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    pool = WorkerPool()  # never started: its folder goes when it is closed
    try:
        node = Node(NodeOptions(state_dir=tmp_path / "state"))
        node.controller = Controller(store, Topology([]), pool, {}, node.metrics)
        ready = SliceState(
            "t/scorer/0", "t", "scorer", 0, "h", "default", "p", 0, 0.0, "process",
            "standard", "scorer", "1",
        )  # fmt: skip
        ready.set_state("Ready")
        node.controller.slices[ready.id] = ready
        node.controller.running.publish_counts()  # as the reconcile leaves it
        app = create_app(node, manage_lifecycle=False)

        async def scrape() -> str:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
                answer = await c.get("/metrics")
                assert answer.status_code == 200
                return answer.text

        assert _states(asyncio.run(scrape())) == {"Ready": 1.0}
        ready.set_state("Restarting", "its worker exited")  # a supervisor's doing
        assert _states(asyncio.run(scrape())) == {"Restarting": 1.0}
    finally:
        asyncio.run(pool.close())
        store.close()
