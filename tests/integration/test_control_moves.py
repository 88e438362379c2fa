"""Cordon and device failure on a simulated fleet: slices move within one reconcile, or wait
Pending with reasons; a ``disallowMigration`` slice stays. Real workers, a real store (SQLite,
and PostgreSQL when configured), the controller in this process.

The fleet is two nodes of four GPUs (tests/data/two-edge-nodes.fleet.yaml); the
simulated GPUs run their workers on the host CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from controllers import running_controller, settle

from gpuvisor.control.controller import Controller
from gpuvisor.control.health import apply_health
from gpuvisor.demo.models import build_demo_models
from gpuvisor.inventory.cpu import discover_cpu
from gpuvisor.inventory.simulated import devices_from_fleet
from gpuvisor.spec.kinds import Fleet
from gpuvisor.store.repo import StoredObject
from gpuvisor.telemetry.readers import DeviceReading

FLEET = Path(__file__).parents[1] / "data" / "two-edge-nodes.fleet.yaml"

MANIFEST = """
apiVersion: gpuvisor/v1
kind: Tenant
metadata: {name: retail}
---
apiVersion: gpuvisor/v1
kind: Profile
metadata: {name: small}
spec: {memory: 1Gi, computeShare: 0.25, isolation: process}
---
apiVersion: gpuvisor/v1
kind: Pool
metadata: {name: h100}
spec: {selector: {model: "H100*"}}
---
apiVersion: gpuvisor/v1
kind: Pool
metadata: {name: l4}
spec: {selector: {model: L4}, placement: spread}
---
apiVersion: gpuvisor/v1
kind: Model
metadata: {name: scorer, tenant: retail}
spec: {source: MODEL}
---
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {name: shelf, tenant: retail}
spec: {model: scorer, profile: small, pool: l4, replicas: 2, placement: {antiAffinity: true}}
---
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {name: pinned, tenant: retail}
spec: {model: scorer, profile: small, pool: h100, placement: {disallowMigration: true}}
---
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {name: chat, tenant: retail}
spec: {model: scorer, profile: small, pool: h100}
"""


@contextlib.asynccontextmanager
async def fleet_controller(
    db_url: str, tmp_path: Path, extra: str = ""
) -> AsyncIterator[Controller]:
    """A controller over the simulated fleet with the manifest (and ``extra`` documents)
    applied and every slice settled."""
    model = build_demo_models(tmp_path / "models")["basket-scorer"]
    devices = devices_from_fleet(Fleet.model_validate(yaml.safe_load(FLEET.read_text())))
    manifest = (MANIFEST + extra).replace("MODEL", str(model))
    async with running_controller(db_url, manifest, devices, drain_timeout=2.0) as ctl:
        await ctl.reconcile()
        await settle(ctl)
        yield ctl


def where(ctl: Controller) -> dict[str, tuple[str | None, str]]:
    return {s.id: (s.device_id, s.state) for s in ctl.slices.values()}


def test_cordon_moves_slices_in_one_reconcile_but_not_a_pinned_one(
    db_url: str, tmp_path: Path
) -> None:
    asyncio.run(cordon_scenario(db_url, tmp_path))


def test_a_failed_device_sends_its_slices_elsewhere_or_to_pending_with_reasons(
    db_url: str, tmp_path: Path
) -> None:
    asyncio.run(failure_scenario(db_url, tmp_path))


async def cordon_scenario(db_url: str, tmp_path: Path) -> None:
    async with fleet_controller(db_url, tmp_path) as ctl:
        before = where(ctl)
        # spread + anti-affinity: one replica on each L4; both H100 slices binpack onto gpu-0
        assert before == {
            "retail/shelf/0": ("edge-1/gpu-2", "Ready"),
            "retail/shelf/1": ("edge-1/gpu-3", "Ready"),
            "retail/pinned/0": ("edge-1/gpu-0", "Ready"),
            "retail/chat/0": ("edge-1/gpu-0", "Ready"),
        }
        old = ctl.slices["retail/chat/0"]
        assert ctl.store.cordon("edge-1/gpu-0", "test", "fan replacement")
        await ctl.reconcile()  # one pass: placed elsewhere, and the old one serves until then
        chat, pinned = ctl.slices["retail/chat/0#2"], ctl.slices["retail/pinned/0"]
        assert chat.device_id == "edge-1/gpu-1" and chat.replaces == "retail/chat/0"
        assert chat.reason.startswith("moved: edge-1/gpu-0 is cordoned; placed on edge-1/gpu-1")
        assert (old.device_id, old.state) == ("edge-1/gpu-0", "Ready")
        assert old.reason == (
            "edge-1/gpu-0 is cordoned: serving until its replacement retail/chat/0#2 is Ready"
        )
        assert ctl.ready_slices("retail", "chat") == [old]
        assert pinned.device_id == "edge-1/gpu-0"
        assert pinned.reason == "disallowMigration: stays on edge-1/gpu-0 is cordoned"
        await settle(ctl)
        assert chat.state == "Ready" and chat.worker_pid != old.worker_pid
        assert ctl.ready_slices("retail", "chat") == [chat]
        assert "retail/chat/0" not in ctl.slices  # the old one drained and stopped
        assert pinned.state == "Ready"

        # uncordoned: nothing moves back (a running slice is not disturbed), the note goes
        assert ctl.store.uncordon("edge-1/gpu-0")
        await ctl.reconcile()
        assert where(ctl)["retail/chat/0#2"] == ("edge-1/gpu-1", "Ready")
        assert ctl.slices["retail/pinned/0"].reason == ""

        # cordoned and uncordoned again before the move ends: the old one stays, and serves
        assert ctl.store.cordon("edge-1/gpu-1", "test", "second thoughts")
        await ctl.reconcile()
        assert ctl.slices["retail/chat/0"].replaces == "retail/chat/0#2"
        assert ctl.store.uncordon("edge-1/gpu-1")
        await ctl.reconcile()
        await settle(ctl)
        assert where(ctl)["retail/chat/0#2"] == ("edge-1/gpu-1", "Ready")
        assert "retail/chat/0" not in ctl.slices
        assert ctl.slices["retail/chat/0#2"].reason == ""


def test_the_replicas_of_a_deployment_move_one_at_a_time(db_url: str, tmp_path: Path) -> None:
    asyncio.run(paced_moves(db_url, tmp_path))


PAIR = """
---
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {name: pair, tenant: retail}
spec: {model: scorer, profile: small, pool: h100, replicas: 2}
"""


async def paced_moves(db_url: str, tmp_path: Path) -> None:
    async with fleet_controller(db_url, tmp_path, PAIR) as ctl:
        pair = ["retail/pair/0", "retail/pair/1"]
        assert [where(ctl)[r] for r in pair] == [("edge-1/gpu-0", "Ready")] * 2
        assert ctl.store.cordon("edge-1/gpu-0", "test", "firmware update")
        await ctl.reconcile()
        # replica 0 moves (beside chat's move: another deployment); replica 1 waits its turn
        assert ctl.slices["retail/pair/0#2"].replaces == "retail/pair/0"
        assert "retail/chat/0#2" in ctl.slices
        [second] = ctl.instances(pair[1])
        assert second.reason == (
            "edge-1/gpu-0 is cordoned: serving: waiting for its turn "
            "(retail/pair/0 first; rollout.maxSurge: 1)"
        )
        assert ctl.moving(pair[0]) and ctl.moving(pair[1])
        # its turn comes when replica 0 is Ready elsewhere, with no reconcile asked
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        while any(ctl.moving(r) for r in pair):
            assert loop.time() < deadline, where(ctl)
            await asyncio.sleep(0.02)
        await settle(ctl)
        moved = [s for r in pair for s in ctl.instances(r)]
        assert [(s.state, s.device_id != "edge-1/gpu-0") for s in moved] == [("Ready", True)] * 2
        assert where(ctl)["retail/pinned/0"] == ("edge-1/gpu-0", "Ready")


async def failure_scenario(db_url: str, tmp_path: Path) -> None:
    async with fleet_controller(db_url, tmp_path) as ctl:
        gpu2 = ctl.topology.get("edge-1/gpu-2")
        assert gpu2 is not None
        # the sampler's reading after an Xid 79: the node applies it as health
        changed = apply_health([gpu2], {gpu2.id: DeviceReading(gpu2.id, xids=(79,))})
        assert changed == ["edge-1/gpu-2"]
        await ctl.reconcile()
        shelf0 = ctl.slices["retail/shelf/0"]
        # the only other L4 holds replica 1 and antiAffinity forbids sharing it: Pending, with
        # every device's reason
        assert shelf0.device_id is None and shelf0.state == "Pending"
        assert shelf0.reason == (
            "moved: edge-1/gpu-2 is unhealthy (Xid 79: GPU has fallen off the bus); "
            "edge-1/gpu-0: not in pool 'l4'; edge-1/gpu-1: not in pool 'l4'; "
            "edge-1/gpu-2: device is unhealthy: Xid 79: GPU has fallen off the bus; "
            "edge-1/gpu-3: antiAffinity: replica retail/shelf/1 of deployment 'shelf' is on "
            "this device; edge-2/gpu-0: not in pool 'l4'; edge-2/gpu-1: not in pool 'l4'; "
            "edge-2/gpu-2: not in pool 'l4'; edge-2/gpu-3: not in pool 'l4'"
        )
        assert ctl.slices["retail/shelf/1"].device_id == "edge-1/gpu-3"
        await ctl.reconcile()  # tried again: it still says why it moved
        assert ctl.slices["retail/shelf/0"].reason == shelf0.reason

        # the H100 holding both h100 slices fails too: chat moves, pinned stays (with why)
        gpu0 = ctl.topology.get("edge-1/gpu-0")
        assert gpu0 is not None
        apply_health(
            [gpu0], {gpu0.id: DeviceReading(gpu0.id, healthy=False, problem="NVML read failed")}
        )
        await ctl.reconcile()
        assert ctl.slices["retail/chat/0"].device_id == "edge-1/gpu-1"
        pinned = ctl.slices["retail/pinned/0"]
        assert pinned.device_id == "edge-1/gpu-0"
        assert (
            pinned.reason
            == "disallowMigration: stays on edge-1/gpu-0 is unhealthy (NVML read failed)"
        )
        await settle(ctl)
        assert ctl.slices["retail/chat/0"].state == "Ready"

        # a read that works again clears a read failure but not an Xid (that GPU needs a reset)
        assert apply_health(
            [gpu0, gpu2], {gpu0.id: DeviceReading(gpu0.id), gpu2.id: DeviceReading(gpu2.id)}
        ) == ["edge-1/gpu-0"]
        assert not gpu2.healthy
        await ctl.reconcile()
        assert ctl.slices["retail/shelf/0"].state == "Pending"
        assert ctl.slices["retail/pinned/0"].reason == ""


def test_scaling_up_and_down_and_an_idle_reconcile_changes_nothing(
    db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gpuvisor.control")
    asyncio.run(scale_scenario(db_url, tmp_path))
    # a slice that goes says so in the log, once, with why
    said = [r for r in caplog.records if r.getMessage().startswith("slice retail/shelf/1 stopping")]
    assert [r.getMessage() for r in said] == [
        "slice retail/shelf/1 stopping: deleted, scaled down or unloaded"
    ]
    assert getattr(said[0], "tenant", None) == "retail"


def _apply_replicas(ctl: Controller, replicas: int) -> None:
    stored = ctl.store.get("Deployment", "retail", "shelf")
    assert stored is not None
    body = {**stored.body, "spec": {**stored.body["spec"], "replicas": replicas}}
    ctl.store.apply([StoredObject("Deployment", "retail", "shelf", body)])


async def scale_scenario(db_url: str, tmp_path: Path) -> None:
    async with fleet_controller(db_url, tmp_path) as ctl:
        pids = {sid: s.worker_pid for sid, s in ctl.slices.items()}
        await ctl.reconcile()  # nothing changed: nothing restarts
        assert {sid: s.worker_pid for sid, s in ctl.slices.items()} == pids

        _apply_replicas(ctl, 3)
        await ctl.reconcile()
        # two L4s and antiAffinity: the third replica has nowhere to go
        third = ctl.slices["retail/shelf/2"]
        assert third.state == "Pending"
        assert third.unplaced["edge-1/gpu-2"].startswith("antiAffinity: replica retail/shelf/")
        assert third.unplaced["edge-2/gpu-0"] == "not in pool 'l4'"
        # tried again at every reconcile, and Pending since the first try
        await asyncio.sleep(0.05)
        await ctl.reconcile()
        again = ctl.slices["retail/shelf/2"]
        assert again is not third and (again.state, again.since) == ("Pending", third.since)

        _apply_replicas(ctl, 1)
        await ctl.reconcile()
        shelf = sorted(sid for sid in ctl.slices if sid.startswith("retail/shelf/"))
        assert shelf == ["retail/shelf/0"]
        assert ctl.slices["retail/shelf/0"].worker_pid == pids["retail/shelf/0"]
        assert ctl.pool.slice_worker.get("retail/shelf/1") is None  # its worker was unloaded


def test_draining_the_only_device_stops_every_replica_not_just_the_first(
    sqlite_url: str, tmp_path: Path
) -> None:
    asyncio.run(drain_only_device(sqlite_url, tmp_path))


async def drain_only_device(db_url: str, tmp_path: Path) -> None:
    model = build_demo_models(tmp_path / "models")["basket-scorer"]
    manifest = MANIFEST.split("---\napiVersion: gpuvisor/v1\nkind: Deployment")[0] + (
        "---\napiVersion: gpuvisor/v1\nkind: Deployment\n"
        "metadata: {name: pair, tenant: retail}\n"
        "spec: {model: scorer, profile: small, replicas: 2}\n"
    )
    cpu = discover_cpu(memory=4 << 30, threads=1)
    async with running_controller(db_url, manifest.replace("MODEL", str(model)), [cpu]) as ctl:
        await ctl.reconcile()
        await settle(ctl)
        pair = ["retail/pair/0", "retail/pair/1"]
        assert [where(ctl)[r] for r in pair] == [("cpu-0", "Ready")] * 2
        assert ctl.store.cordon("cpu-0", "test", "maintenance")
        for _ in range(3):
            await ctl.reconcile()
            await settle(ctl)
        # nowhere else to go: each replica stops and waits Pending, none holds the other back
        assert list(where(ctl).values()) == [(None, "Pending")] * 2, {
            s.id: s.reason for s in ctl.slices.values()
        }
        assert not any(ctl.moving(r) for r in pair)
        progress = ctl.rollout("retail", "pair")
        assert (progress.replacing, progress.waiting, progress.stalled) == ([], [], {})
