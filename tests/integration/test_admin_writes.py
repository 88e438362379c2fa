"""Writes through the admin API hold together: concurrent applies and deletes are checked
against what is stored when they commit, a deleted tenant's keys stop working, and a few
objects that used to be handled loosely (a tenant's pools, a model's versions, the default
pool, the last admin key) are refused or resolved with a clear answer."""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from in_process import node_in_this_process

from gpuvisor.launch import NodeProcess
from gpuvisor.store.repo import Store

MODEL_FILE = "demo/models/basket-scorer.onnx"


def _apply(node: NodeProcess, manifest: str, key: str | None = None) -> httpx.Response:
    return httpx.post(
        f"{node.url}/api/v1/apply",
        headers=node.auth(key or node.admin_key),
        content=manifest,
        timeout=60,
    )


def _delete(node: NodeProcess, path: str, key: str | None = None) -> httpx.Response:
    return httpx.delete(
        f"{node.url}/api/v1/{path}", headers=node.auth(key or node.admin_key), timeout=60
    )


def _tenant_with_model(node: NodeProcess, tenant: str, quota: str = "{}") -> None:
    source = node.state_dir / MODEL_FILE
    node.apply_as_admin(
        f"""
apiVersion: gpuvisor/v1
kind: Tenant
metadata: {{name: {tenant}}}
spec: {{quota: {quota}}}
---
apiVersion: gpuvisor/v1
kind: Model
metadata: {{name: scorer, tenant: {tenant}}}
spec: {{version: "1", source: {source}}}
"""
    )


def _deployment(tenant: str, name: str, profile: str = "rt-small", pool: str = "") -> str:
    pool_line = f", pool: {pool}" if pool else ""
    return f"""
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {{name: {name}, tenant: {tenant}}}
spec: {{model: scorer, profile: {profile}, replicas: 0{pool_line}}}
"""


def test_concurrent_applies_cannot_exceed_a_quota_together(demo_node: NodeProcess) -> None:
    _tenant_with_model(demo_node, "racer", "{deployments: 1}")
    manifests = [_deployment("racer", f"race{i}") for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda m: _apply(demo_node, m), manifests))
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] + [403] * 7, [a.text for a in answers]
    listed = httpx.get(
        f"{demo_node.url}/api/v1/deployments?tenant=racer",
        headers=demo_node.auth(demo_node.admin_key),
        timeout=30,
    ).json()["items"]
    assert len(listed) == 1


def test_a_delete_beside_an_apply_never_leaves_a_dangling_reference(
    demo_node: NodeProcess,
) -> None:
    _tenant_with_model(demo_node, "refs")
    for attempt in range(4):
        profile = f"short-lived-{attempt}"
        demo_node.apply_as_admin(
            f"""
apiVersion: gpuvisor/v1
kind: Profile
metadata: {{name: {profile}}}
spec: {{memory: 64Mi, computeShare: 0.01}}
"""
        )
        with ThreadPoolExecutor(2) as pool:
            applied = pool.submit(_apply, demo_node, _deployment("refs", "user", profile))
            deleted = pool.submit(_delete, demo_node, f"profiles/{profile}")
        outcomes = (applied.result().status_code, deleted.result().status_code)
        # one of the two went first: the apply (then the profile is in use: 409) or the
        # delete (then the apply names a profile that is gone: 400)
        assert outcomes in ((200, 409), (400, 200)), (
            applied.result().text,
            deleted.result().text,
        )
        if outcomes == (200, 409):
            assert _delete(demo_node, "deployments/user?tenant=refs").status_code == 200
            assert _delete(demo_node, f"profiles/{profile}").status_code == 200


def test_deleting_a_tenant_revokes_its_keys(demo_node: NodeProcess) -> None:
    _tenant_with_model(demo_node, "leaving")
    key = demo_node.create_tenant_key("leaving")
    me = httpx.get(f"{demo_node.url}/api/v1/status", headers=demo_node.auth(key), timeout=30)
    assert me.status_code == 200
    assert _delete(demo_node, "models/scorer@1?tenant=leaving").status_code == 200
    assert _delete(demo_node, "tenants/leaving").status_code == 200
    after = httpx.get(f"{demo_node.url}/api/v1/status", headers=demo_node.auth(key), timeout=30)
    assert after.status_code == 401
    assert "was revoked" in after.json()["error"]
    records = httpx.get(
        f"{demo_node.url}/api/v1/audit?action=key.revoke",
        headers=demo_node.auth(demo_node.admin_key),
        timeout=30,
    ).json()["items"]
    assert any(r["reason"] == "revoked: tenant 'leaving' was deleted" for r in records), records
    # its keys went first: a node stopping in between could not leave them valid
    [revoked] = [r for r in records if r["reason"] == "revoked: tenant 'leaving' was deleted"]
    deletes = httpx.get(
        f"{demo_node.url}/api/v1/audit?action=delete",
        headers=demo_node.auth(demo_node.admin_key),
        timeout=30,
    ).json()["items"]
    [deleted] = [
        r for r in deletes if (r["object_kind"], r["object_name"]) == ("Tenant", "leaving")
    ]
    assert revoked["seq"] < deleted["seq"]


def test_a_key_created_while_its_tenant_is_deleted_never_outlives_it(
    demo_node: NodeProcess,
) -> None:
    """A key is created for the tenant (which then revokes it as it goes) or refused (the
    tenant is gone): never created valid after the delete listed the tenant's keys, to open
    a tenant created later under the same name."""
    admin = demo_node.auth(demo_node.admin_key)
    survivors = []
    for attempt in range(10):
        tenant = f"brief-{attempt}"
        demo_node.apply_as_admin(
            f"apiVersion: gpuvisor/v1\nkind: Tenant\nmetadata: {{name: {tenant}}}\n"
        )

        def create(_: int, tenant: str = tenant) -> httpx.Response:
            body = {"role": "tenant", "tenant": tenant}
            return httpx.post(f"{demo_node.url}/api/v1/keys", headers=admin, json=body, timeout=30)

        with ThreadPoolExecutor(4) as pool:
            created = [pool.submit(create, i) for i in range(3)]
            deleted = pool.submit(_delete, demo_node, f"tenants/{tenant}")
        assert deleted.result().status_code == 200, deleted.result().text
        keys = [a.json()["key"] for a in (c.result() for c in created) if a.status_code == 201]
        refused = [a for a in (c.result() for c in created) if a.status_code != 201]
        assert all("does not exist" in a.text for a in refused), [a.text for a in refused]
        demo_node.apply_as_admin(
            f"apiVersion: gpuvisor/v1\nkind: Tenant\nmetadata: {{name: {tenant}}}\n"
        )
        for key in keys:
            answer = httpx.get(f"{demo_node.url}/api/v1/status", headers=demo_node.auth(key))
            if answer.status_code != 401:
                survivors.append((tenant, answer.status_code))
        assert _delete(demo_node, f"tenants/{tenant}").status_code == 200
    assert survivors == []


def test_a_tenants_pools_cannot_leave_out_its_deployments_pool(demo_node: NodeProcess) -> None:
    _tenant_with_model(demo_node, "pooled")
    assert _apply(demo_node, _deployment("pooled", "d1", pool="inference")).status_code == 200
    demo_node.apply_as_admin(
        """
apiVersion: gpuvisor/v1
kind: Pool
metadata: {name: elsewhere}
spec: {selector: {}}
"""
    )
    narrowed = """
apiVersion: gpuvisor/v1
kind: Tenant
metadata: {name: pooled}
spec: {pools: [elsewhere]}
"""
    refused = _apply(demo_node, narrowed)
    assert refused.status_code == 400, refused.text
    assert "leaves out pool 'inference' of its Deployment 'd1'" in refused.json()["error"]
    # moving the deployment in the same apply is fine
    moved = _apply(demo_node, narrowed + "---" + _deployment("pooled", "d1", pool="elsewhere"))
    assert moved.status_code == 200, moved.text


def test_a_model_named_without_its_version_must_be_one_version(demo_node: NodeProcess) -> None:
    _tenant_with_model(demo_node, "versioned")
    source = demo_node.state_dir / MODEL_FILE
    demo_node.apply_as_admin(
        f"""
apiVersion: gpuvisor/v1
kind: Model
metadata: {{name: scorer, tenant: versioned}}
spec: {{version: "2", source: {source}}}
"""
    )
    root = demo_node.auth(demo_node.admin_key)
    url = f"{demo_node.url}/api/v1/models/scorer?tenant=versioned"
    for answer in (httpx.get(url, headers=root), httpx.delete(url, headers=root)):
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"] == (
            "model 'scorer' has versions 1, 2: name one as scorer@VERSION"
        )
    assert _delete(demo_node, "models/scorer@2?tenant=versioned").status_code == 200
    one = httpx.get(url, headers=root, timeout=30)
    assert one.status_code == 200 and one.json()["spec"]["version"] == "1"


def test_an_applied_default_pool_can_be_deleted_back_to_the_implicit_one(
    demo_node: NodeProcess,
) -> None:
    demo_node.apply_as_admin(
        """
apiVersion: gpuvisor/v1
kind: Pool
metadata: {name: default}
spec: {selector: {}, scheduler: best-effort}
"""
    )
    _tenant_with_model(demo_node, "defaulted")
    assert _apply(demo_node, _deployment("defaulted", "d")).status_code == 200
    answer = _delete(demo_node, "pools/default")
    assert answer.status_code == 200, answer.text
    pool = httpx.get(
        f"{demo_node.url}/api/v1/pools/default",
        headers=demo_node.auth(demo_node.admin_key),
        timeout=30,
    ).json()
    assert pool["metadata"]["name"] == "default"  # the implicit one again


def test_a_key_lifetime_beyond_any_date_is_refused(demo_node: NodeProcess) -> None:
    root = demo_node.auth(demo_node.admin_key)
    for lifetime in ("100000000h", "9999999999999999999999s"):
        answer = httpx.post(
            f"{demo_node.url}/api/v1/keys",
            headers=root,
            json={"role": "operator", "expiresIn": lifetime},
            timeout=30,
        )
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"] == (
            f"expiresIn (--expires-in) {lifetime!r} is longer than 100 years (876000h): give a "
            "shorter lifetime, or none for a key that does not expire"
        )


def test_a_database_another_process_holds_locked_is_a_503_and_inference_goes_on(
    demo_node: NodeProcess,
) -> None:
    """A sqlite3 shell (or a backup) holding the write lock past the busy timeout: the write
    is refused with 503 and Retry-After, nothing changes, inference is not held up, and the
    log has one warning, not a traceback."""
    admin = demo_node.auth(demo_node.admin_key)
    holder = sqlite3.connect(demo_node.state_dir / "gpuvisor.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        answer = httpx.post(
            f"{demo_node.url}/api/v1/devices/cpu-0/cordon", headers=admin, timeout=60
        )
        inference = httpx.post(
            f"{demo_node.url}/v2/models/basket-scorer/infer",
            headers=demo_node.auth(demo_node.tenant_key("analytics")),
            json={
                "inputs": [
                    {"name": "features", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}
                ]
            },
            timeout=30,
        )
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert answer.status_code == 503, answer.text
    assert answer.headers["retry-after"] == "1"
    assert answer.json()["error"].startswith(
        "the database is busy: another process holds its write lock, and nothing was changed"
    )
    assert inference.status_code == 200, inference.text
    with Store(f"sqlite:///{demo_node.state_dir / 'gpuvisor.db'}") as store:
        assert store.list_cordons() == []
    log = (demo_node.state_dir / "node.log").read_text()
    assert "the database is locked by another process; answered 503" in log
    assert "Exception in ASGI application" not in log


def test_the_last_valid_admin_key_cannot_be_revoked(demo_node: NodeProcess) -> None:
    root = demo_node.auth(demo_node.admin_key)
    keys = httpx.get(f"{demo_node.url}/api/v1/keys", headers=root, timeout=30).json()["items"]
    admins = [k["id"] for k in keys if k["role"] == "admin" and k["revoked_at"] is None]
    assert len(admins) == 1, keys  # the bootstrap key
    refused = _delete(demo_node, f"keys/{admins[0]}")
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"] == (
        f"{admins[0]} is the node's last valid admin key: create another first "
        "(gpuvisor keys create --role admin), then revoke this one"
    )
    created = httpx.post(
        f"{demo_node.url}/api/v1/keys", headers=root, json={"role": "admin"}, timeout=30
    )
    assert created.status_code == 201
    # with a second admin key the first may go, revoked by the second
    answer = _delete(demo_node, f"keys/{admins[0]}", key=created.json()["key"])
    assert answer.status_code == 200, answer.text


def test_two_admins_revoking_each_other_at_once_leave_one(tmp_path: Path) -> None:
    """Each request saw the other's key valid: both were revoked and no admin was left until
    the node restarted. One of them must be refused as the last admin key."""

    async def scenario() -> list[int]:
        async with node_in_this_process(tmp_path / "state") as (_, client, first):
            made = await client.post("/api/v1/keys", headers=first, json={"role": "admin"})
            second = {"Authorization": f"Bearer {made.json()['key']}"}
            listed = (await client.get("/api/v1/keys", headers=first)).json()["items"]
            [bootstrap] = [k["id"] for k in listed if k["id"] != made.json()["id"]]
            ids = {"first": bootstrap, "second": made.json()["id"]}
            answers = await asyncio.gather(
                client.delete(f"/api/v1/keys/{ids['second']}", headers=first),
                client.delete(f"/api/v1/keys/{ids['first']}", headers=second),
            )
            valid = [
                (await client.get("/api/v1/status", headers=h)).status_code for h in (first, second)
            ]
            assert 200 in valid, valid
            return sorted(a.status_code for a in answers)

    assert asyncio.run(scenario()) == [200, 409]
