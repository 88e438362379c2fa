"""Store behaviour on a real database: apply outcomes, generations, queries, persistence, threads."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuvisor import errors
from gpuvisor.store.db import default_url
from gpuvisor.store.repo import Store, StoredKey, StoredObject


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    with Store(db_url) as opened:
        yield opened


def profile(name: str, memory: int = 1 << 30, **extra: object) -> StoredObject:
    return StoredObject("Profile", "", name, {"memory": memory, **extra})


def deployment(tenant: str, name: str, replicas: int = 1) -> StoredObject:
    return StoredObject("Deployment", tenant, name, {"model": "m", "replicas": replicas})


def test_apply_reports_created_then_unchanged_then_configured(store: Store) -> None:
    [(created, outcome)] = store.apply([profile("rt-small")])
    assert outcome == "created"
    assert created.generation == 1
    assert created.created_at is not None
    assert created.created_at == created.updated_at
    assert created.created_at.tzinfo is not None

    [(same, outcome)] = store.apply([profile("rt-small")])
    assert outcome == "unchanged"
    assert same.generation == 1
    assert same.updated_at == created.updated_at

    [(changed, outcome)] = store.apply([profile("rt-small", memory=2 << 30)])
    assert outcome == "configured"
    assert changed.generation == 2
    assert changed.body == {"memory": 2 << 30}
    assert changed.created_at == created.created_at
    assert changed.updated_at is not None
    assert created.updated_at is not None
    assert changed.updated_at >= created.updated_at

    [(again, outcome)] = store.apply([profile("rt-small", memory=2 << 30)])
    assert (outcome, again.generation) == ("unchanged", 2)


def test_apply_ignores_key_order_and_input_generation(store: Store) -> None:
    store.apply([StoredObject("Pool", "", "p", {"a": 1, "b": {"x": 1, "y": 2}})])
    [(stored, outcome)] = store.apply(
        [StoredObject("Pool", "", "p", {"b": {"y": 2, "x": 1}, "a": 1}, generation=41)]
    )
    assert (outcome, stored.generation) == ("unchanged", 1)


def test_apply_returns_each_object_with_its_outcome_in_order(store: Store) -> None:
    store.apply([profile("a"), profile("b")])
    results = store.apply([profile("c"), profile("a"), profile("b", memory=5)])
    assert [(obj.name, outcome, obj.generation) for obj, outcome in results] == [
        ("c", "created", 1),
        ("a", "unchanged", 1),
        ("b", "configured", 2),
    ]


def test_apply_is_all_or_nothing(store: Store) -> None:
    store.apply([profile("kept")])
    unserialisable = StoredObject("Profile", "", "broken", {"memory": {1, 2}})
    with pytest.raises(TypeError):
        store.apply([profile("new"), profile("kept", memory=9), unserialisable])
    assert [obj.name for obj in store.list()] == ["kept"]
    kept = store.get("Profile", "", "kept")
    assert kept is not None
    assert (kept.body["memory"], kept.generation) == (1 << 30, 1)


def test_the_same_key_twice_in_one_apply_counts_as_a_change(store: Store) -> None:
    results = store.apply([profile("x", memory=1), profile("x", memory=2)])
    assert [(outcome, obj.generation) for obj, outcome in results] == [
        ("created", 1),
        ("configured", 2),
    ]


def test_the_same_name_in_two_tenants_is_two_objects(store: Store) -> None:
    results = store.apply([deployment("retail", "detector"), deployment("bank", "detector")])
    assert [outcome for _obj, outcome in results] == ["created", "created"]


@pytest.fixture
def populated(store: Store) -> Store:
    store.apply(
        [
            profile("rt-small"),
            profile("batch"),
            StoredObject("Tenant", "", "retail", {"weight": 1.0}),
            deployment("retail", "detector"),
            deployment("retail", "scorer"),
            deployment("bank", "fraud"),
            StoredObject("Model", "bank", "fraud@1", {"format": "onnx"}),
        ]
    )
    return store


@pytest.mark.parametrize(
    ("kind", "tenant", "expected"),
    [
        (
            None,
            None,
            [
                ("Deployment", "bank", "fraud"),
                ("Deployment", "retail", "detector"),
                ("Deployment", "retail", "scorer"),
                ("Model", "bank", "fraud@1"),
                ("Profile", "", "batch"),
                ("Profile", "", "rt-small"),
                ("Tenant", "", "retail"),
            ],
        ),
        ("Profile", None, [("Profile", "", "batch"), ("Profile", "", "rt-small")]),
        (
            None,
            "",
            [("Profile", "", "batch"), ("Profile", "", "rt-small"), ("Tenant", "", "retail")],
        ),
        (None, "bank", [("Deployment", "bank", "fraud"), ("Model", "bank", "fraud@1")]),
        (
            "Deployment",
            "retail",
            [("Deployment", "retail", "detector"), ("Deployment", "retail", "scorer")],
        ),
        ("Deployment", "nobody", []),
        ("Fleet", None, []),
    ],
)
def test_list_filters_by_kind_and_tenant(
    populated: Store, kind: str | None, tenant: str | None, expected: list[tuple[str, str, str]]
) -> None:
    assert [obj.key for obj in populated.list(kind=kind, tenant=tenant)] == expected


def test_get_returns_the_stored_body_or_none(populated: Store) -> None:
    found = populated.get("Deployment", "retail", "detector")
    assert found is not None
    assert found.body == {"model": "m", "replicas": 1}
    assert populated.get("Profile", None, "rt-small") == populated.get("Profile", "", "rt-small")
    assert populated.get("Deployment", "bank", "detector") is None
    assert populated.get("Deployment", "retail", "missing") is None


def test_returned_bodies_are_copies(populated: Store) -> None:
    found = populated.get("Tenant", "", "retail")
    assert found is not None
    found.body["weight"] = 99
    again = populated.get("Tenant", "", "retail")
    assert again is not None
    assert again.body == {"weight": 1.0}


def test_delete_removes_only_that_key(populated: Store) -> None:
    populated.apply([deployment("bank", "detector")])
    assert populated.delete("Deployment", "retail", "detector") is True
    assert populated.delete("Deployment", "retail", "detector") is False
    assert populated.get("Deployment", "retail", "detector") is None
    assert populated.get("Deployment", "bank", "detector") is not None
    assert populated.delete("Profile", None, "batch") is True
    assert [obj.name for obj in populated.list(kind="Profile")] == ["rt-small"]


def test_a_deleted_object_is_created_again_at_generation_one(store: Store) -> None:
    store.apply([profile("p", memory=1)])
    store.apply([profile("p", memory=2)])
    store.delete("Profile", "", "p")
    [(obj, outcome)] = store.apply([profile("p", memory=2)])
    assert (outcome, obj.generation) == ("created", 1)


def test_objects_persist_across_a_new_store_on_the_same_database(db_url: str) -> None:
    with Store(db_url) as first:
        first.apply([deployment("retail", "detector", replicas=1)])
        first.apply([deployment("retail", "detector", replicas=3)])
        before = first.get("Deployment", "retail", "detector")
    with Store(db_url) as second:
        after = second.get("Deployment", "retail", "detector")
        assert after == before
        assert after is not None
        assert (after.generation, after.body["replicas"]) == (2, 3)
        [(_obj, outcome)] = second.apply([deployment("retail", "detector", replicas=3)])
        assert outcome == "unchanged"


def test_concurrent_applies_from_threads_serialise(store: Store) -> None:
    """Threads (as asyncio.to_thread would) apply different bodies to one key at once."""
    outcomes: list[str] = []
    failures: list[BaseException] = []
    barrier = threading.Barrier(8)

    def apply_replicas(replicas: int) -> None:
        try:
            barrier.wait()
            for step in range(5):
                [(_obj, outcome)] = store.apply([deployment("retail", "d", replicas * 10 + step)])
                outcomes.append(outcome)
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    threads = [threading.Thread(target=apply_replicas, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    counts = Counter(outcomes)
    assert counts == {"created": 1, "configured": 39}
    final = store.get("Deployment", "retail", "d")
    assert final is not None
    assert final.generation == 40


def test_two_stores_on_one_sqlite_file_do_not_lock_each_other_out(tmp_path: Path) -> None:
    """Separate Stores share no Python lock: SQLite's BEGIN IMMEDIATE + busy_timeout must cope."""
    url = default_url(tmp_path)
    stores = [Store(url), Store(url)]
    outcomes: list[str] = []
    failures: list[BaseException] = []
    barrier = threading.Barrier(len(stores) * 3)

    def apply_many(target: Store, seed: int) -> None:
        try:
            barrier.wait()
            for step in range(10):
                for _obj, outcome in target.apply([profile("shared", memory=seed * 100 + step)]):
                    outcomes.append(outcome)
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    threads = [threading.Thread(target=apply_many, args=(stores[n % 2], n)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for opened in stores:
        opened.close()
    assert failures == []
    assert Counter(outcomes) == {"created": 1, "configured": 59}


def test_insert_key_with_an_existing_id_is_a_conflict(store: Store) -> None:
    now = datetime.now(UTC)
    key = StoredKey(
        id="ab12cd34",
        role="admin",
        tenant=None,
        secret_hash="0" * 64,
        description="",
        created_at=now,
    )
    store.insert_key(key)
    with pytest.raises(errors.Conflict, match="gvk_ab12cd34 already exists"):
        store.insert_key(
            StoredKey(
                id="ab12cd34",
                role="admin",
                tenant=None,
                secret_hash="1" * 64,
                description="",
                created_at=now,
            )
        )
    assert store.get_key("ab12cd34") == key


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    with Store(default_url(tmp_path_factory.mktemp("hypothesis"))) as opened:
        yield opened


_counter = iter(range(1_000_000))


@settings(max_examples=40, deadline=None)
@given(
    bodies=st.lists(
        st.dictionaries(st.sampled_from("abc"), st.integers(0, 2)), min_size=1, max_size=8
    )
)
def test_generation_counts_body_changes(shared_store: Store, bodies: list[dict[str, int]]) -> None:
    """Invariant: generation = 1 + the number of applies whose body differed from the last one."""
    name = f"obj-{next(_counter)}"
    outcomes = [shared_store.apply([StoredObject("Pool", "", name, body)])[0][1] for body in bodies]
    changes = sum(1 for before, after in pairwise(bodies) if before != after)
    assert outcomes[0] == "created"
    assert outcomes.count("configured") == changes
    stored = shared_store.get("Pool", "", name)
    assert stored is not None
    assert stored.generation == 1 + changes
    assert stored.body == bodies[-1]


def test_cordons_are_kept_once_listed_in_order_and_lifted(db_url: str) -> None:
    with Store(db_url) as store:
        assert store.cordon("edge-1/gpu-0", "admin", "replacing a fan") is True
        assert store.cordon("edge-1/gpu-2", "ops") is True
        # a second cordon keeps the first record (who and why)
        assert store.cordon("edge-1/gpu-0", "someone-else", "other") is False
    with Store(db_url) as reopened:  # an operator's decision survives a restart
        cordons = reopened.list_cordons()
        assert [(c.device_id, c.actor, c.reason) for c in cordons] == [
            ("edge-1/gpu-0", "admin", "replacing a fan"),
            ("edge-1/gpu-2", "ops", ""),
        ]
        assert cordons[0].at.tzinfo is not None
        assert reopened.uncordon("edge-1/gpu-0") is True
        assert reopened.uncordon("edge-1/gpu-0") is False
        assert [c.device_id for c in reopened.list_cordons()] == ["edge-1/gpu-2"]
