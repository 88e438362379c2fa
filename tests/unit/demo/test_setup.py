"""The demo's first start: its manifests pass the checks of an apply and are on the audit
record with the keys it makes; a later start changes nothing."""

from __future__ import annotations

from pathlib import Path

from gpuvisor.demo.setup import prepare_demo
from gpuvisor.security.keys import KeyRing
from gpuvisor.store.audit import NODE_ROLE
from gpuvisor.store.repo import Store


def test_the_demo_is_applied_once_and_on_the_audit_record(sqlite_url: str, tmp_path: Path) -> None:
    with Store(sqlite_url) as store:
        keys = KeyRing(store)
        demo = prepare_demo(tmp_path, store, keys)
        objects = {(o.kind, o.tenant, o.name) for o in store.list()}
        records = store.audit.list()
        applied = {(r.object_kind, r.tenant, r.object_name) for r in records if r.action == "apply"}
        assert applied == objects and len(objects) >= 8
        # made by the node itself: no key, the node's own role
        assert all(r.result == "ok" and (r.actor, r.role) == ("", NODE_ROLE) for r in records)
        assert all(
            "the demo, on the node's first start" in r.reason
            for r in records
            if r.action == "apply"
        )
        tenant_keys = demo.tenant_keys()
        made = {r.tenant: r.object_name for r in records if r.action == "key.create"}
        assert set(made) == set(tenant_keys) and len(made) >= 2
        for tenant, secret in tenant_keys.items():
            assert secret.startswith(made[tenant])  # gvk_<id>_…: the record names this key
            assert keys.authenticate(secret).tenant == tenant
        assert store.audit.verify().ok

        prepare_demo(tmp_path, store, keys)  # a later start: nothing new
        assert store.audit.verify().records == len(records)
