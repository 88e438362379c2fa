"""Rolling updates: a changed deployment (a new model version, say) loads beside the old one,
which keeps serving until the new one is Ready; then the old one drains and stops. Clients see
no 503. A replacement that fails leaves the old one serving; a device without room for both
replaces the slice in place. Real workers and models, a real node over HTTP for what clients
see, the controller in this process for the rest."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from controllers import apply_manifest, running_controller, settle
from onnx_models import adder_model, slow_model
from typer.testing import CliRunner

from gpuvisor.cli import app
from gpuvisor.control.controller import Controller
from gpuvisor.control.slices import SliceState
from gpuvisor.dispatch.queues import PendingRequest, SliceQueue
from gpuvisor.errors import NotFound
from gpuvisor.inventory.cpu import discover_cpu
from gpuvisor.inventory.device import Topology
from gpuvisor.launch import NodeProcess
from gpuvisor.node import Node, NodeOptions
from gpuvisor.runtime.pool import WorkerPool
from gpuvisor.runtime.tensors import json_infer_request
from gpuvisor.security.keys import Principal
from gpuvisor.spec.kinds import Deployment
from gpuvisor.spec.loader import load_documents
from gpuvisor.store.repo import Store
from gpuvisor.telemetry.metrics import Metrics

TENANT = "rollout"
REPLICA = f"{TENANT}/adder/0"
SUCCESSOR = f"{REPLICA}#2"
X = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)


def model_files(tmp_path: Path, *contents: bytes) -> list[Path]:
    """Write each version's model file (``adder-1.onnx``, ``adder-2.onnx``…) and return them."""
    paths = [tmp_path / f"adder-{version}.onnx" for version in range(1, len(contents) + 1)]
    for path, content in zip(paths, contents, strict=True):
        path.write_bytes(content)
    return paths


def manifest(profile: str, quota: str = "{}", deployment: str = "") -> str:
    """The tenant, a profile and the ``adder`` deployment (``deployment``: more of its spec)."""
    return f"""
apiVersion: gpuvisor/v1
kind: Tenant
metadata: {{name: {TENANT}}}
spec: {{quota: {quota}}}
---
apiVersion: gpuvisor/v1
kind: Profile
metadata: {{name: rollout}}
spec: {profile}
---
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {{name: adder, tenant: {TENANT}}}
spec: {{model: adder, profile: rollout{deployment}}}
"""


def model_doc(version: str, source: Path) -> str:
    return f"""
apiVersion: gpuvisor/v1
kind: Model
metadata: {{name: adder, tenant: {TENANT}}}
spec: {{version: "{version}", source: "{source}"}}
"""


def added(body: bytes) -> float:
    """What the answering version adds to x."""
    [out] = orjson.loads(body)["outputs"]
    return float(np.array(out["data"], dtype=np.float32)[0] - X[0, 0])


def gone(pid: int | None, timeout: float = 30.0) -> bool:
    """Whether the process ``pid`` has exited (waiting up to ``timeout`` for it to)."""
    deadline = time.monotonic() + timeout
    while pid is not None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ---- what clients see, through a real node -------------------------------------------------


def test_a_new_model_version_rolls_out_with_no_failed_request(
    demo_node: NodeProcess, tmp_path: Path
) -> None:
    one, two = model_files(tmp_path, adder_model(1.0), adder_model(2.0))
    demo_node.apply_as_admin(
        manifest("{memory: 512Mi, computeShare: 0.05}") + "---" + model_doc("1", one)
    )
    admin = httpx.Client(base_url=demo_node.url, headers=demo_node.auth(demo_node.admin_key))
    history: list[list[dict[str, Any]]] = []
    old = wait_for(admin, history, lambda s: [i["state"] for i in s] == ["Ready"])[0]
    assert old["id"] == REPLICA and old["model"] == "adder@1"

    key = demo_node.create_tenant_key(TENANT)
    body = json_infer_request({"x": X})
    answers: list[tuple[int, float | None]] = []
    stop = threading.Event()

    def client() -> None:
        # one request at a time: once the new version has answered, the old one never does
        with httpx.Client(base_url=demo_node.url, headers=demo_node.auth(key)) as http:
            while not stop.is_set():
                r = http.post("/v2/models/adder/infer", content=body, timeout=30)
                answers.append((r.status_code, added(r.content) if r.is_success else None))

    sender = threading.Thread(target=client)
    sender.start()
    try:
        while len(answers) < 20:
            time.sleep(0.01)
        demo_node.apply_as_admin(model_doc("2", two))
        history.clear()
        seen = wait_for(
            admin, history, lambda s: [(i["id"], i["state"]) for i in s] == [(SUCCESSOR, "Ready")]
        )
        settled = len(answers)
        while len(answers) < settled + 20:
            time.sleep(0.01)
    finally:
        stop.set()
        sender.join(timeout=60)
    admin.close()

    failed = [a for a in answers if a[0] != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed: {failed[:3]}"
    versions = [a[1] for a in answers]
    switch = versions.index(2.0)
    assert switch > 0 and set(versions[:switch]) == {1.0} and set(versions[switch:]) == {2.0}
    assert seen[0]["model"] == "adder@2" and seen[0]["replaces"] is None
    # while the new version loaded, both were listed: the old one Ready and saying why
    both = [h for h in history if len(h) == 2]
    assert both, history[:5]
    by_id = {i["id"]: i for i in both[0]}
    assert by_id[REPLICA]["state"] == "Ready", by_id
    assert by_id[REPLICA]["reason"] == (
        f"serving the previous spec until its replacement {SUCCESSOR} is Ready"
    )
    assert by_id[SUCCESSOR]["replaces"] == REPLICA
    assert by_id[SUCCESSOR]["model"] == "adder@2"
    assert gone(old["pid"]), "the old worker still runs"


def test_a_stalled_rollout_is_shown_as_updating_while_every_replica_serves(
    demo_node: NodeProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one, two = tmp_path / "paced-1.onnx", tmp_path / "paced-2.onnx"
    one.write_bytes(adder_model(1.0))
    two.write_bytes(b"not an onnx model")
    text = """
apiVersion: gpuvisor/v1
kind: Tenant
metadata: {name: paced}
---
apiVersion: gpuvisor/v1
kind: Profile
metadata: {name: paced}
spec: {memory: 256Mi, computeShare: 0.02}
---
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {name: scorer, tenant: paced}
spec: {model: scorer, profile: paced, replicas: 2}
"""
    model = "apiVersion: gpuvisor/v1\nkind: Model\nmetadata: {name: scorer, tenant: paced}\n"
    demo_node.apply_as_admin(text + f"---\n{model}spec: {{version: '1', source: '{one}'}}")
    admin = httpx.Client(base_url=demo_node.url, headers=demo_node.auth(demo_node.admin_key))

    def deployment() -> dict[str, Any]:
        body = admin.get("/api/v1/deployments/scorer", params={"tenant": "paced"}, timeout=30)
        status: dict[str, Any] = body.json()["status"]
        return status

    def in_dashboard() -> dict[str, Any]:
        view = admin.get("/api/v1/dashboard", timeout=30).json()
        [mine] = [d for d in view["deployments"] if d["tenant"] == "paced"]
        return mine  # type: ignore[no-any-return]

    deadline = time.monotonic() + 120
    while deployment()["readyReplicas"] < 2:
        assert time.monotonic() < deadline, deployment()
        time.sleep(0.05)
    assert (deployment()["updatedReplicas"], deployment()["rollout"]) == (2, "")
    assert in_dashboard()["state"] == "Ready"

    demo_node.apply_as_admin(f"{model}spec: {{version: '2', source: '{two}'}}")
    stalled = (
        "0 of 2 replica(s) updated; stalled on paced/scorer/0 (its new instance is Failed); "
        "1 waiting for their turn"
    )
    while deployment()["rollout"] != stalled:
        assert time.monotonic() < deadline + 60, deployment()
        time.sleep(0.05)
    status = deployment()
    assert (status["replicas"], status["readyReplicas"], status["updatedReplicas"]) == (2, 2, 0)
    view = in_dashboard()
    assert (view["state"], view["reason"], view["ready"], view["updated"]) == (
        "Updating",
        stalled,
        2,
        0,
    )
    # and in the terminal: one column more than READY says how far the update is
    monkeypatch.setenv("GPUVISOR_URL", demo_node.url)
    monkeypatch.setenv("GPUVISOR_STATE", str(demo_node.state_dir))
    monkeypatch.setenv("COLUMNS", "250")
    listed = CliRunner().invoke(app, ["get", "deployments"])
    assert listed.exit_code == 0, listed.output
    [row] = [line.split() for line in listed.output.splitlines() if " scorer " in line]
    assert row[:6] == ["paced", "scorer", "scorer", "paced", "2/2", "0/2"], row
    # version 1 still serves both replicas, though the deployment now asks for version 2:
    # it cannot be deleted under them (a restart would also bring it back)
    refused = admin.delete("/api/v1/models/scorer@1", params={"tenant": "paced"}, timeout=30)
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"].startswith(
        "Model scorer@1 still serves in paced/scorer/0, paced/scorer/1: a rolling update"
    ), refused.text
    admin.close()


def wait_for(
    admin: httpx.Client,
    history: list[list[dict[str, Any]]],
    done: Callable[[list[dict[str, Any]]], bool],
    timeout: float = 120.0,
) -> list[dict[str, Any]]:
    """Poll the tenant's slices (recording each listing in ``history``) until ``done`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        items = admin.get("/api/v1/slices", timeout=30).json()["items"]
        mine = [i for i in items if i["tenant"] == TENANT]
        history.append(mine)
        if done(mine):
            return mine
        assert time.monotonic() < deadline, mine
        time.sleep(0.02)


# ---- failure and fallback, with the controller in this process ------------------------------


def cpu_controller(db_url: str, text: str) -> contextlib.AbstractAsyncContextManager[Controller]:
    """A controller over one CPU device with 4 GiB to place slices in."""
    return running_controller(db_url, text, [discover_cpu(memory=4 << 30, threads=1)])


async def answer(ctl: Controller, slice_id: str) -> float:
    request = PendingRequest(1, TENANT, json_infer_request({"x": X}), -1, 0.0)
    [outcome], _ = await ctl.pool.run_batch(slice_id, [request])
    assert outcome.status == 200, outcome.body
    return added(outcome.body)


def test_a_replacement_that_fails_leaves_the_old_version_serving(
    sqlite_url: str, tmp_path: Path
) -> None:
    asyncio.run(failed_replacement(sqlite_url, tmp_path))


async def failed_replacement(db_url: str, tmp_path: Path) -> None:
    one, two = model_files(tmp_path, adder_model(1.0), b"not an onnx model")
    # the tenant's compute quota and the device hold one slice's share, not two: the new
    # version takes over the old one's share rather than adding to it
    text = manifest("{memory: 1Gi, computeShare: 0.75}", "{compute: 0.75}")
    async with cpu_controller(db_url, text + "---" + model_doc("1", one)) as ctl:
        await ctl.reconcile()
        await settle(ctl)
        old = ctl.slices[REPLICA]
        assert old.state == "Ready", old.reason

        apply_manifest(ctl.store, model_doc("2", two))
        await ctl.reconcile()
        new = ctl.slices[SUCCESSOR]
        assert (new.replaces, new.model_version, new.device_id) == (REPLICA, "2", "cpu-0")
        await settle(ctl)
        assert new.state == "Failed", (new.state, new.reason)
        await ctl.reconcile()  # the old one says why it still serves
        assert ctl.slices[REPLICA] is old and old.state == "Ready"
        assert old.reason == f"serving the previous spec: its replacement {SUCCESSOR} failed"
        assert ctl.ready_slices(TENANT, "adder") == [old]
        assert await answer(ctl, REPLICA) == 1.0

        # taken back (version 2 deleted): the failed replacement goes, the old one stays
        ctl.store.delete("Model", TENANT, "adder@2")
        await ctl.reconcile()
        await settle(ctl)
        assert [(s.id, s.state, s.reason) for s in ctl.slices.values()] == [(REPLICA, "Ready", "")]
        assert ctl.slices[REPLICA] is old

        # version 2 again, still broken: Failed beside the old one once more
        apply_manifest(ctl.store, model_doc("2", two))
        await ctl.reconcile()
        await settle(ctl)
        assert ctl.slices[SUCCESSOR].state == "Failed" and ctl.slices[REPLICA] is old

        # the file fixed: the replacement loads, takes over, and the old one stops
        two.write_bytes(adder_model(2.0))
        await ctl.reconcile()
        await settle(ctl)
        assert [(s.id, s.state) for s in ctl.slices.values()] == [(SUCCESSOR, "Ready")]
        assert ctl.slices[SUCCESSOR].replaces is None
        assert ctl.ready_slices(TENANT, "adder") == [ctl.slices[SUCCESSOR]]
        assert await answer(ctl, SUCCESSOR) == 2.0
        assert gone(old.worker_pid)

        # a third version goes back to the replica's own id
        three = tmp_path / "adder-3.onnx"
        three.write_bytes(adder_model(3.0))
        apply_manifest(ctl.store, model_doc("3", three))
        await ctl.reconcile()
        await settle(ctl)
        assert [(s.id, s.state) for s in ctl.slices.values()] == [(REPLICA, "Ready")]
        assert await answer(ctl, REPLICA) == 3.0


def test_without_room_for_both_the_slice_is_replaced_in_place(
    sqlite_url: str, tmp_path: Path
) -> None:
    asyncio.run(in_place(sqlite_url, tmp_path))


async def in_place(db_url: str, tmp_path: Path) -> None:
    one, two = model_files(tmp_path, adder_model(1.0), adder_model(2.0))
    # 3 GiB of the device's 4: the new version cannot load beside the old one
    text = manifest("{memory: 3Gi}") + "---" + model_doc("1", one)
    async with cpu_controller(db_url, text) as ctl:
        await ctl.reconcile()
        await settle(ctl)
        old = ctl.slices[REPLICA]
        assert old.state == "Ready", old.reason
        pid = old.worker_pid
        assert pid is not None

        apply_manifest(ctl.store, model_doc("2", two))
        await ctl.reconcile()
        [new] = ctl.slices.values()
        assert new is not old and new.id == REPLICA and new.model_version == "2"
        assert new.replaces is None
        assert new.reason.startswith(
            "no device had room for the new spec beside the old one; placed on cpu-0"
        ), new.reason
        assert gone(pid)
        await settle(ctl)
        assert new.state == "Ready", new.reason
        assert await answer(ctl, REPLICA) == 2.0
        # placement counted this as no failure to place
        failures = ctl.metrics.allocation_failures.labels("", TENANT, "adder", "unplaceable")
        assert failures._value.get() == 0


def test_the_version_served_is_that_of_the_ready_slice(sqlite_url: str, tmp_path: Path) -> None:
    """Between the new instance becoming Ready and the old one's removal, the old one is
    Stopping: a request for a version is checked against the new one, which answers it."""
    pool = WorkerPool()  # never started: its folder goes when it is closed
    store = Store(sqlite_url)
    try:
        node = Node(NodeOptions(state_dir=tmp_path / "state"))
        node.controller = Controller(store, Topology([]), pool, {}, Metrics())
        [dep] = load_documents(
            f"apiVersion: gpuvisor/v1\nkind: Deployment\n"
            f"metadata: {{name: adder, tenant: {TENANT}}}\nspec: {{model: adder, profile: p}}\n"
        )
        assert isinstance(dep, Deployment)
        node.controller._deployments[(TENANT, "adder")] = dep

        def instance(slice_id: str, version: str, state: str) -> SliceState:
            s = SliceState(
                slice_id,
                TENANT,
                "adder",
                0,
                version,
                "default",
                "p",
                0,
                0.0,
                "process",
                "standard",
                "adder",
                version,
                replica_id=REPLICA,
            )
            s.set_state(state)
            return s

        old, new = instance(REPLICA, "1", "Stopping"), instance(SUCCESSOR, "2", "Ready")
        node.controller._by_deployment[(TENANT, "adder")] = [old, new]
        principal = Principal(role="tenant", tenant=TENANT, key_id="k")
        assert node.model_version(dep) == "2"
        assert node.find_deployment(principal, "adder", "2") is dep
        with pytest.raises(NotFound, match="has no version '1' \\(it serves version '2'\\)"):
            node.find_deployment(principal, "adder", "1")
        # while the new one loads, the old one serves, and its version is the one
        old.set_state("Ready")
        new.set_state("Loading")
        assert node.model_version(dep) == "1"
        assert node.serving(dep, "2") == [] and node.serving(dep, "1") == []  # no queue yet
        # two replicas half-way through an update: each version is served, and a request
        # for one goes only to its instances
        other = instance(f"{TENANT}/adder/1", "1", "Ready")
        new.set_state("Ready")
        old.set_state("Stopping")
        node.controller._by_deployment[(TENANT, "adder")] = [old, new, other]
        assert node.model_versions(dep) == ["2", "1"]
        assert node.find_deployment(principal, "adder", "1") is dep
        with pytest.raises(
            NotFound, match="has no version '3' \\(it serves versions '2' and '1'\\)"
        ):
            node.find_deployment(principal, "adder", "3")
        for s in (new, other):
            s.queue = SliceQueue(s.id, s.tenant, "adder", "default", "p")
        assert node.serving(dep, "1") == [other] and node.serving(dep, "2") == [new]
        assert node.serving(dep, None) == [new, other]
    finally:
        asyncio.run(pool.close())
        store.close()


# ---- the pace: maxSurge replicas at a time -------------------------------------------------

REPLICAS = [f"{TENANT}/adder/{i}" for i in range(3)]


def test_replicas_are_replaced_one_at_a_time_and_every_one_serves_throughout(
    sqlite_url: str, tmp_path: Path
) -> None:
    asyncio.run(one_at_a_time(sqlite_url, tmp_path))


def test_max_surge_replaces_that_many_replicas_at_once(sqlite_url: str, tmp_path: Path) -> None:
    asyncio.run(two_at_a_time(sqlite_url, tmp_path))


def test_a_broken_version_stops_at_the_first_replica(sqlite_url: str, tmp_path: Path) -> None:
    asyncio.run(broken_version_stops(sqlite_url, tmp_path))


def three_replicas(tmp_path: Path, surge: int, second: bytes) -> tuple[str, Path]:
    one, two = model_files(tmp_path, adder_model(1.0), second)
    pace = f", replicas: 3, rollout: {{maxSurge: {surge}}}"
    return manifest("{memory: 512Mi}", deployment=pace) + "---" + model_doc("1", one), two


def waiting(first: str, surge: int) -> str:
    return f"serving the previous spec: waiting for its turn ({first} first; rollout.maxSurge: {surge})"


async def observe(ctl: Controller, seen: list[tuple[list[str], list[str]]]) -> None:
    """Record, every few milliseconds, which replicas load version 2 and which serve."""
    while True:
        loading, serving = [], []
        for rid in REPLICAS:
            instances = ctl.instances(rid)
            if any(s.model_version == "2" and s.state != "Ready" for s in instances):
                loading.append(rid)
            if any(s.state == "Ready" for s in instances):
                serving.append(rid)
        seen.append((loading, serving))
        await asyncio.sleep(0.002)


async def rolled_out(ctl: Controller, timeout: float = 120.0) -> None:
    """Wait, with no reconcile from the test, until every replica serves version 2."""
    deadline = time.monotonic() + timeout
    while not ctl.rollout(TENANT, "adder").done:
        assert time.monotonic() < deadline, [(s.id, s.state, s.reason) for s in ctl.slices.values()]
        await asyncio.sleep(0.02)
    await settle(ctl)


async def one_at_a_time(db_url: str, tmp_path: Path) -> None:
    text, two = three_replicas(tmp_path, 1, adder_model(2.0))
    async with cpu_controller(db_url, text) as ctl:
        await ctl.reconcile()
        await settle(ctl)
        assert [ctl.slices[r].state for r in REPLICAS] == ["Ready"] * 3

        apply_manifest(ctl.store, model_doc("2", two))
        seen: list[tuple[list[str], list[str]]] = []
        watcher = asyncio.create_task(observe(ctl, seen))
        await ctl.reconcile()
        # replica 0 loads its new version beside the old one; 1 and 2 wait for their turn
        assert ctl.slices[f"{REPLICAS[0]}#2"].replaces == REPLICAS[0]
        for rid in REPLICAS[1:]:
            [old] = ctl.instances(rid)
            assert (old.state, old.reason) == ("Ready", waiting(REPLICAS[0], 1))
        progress = ctl.rollout(TENANT, "adder")
        assert (progress.replicas, progress.ready, progress.updated) == (3, 3, 0)
        assert progress.describe() == (
            f"0 of 3 replica(s) updated; replacing {REPLICAS[0]}; 2 waiting for their turn"
        )
        # each next turn comes when the replica before it is Ready, with no reconcile asked
        await rolled_out(ctl)
        watcher.cancel()

        assert max(len(loading) for loading, _ in seen) == 1  # never two at once
        assert [rid for rid in REPLICAS if any(rid in loading for loading, _ in seen)] == REPLICAS
        assert all(serving == REPLICAS for _, serving in seen)  # no replica ever without one
        for rid in REPLICAS:
            [new] = ctl.instances(rid)
            assert (new.model_version, new.state, new.reason) == ("2", "Ready", "")
            assert await answer(ctl, new.id) == 2.0


async def two_at_a_time(db_url: str, tmp_path: Path) -> None:
    text, two = three_replicas(tmp_path, 2, adder_model(2.0))
    async with cpu_controller(db_url, text) as ctl:
        await ctl.reconcile()
        await settle(ctl)
        apply_manifest(ctl.store, model_doc("2", two))
        await ctl.reconcile()
        assert ctl.rollout(TENANT, "adder").replacing == REPLICAS[:2]
        [old] = ctl.instances(REPLICAS[2])
        assert old.reason == waiting(f"{REPLICAS[0]}, {REPLICAS[1]}", 2)
        await rolled_out(ctl)
        assert {s.model_version for s in ctl.slices.values()} == {"2"}
        assert len(ctl.slices) == 3


async def broken_version_stops(db_url: str, tmp_path: Path) -> None:
    text, two = three_replicas(tmp_path, 1, b"not an onnx model")
    async with cpu_controller(db_url, text) as ctl:
        await ctl.reconcile()
        await settle(ctl)
        apply_manifest(ctl.store, model_doc("2", two))
        await ctl.reconcile()
        await settle(ctl)
        await ctl.reconcile()
        # the first replacement failed and holds its turn: the others were never touched
        assert ctl.slices[f"{REPLICAS[0]}#2"].state == "Failed"
        for rid in REPLICAS[1:]:
            [old] = ctl.instances(rid)
            assert (old.model_version, old.state) == ("1", "Ready")
            assert old.reason == waiting(REPLICAS[0], 1)
        assert [s.model_version for s in ctl.ready_slices(TENANT, "adder")] == ["1"] * 3
        progress = ctl.rollout(TENANT, "adder")
        assert (progress.ready, progress.updated, progress.replacing) == (3, 0, [REPLICAS[0]])
        assert progress.describe() == (
            f"0 of 3 replica(s) updated; stalled on {REPLICAS[0]} (its new instance is Failed); "
            "2 waiting for their turn"
        )

        # the file fixed: the update goes on, replica by replica, to the end
        two.write_bytes(adder_model(2.0))
        await ctl.reconcile()
        await rolled_out(ctl)
        assert sorted((s.id, s.model_version) for s in ctl.slices.values()) == [
            (f"{REPLICAS[0]}#2", "2"),
            (f"{REPLICAS[1]}#2", "2"),
            (f"{REPLICAS[2]}#2", "2"),
        ]


def test_a_replica_there_was_never_room_for_does_not_hold_up_the_update(
    sqlite_url: str, tmp_path: Path
) -> None:
    asyncio.run(never_placed(sqlite_url, tmp_path))


async def never_placed(db_url: str, tmp_path: Path) -> None:
    one, two = model_files(tmp_path, adder_model(1.0), adder_model(2.0))
    # two of the three replicas fit the 4 GiB device, and no new instance fits beside an old
    text = manifest("{memory: 1536Mi}", deployment=", replicas: 3") + "---" + model_doc("1", one)
    async with cpu_controller(db_url, text) as ctl:
        await ctl.reconcile()
        await settle(ctl)
        assert [ctl.slices[r].state for r in REPLICAS] == ["Ready", "Ready", "Pending"]

        apply_manifest(ctl.store, model_doc("2", two))
        seen: list[tuple[list[str], list[str]]] = []
        watcher = asyncio.create_task(observe(ctl, seen))
        await ctl.reconcile()
        # replaced in place, one at a time; the Pending replica took no one's place
        deadline = time.monotonic() + 120
        while sorted(s.model_version for s in ctl.ready_slices(TENANT, "adder")) != ["2", "2"]:
            assert time.monotonic() < deadline, [
                (s.id, s.state, s.reason) for s in ctl.slices.values()
            ]
            await asyncio.sleep(0.02)
        watcher.cancel()
        assert all(serving for _, serving in seen)  # one replica served throughout
        assert ctl.slices[REPLICAS[2]].state == "Pending"
        progress = ctl.rollout(TENANT, "adder")
        assert (progress.ready, progress.updated, progress.replacing) == (2, 2, [])


def test_a_new_spec_that_fits_nowhere_leaves_the_old_instance_serving_and_holds_its_turn(
    sqlite_url: str, tmp_path: Path
) -> None:
    asyncio.run(unplaceable_spec(sqlite_url, tmp_path))


async def unplaceable_spec(db_url: str, tmp_path: Path) -> None:
    [one] = model_files(tmp_path, adder_model(1.0))
    two_replicas = ", replicas: 2"
    text = manifest("{memory: 1Gi}", deployment=two_replicas) + "---" + model_doc("1", one)
    async with cpu_controller(db_url, text) as ctl:
        await ctl.reconcile()
        await settle(ctl)
        first, second = REPLICAS[:2]
        old_first, old_second = ctl.slices[first], ctl.slices[second]
        # a profile larger than the device: replica 0's new instance fits nowhere, not even in
        # its old instance's place, so that one is not stopped and serves on; replica 1 waits
        apply_manifest(ctl.store, manifest("{memory: 5Gi}", deployment=two_replicas))
        await ctl.reconcile()
        await settle(ctl)
        await ctl.reconcile()
        new_first = ctl.slices[f"{first}#2"]
        assert (new_first.state, new_first.took_over) == ("Pending", False), new_first.reason
        assert new_first.reason == (
            "no device has room for the new spec now, even in the old instance's place "
            f"({first} serves the old spec meanwhile; placed again at every reconcile)"
        )
        assert ctl.slices[first] is old_first and old_first.state == "Ready"
        assert old_first.reason.endswith(f"its replacement {first}#2 fits on no device")
        assert ctl.slices[second] is old_second and old_second.state == "Ready"
        assert old_second.reason == waiting(first, 1)
        assert ctl.ready_slices(TENANT, "adder") == [old_first, old_second]
        assert ctl.rollout(TENANT, "adder").stalled == {first: "Pending"}

        # the profile back as it was: both old instances fit it again, the new one is dropped
        apply_manifest(ctl.store, manifest("{memory: 1Gi}", deployment=two_replicas))
        await ctl.reconcile()
        await settle(ctl)
        assert ctl.slices[second] is old_second and old_second.reason == ""
        assert ctl.instances(first) == [old_first] and old_first.reason == ""
        assert ctl.rollout(TENANT, "adder").done


def test_an_instance_stopped_while_it_loads_never_serves_nor_retires_the_old_one(
    sqlite_url: str, tmp_path: Path
) -> None:
    asyncio.run(superseded_while_loading(sqlite_url, tmp_path))


async def superseded_while_loading(db_url: str, tmp_path: Path) -> None:
    """Version 2 (slow to load) is superseded by version 3 while it loads: it stops, and
    must neither turn Ready nor retire version 1, which serves until version 3 is Ready."""
    one, two, three = model_files(tmp_path, adder_model(1.0), slow_model(200_000), adder_model(3.0))
    text = manifest("{memory: 512Mi, computeShare: 0.2}")
    async with cpu_controller(db_url, text + "---" + model_doc("1", one)) as ctl:
        await ctl.reconcile()
        await settle(ctl)
        old = ctl.slices[REPLICA]
        assert old.state == "Ready", old.reason
        serving_gaps: list[float] = []
        stop = asyncio.Event()

        async def watch() -> None:
            while not stop.is_set():
                if not ctl.ready_slices(TENANT, "adder"):
                    serving_gaps.append(asyncio.get_running_loop().time())
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        apply_manifest(ctl.store, model_doc("2", two))
        await ctl.reconcile()
        second = ctl.slices[SUCCESSOR]
        assert second.model_version == "2" and second.state == "Loading"
        await asyncio.sleep(0.3)  # version 2 is loading
        apply_manifest(ctl.store, model_doc("3", three))
        await ctl.reconcile()
        await settle(ctl)
        await asyncio.sleep(0.5)  # time for a stopped load to finish, were it to go on
        stop.set()
        await watcher
        assert second.state == "Stopping", (second.state, second.reason)
        assert second.queue is None, "a stopped instance never joined its device's dispatcher"
        [(final, state, version)] = [(s.id, s.state, s.model_version) for s in ctl.slices.values()]
        assert (state, version) == ("Ready", "3"), (final, state, version)
        assert not serving_gaps, "the replica served throughout"
        assert await answer(ctl, final) == 3.0


def test_no_in_place_replacement_for_room_that_slices_still_loading_hold(
    sqlite_url: str, tmp_path: Path
) -> None:
    asyncio.run(in_place_waits_for_loads(sqlite_url, tmp_path))


async def in_place_waits_for_loads(db_url: str, tmp_path: Path) -> None:
    """Version 2 does not fit beside version 1 while another slice loads (it may yet give its
    room back): version 1 serves on, and the choice is made once that load is done."""
    one, two, slow = model_files(tmp_path, adder_model(1.0), adder_model(2.0), slow_model(150_000))
    other = f"""
---
apiVersion: gpuvisor/v1
kind: Model
metadata: {{name: slow, tenant: {TENANT}}}
spec: {{source: "{slow}"}}
---
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {{name: slow, tenant: {TENANT}}}
spec: {{model: slow, profile: rollout}}
"""
    text = manifest("{memory: 400Mi}") + "---" + model_doc("1", one)
    devices = [discover_cpu(memory=1 << 30, threads=1)]
    async with running_controller(db_url, text, devices) as ctl:
        await ctl.reconcile()
        await settle(ctl)
        old = ctl.slices[REPLICA]
        assert old.state == "Ready", old.reason
        apply_manifest(ctl.store, other)
        await ctl.reconcile()
        assert ctl.slices[f"{TENANT}/slow/0"].state == "Loading"
        apply_manifest(ctl.store, model_doc("2", two))
        await ctl.reconcile()
        new = ctl.slices[SUCCESSOR]
        assert (old.state, new.state) == ("Ready", "Pending"), (old.reason, new.reason)
        assert "while 1 slice(s) load" in new.reason, new.reason
        await settle(ctl)  # the slow slice is Ready: there is no room beside, so in place
        await ctl.reconcile()
        await settle(ctl)
        serving = ctl.ready_slices(TENANT, "adder")
        assert [s.model_version for s in serving] == ["2"], [(s.id, s.state) for s in serving]
