"""Changes that overtake each other: a deployment deleted while its worker starts, one
deleted and applied again after an unload. Real workers, a real store, the controller in
this process."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from controllers import apply_manifest, running_controller, settle

from gpuvisor.control.controller import Controller
from gpuvisor.demo.models import build_demo_models
from gpuvisor.inventory.cpu import discover_cpu

MANIFEST = """
apiVersion: gpuvisor/v1
kind: Tenant
metadata: {name: acme}
---
apiVersion: gpuvisor/v1
kind: Profile
metadata: {name: small}
spec: {memory: 256Mi, computeShare: 0.05}
---
apiVersion: gpuvisor/v1
kind: Model
metadata: {name: scorer, tenant: acme}
spec: {source: MODEL}
"""

DEPLOYMENT = """
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {name: tmp, tenant: acme}
spec: {model: scorer, profile: small}
"""


def test_a_deployment_deleted_while_its_worker_starts_leaves_no_worker(
    sqlite_url: str, tmp_path: Path
) -> None:
    asyncio.run(deleted_while_starting(sqlite_url, tmp_path))


def _controller(
    db_url: str, tmp_path: Path, more: str = ""
) -> contextlib.AbstractAsyncContextManager[Controller]:
    model = build_demo_models(tmp_path)["basket-scorer"]
    text = MANIFEST.replace("MODEL", str(model)) + more
    return running_controller(db_url, text, [discover_cpu(memory=4 << 30, threads=1)])


async def deleted_while_starting(db_url: str, tmp_path: Path) -> None:
    async with _controller(db_url, tmp_path) as ctl:
        for _ in range(3):
            apply_manifest(ctl.store, DEPLOYMENT)
            await ctl.reconcile()  # its worker process is starting
            ctl.store.delete("Deployment", "acme", "tmp")
            await ctl.reconcile()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while ctl.pool.workers:  # a started worker with no slice is stopped
            assert loop.time() < deadline, list(ctl.pool.workers)
            await asyncio.sleep(0.05)
        assert not ctl.slices


def test_deleting_an_unloaded_deployment_forgets_the_unload(
    sqlite_url: str, tmp_path: Path
) -> None:
    asyncio.run(unload_then_delete(sqlite_url, tmp_path))


async def unload_then_delete(db_url: str, tmp_path: Path) -> None:
    async with _controller(db_url, tmp_path, "---" + DEPLOYMENT) as ctl:
        await ctl.reconcile()
        await settle(ctl)
        await ctl.unload("acme", "tmp")
        await settle(ctl)
        assert not ctl.deployment_slices("acme", "tmp")
        ctl.store.delete("Deployment", "acme", "tmp")
        await ctl.reconcile()
        apply_manifest(ctl.store, DEPLOYMENT)  # the same name, applied again: it serves
        await ctl.reconcile()
        await settle(ctl)
        assert [s.state for s in ctl.deployment_slices("acme", "tmp")] == ["Ready"]
