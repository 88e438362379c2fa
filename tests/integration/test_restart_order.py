"""A node that starts again gives the room back to what served before it stopped: a
deployment that waited for room, however its name sorts, does not take it. Real workers,
a real store, two controllers in this process one after the other, as two node starts."""

from __future__ import annotations

import asyncio
from pathlib import Path

from controllers import apply_manifest, running_controller, settle

from gpuvisor.demo.models import build_demo_models
from gpuvisor.inventory.cpu import discover_cpu
from gpuvisor.store.repo import Store

TENANT_AND_PROFILE = """
apiVersion: gpuvisor/v1
kind: Tenant
metadata: {name: shop}
---
apiVersion: gpuvisor/v1
kind: Profile
metadata: {name: most}
spec: {memory: 600Mi}
---
apiVersion: gpuvisor/v1
kind: Model
metadata: {name: scorer, tenant: shop}
spec: {source: MODEL}
"""

SERVING = """
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {name: zz-serving, tenant: shop}
spec: {model: scorer, profile: most}
"""

# sorts first, and there is room for one of the two
WAITING = """
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {name: aa-waiting, tenant: shop}
spec: {model: scorer, profile: most}
"""


def test_what_served_before_a_restart_gets_its_room_back_first(
    sqlite_url: str, tmp_path: Path
) -> None:
    asyncio.run(restart_order(sqlite_url, tmp_path))


async def restart_order(db_url: str, tmp_path: Path) -> None:
    model = build_demo_models(tmp_path)["basket-scorer"]
    devices = [discover_cpu(memory=1 << 30, threads=1)]
    base = TENANT_AND_PROFILE.replace("MODEL", str(model))
    async with running_controller(db_url, base + "---" + SERVING, devices) as ctl:
        await ctl.reconcile()
        await settle(ctl)
        assert ctl.slices["shop/zz-serving/0"].state == "Ready"
        store = Store(db_url)
        try:
            apply_manifest(store, WAITING)
        finally:
            store.close()
        await ctl.reconcile()
        await settle(ctl)
        assert ctl.slices["shop/aa-waiting/0"].state == "Pending"
    # the node starts again on the same database
    async with running_controller(db_url, "", devices) as ctl:
        await ctl.reconcile()
        await settle(ctl)
        states = {sid: (s.state, s.reason) for sid, s in ctl.slices.items()}
        assert states["shop/zz-serving/0"][0] == "Ready", states
        assert states["shop/aa-waiting/0"][0] == "Pending", states
