"""The demo's first start: its manifests pass the checks of an apply and are on the audit
record with the keys it makes; a later start changes nothing."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import delete

from gpuvisor.demo.setup import DEMO_FACT, prepare_demo
from gpuvisor.security.keys import KeyRing
from gpuvisor.store.audit import NODE_ROLE
from gpuvisor.store.repo import Store
from gpuvisor.store.tables import NodeFactRow


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


def _changed_by_the_operator(store: Store) -> set[tuple[str, str, str]]:
    store.delete("Deployment", "analytics", "basket-scorer")
    return {(o.kind, o.tenant, o.name) for o in store.list()}


def test_a_deleted_keys_file_does_not_bring_the_demo_back(sqlite_url: str, tmp_path: Path) -> None:
    with Store(sqlite_url) as store:
        keys = KeyRing(store)
        demo = prepare_demo(tmp_path, store, keys)
        objects = _changed_by_the_operator(store)
        demo.keys_file.unlink()  # the keys were handed out; the file is gone
        records = store.audit.verify().records

        again = prepare_demo(tmp_path, store, keys)
        assert {(o.kind, o.tenant, o.name) for o in store.list()} == objects
        assert store.audit.verify().records == records  # nothing applied, no key made
        assert again.tenant_keys() == {} and again.keys_written_to == demo.keys_file


def test_another_state_directory_on_the_same_database_does_not_apply_the_demo_again(
    sqlite_url: str, tmp_path: Path
) -> None:
    with Store(sqlite_url) as store:
        keys = KeyRing(store)
        first = prepare_demo(tmp_path / "first", store, keys)
        objects = _changed_by_the_operator(store)
        second = prepare_demo(tmp_path / "second", store, keys)
        assert {(o.kind, o.tenant, o.name) for o in store.list()} == objects
        # the models still point at the first state directory's files
        sources = {o.body["spec"]["source"] for o in store.list("Model")}
        assert all(s.startswith(str(first.models)) for s in sources), sources
        assert not second.keys_file.exists() and second.keys_written_to == first.keys_file


def test_a_database_from_before_the_fact_keeps_what_the_operator_changed(
    sqlite_url: str, tmp_path: Path
) -> None:
    with Store(sqlite_url) as store:
        keys = KeyRing(store)
        prepare_demo(tmp_path, store, keys)
        objects = _changed_by_the_operator(store)
    with Store(sqlite_url) as store:  # as gpuvisor left it before it kept the fact
        store._write(lambda s: s.execute(delete(NodeFactRow)))
        assert store.get_fact(DEMO_FACT) is None
        prepare_demo(tmp_path, store, KeyRing(store))
        assert {(o.kind, o.tenant, o.name) for o in store.list()} == objects
        assert store.get_fact(DEMO_FACT) == str(tmp_path / "demo" / "tenant-keys.json")


def test_a_database_from_before_the_fact_used_from_another_state_directory_keeps_it(
    sqlite_url: str, tmp_path: Path
) -> None:
    """No fact and no keys file here (the demo was applied from elsewhere, before the store
    kept the fact): the database holds objects, so the demo is not applied over them."""
    with Store(sqlite_url) as store:
        keys = KeyRing(store)
        prepare_demo(tmp_path / "old", store, keys)
        objects = _changed_by_the_operator(store)
        key_count = len(keys.list())
    with Store(sqlite_url) as store:
        store._write(lambda s: s.execute(delete(NodeFactRow)))
        prepare_demo(tmp_path / "new", store, KeyRing(store))
        assert {(o.kind, o.tenant, o.name) for o in store.list()} == objects
        assert len(KeyRing(store).list()) == key_count, "no demo keys made again"
        assert not (tmp_path / "new" / "demo" / "tenant-keys.json").exists()


def test_up_says_where_the_demo_keys_went_when_they_are_not_in_its_state_directory(
    sqlite_url: str, tmp_path: Path
) -> None:
    from rich.console import Console

    from gpuvisor.serve import _print_demo_keys_elsewhere

    with Store(sqlite_url) as store:
        first = prepare_demo(tmp_path / "first", store, KeyRing(store))
        second = prepare_demo(tmp_path / "second", store, KeyRing(store))
    console = Console(record=True, width=400)
    _print_demo_keys_elsewhere(console, second)
    said = console.export_text()
    assert f"the demo's keys were written to {first.keys_file} when it was applied" in said
    assert "gpuvisor keys create --tenant retail" in said and "no longer exists" not in said
    first.keys_file.unlink()
    _print_demo_keys_elsewhere(console, second)
    assert f"{first.keys_file}, which no longer exists" in console.export_text()
