"""A node that restarts during a rolling update serves what its replicas served before it
stopped, and resumes the update from there: a broken new version must not take the
deployment down just because the node restarted (a power cut at the edge site, an upgrade).
Real workers and models, the controller in this process, stopped and started again on the
same database as the node does."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from controllers import apply_manifest, settle
from onnx_models import adder_model
from test_rollouts import (
    REPLICA,
    SUCCESSOR,
    TENANT,
    answer,
    cpu_controller,
    manifest,
    model_doc,
    model_files,
)

from gpuvisor.control.controller import Controller
from gpuvisor.store.repo import Store

REPLICAS = [f"{TENANT}/adder/{i}" for i in range(3)]


def served(db_url: str) -> dict[str, str]:
    """The model each replica is recorded to serve (``adder@1``…), from the database."""
    with Store(db_url) as store:
        return {
            r.replica_id: next(
                f"{b['metadata']['name']}@{b['spec']['version']}"
                for b in r.body["resources"]
                if b["kind"] == "Model"
            )
            for r in store.list_served()
        }


def states(ctl: Controller) -> list[tuple[str, str, str]]:
    return sorted((s.id, s.model_version, s.state) for s in ctl.slices.values())


def test_a_restart_during_a_stalled_update_serves_the_old_version_again(
    db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gpuvisor.control")
    asyncio.run(stalled_then_restarted(db_url, tmp_path))
    assert (
        f"slice {REPLICA}: the node restarted during an update to adder@2; it serves adder@1 "
        "again until its replacement is Ready"
    ) in caplog.text


async def stalled_then_restarted(db_url: str, tmp_path: Path) -> None:
    one, two = model_files(tmp_path, adder_model(1.0), b"not an onnx model")
    text = manifest("{memory: 1Gi}") + "---" + model_doc("1", one)
    async with cpu_controller(db_url, text) as ctl:
        await ctl.reconcile()
        await settle(ctl)
        apply_manifest(ctl.store, model_doc("2", two))
        await ctl.reconcile()
        await settle(ctl)
        assert states(ctl) == [(REPLICA, "1", "Ready"), (SUCCESSOR, "2", "Failed")]
    assert served(db_url) == {REPLICA: "adder@1"}

    # the node restarts: version 1 comes back first, version 2 is tried again beside it
    async with cpu_controller(db_url, "") as ctl:
        await ctl.reconcile()
        [restored] = ctl.instances(REPLICA)
        assert (restored.id, restored.model_version, restored.restored) == (REPLICA, "1", True)
        await ctl.reconcile()  # while it loads, the update waits and nothing stops it
        assert ctl.instances(REPLICA) == [restored]
        await settle(ctl)
        await ctl.reconcile()
        await settle(ctl)
        await ctl.reconcile()
        assert states(ctl) == [(REPLICA, "1", "Ready"), (SUCCESSOR, "2", "Failed")]
        assert ctl.ready_slices(TENANT, "adder") == [restored]
        assert restored.reason == f"serving the previous spec: its replacement {SUCCESSOR} failed"
        assert await answer(ctl, REPLICA) == 1.0
        assert ctl.rollout(TENANT, "adder").stalled == {REPLICA: "Failed"}

        # fixed: the update resumes and completes, and version 2 is what is recorded
        two.write_bytes(adder_model(2.0))
        await ctl.reconcile()
        await settle(ctl)
        assert states(ctl) == [(SUCCESSOR, "2", "Ready")]
        assert await answer(ctl, SUCCESSOR) == 2.0
    assert served(db_url) == {REPLICA: "adder@2"}

    # once the update is done, a restart starts version 2 alone
    async with cpu_controller(db_url, "") as ctl:
        await ctl.reconcile()
        await settle(ctl)
        assert states(ctl) == [(REPLICA, "2", "Ready")]
        assert not ctl.slices[REPLICA].restored


def test_a_restart_resumes_the_update_one_replica_at_a_time(
    sqlite_url: str, tmp_path: Path
) -> None:
    asyncio.run(paced_after_restart(sqlite_url, tmp_path))


async def paced_after_restart(db_url: str, tmp_path: Path) -> None:
    one, two = model_files(tmp_path, adder_model(1.0), b"not an onnx model")
    text = manifest("{memory: 512Mi}", deployment=", replicas: 3") + "---" + model_doc("1", one)
    async with cpu_controller(db_url, text) as ctl:
        await ctl.reconcile()
        await settle(ctl)
        apply_manifest(ctl.store, model_doc("2", two))
        await ctl.reconcile()
        await settle(ctl)
    assert served(db_url) == dict.fromkeys(REPLICAS, "adder@1")

    async with cpu_controller(db_url, "") as ctl:
        await ctl.reconcile()
        await settle(ctl)
        await ctl.reconcile()
        await settle(ctl)
        await ctl.reconcile()
        # every replica serves version 1 again; the broken version 2 holds the first one's
        # turn, and the others wait behind it as they did before the restart
        assert [s.model_version for s in ctl.ready_slices(TENANT, "adder")] == ["1"] * 3
        assert ctl.slices[f"{REPLICAS[0]}#2"].state == "Failed", states(ctl)
        assert all(len(ctl.instances(rid)) == 1 for rid in REPLICAS[1:])
        progress = ctl.rollout(TENANT, "adder")
        assert (progress.replacing, progress.waiting) == ([REPLICAS[0]], REPLICAS[1:])


def test_what_served_is_forgotten_with_its_deployment_and_scaled_away_replicas(
    sqlite_url: str, tmp_path: Path
) -> None:
    asyncio.run(forgotten(sqlite_url, tmp_path))


async def forgotten(db_url: str, tmp_path: Path) -> None:
    [one] = model_files(tmp_path, adder_model(1.0))
    text = manifest("{memory: 512Mi}", deployment=", replicas: 2") + "---" + model_doc("1", one)
    async with cpu_controller(db_url, text) as ctl:
        await ctl.reconcile()
        await settle(ctl)
        await ctl.served.close()
        assert served(db_url) == dict.fromkeys(REPLICAS[:2], "adder@1")
        apply_manifest(ctl.store, manifest("{memory: 512Mi}", deployment=", replicas: 1"))
        await ctl.reconcile()
        await ctl.served.close()
        assert served(db_url) == {REPLICAS[0]: "adder@1"}
        ctl.store.delete("Deployment", TENANT, "adder")
        await ctl.reconcile()
        await ctl.served.close()
        assert served(db_url) == {}


@pytest.mark.parametrize("change", ["profile deleted", "same spec again"])
def test_nothing_is_restored_where_the_old_spec_cannot_serve_or_nothing_changed(
    sqlite_url: str, tmp_path: Path, change: str
) -> None:
    asyncio.run(not_restored(sqlite_url, tmp_path, change))


async def not_restored(db_url: str, tmp_path: Path, change: str) -> None:
    one, two = model_files(tmp_path, adder_model(1.0), adder_model(2.0))
    text = manifest("{memory: 1Gi}") + "---" + model_doc("1", one)
    async with cpu_controller(db_url, text) as ctl:
        await ctl.reconcile()
        await settle(ctl)
    with Store(db_url) as store:
        if change == "profile deleted":  # the current spec cannot be served: nothing runs
            store.delete("Profile", "", "rollout")
        else:  # version 2 applied and deleted again while the node was down
            apply_manifest(store, model_doc("2", two))
            store.delete("Model", TENANT, "adder@2")
    async with cpu_controller(db_url, "") as ctl:
        await ctl.reconcile()
        await settle(ctl)
        if change == "profile deleted":
            assert states(ctl) == [(REPLICA, "1", "Pending")]
            assert ctl.slices[REPLICA].reason == "profile 'rollout' not found"
        else:
            assert states(ctl) == [(REPLICA, "1", "Ready")]
            assert not ctl.slices[REPLICA].restored
