"""The audit log's hash chain: appends, filters, and tampering made with direct SQL."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from gpuvisor.cli import app
from gpuvisor.cli_audit import parse_time
from gpuvisor.errors import ConfigError, InvalidRequest
from gpuvisor.security.keys import KeyRing
from gpuvisor.store.audit import GENESIS_HASH, AuditEvent, AuditLog, record_hash
from gpuvisor.store.db import make_engine
from gpuvisor.store.repo import Store, StoredObject


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    with Store(db_url) as opened:
        yield opened


def _event(n: int, **overrides: str) -> AuditEvent:
    fields: dict[str, str] = {
        "action": "apply",
        "result": "ok",
        "actor": f"key{n:05d}",
        "role": "admin",
        "tenant": "retail" if n % 2 else "analytics",
        "object_kind": "Deployment",
        "object_name": f"dep-{n}",
        "reason": "created",
        "request_id": f"req-{n}",
    }
    fields.update(overrides)
    return AuditEvent(**fields)  # type: ignore[arg-type]


def _fill(store: Store, count: int = 5) -> None:
    for n in range(1, count + 1):
        store.audit.append([_event(n)])


def _sql(store: Store, *statements: str, **params: object) -> None:
    engine = make_engine(store.url)
    try:
        with engine.begin() as connection:
            for statement in statements:
                connection.execute(text(statement), params)
    finally:
        engine.dispose()


def test_records_chain_from_the_genesis_hash(store: Store) -> None:
    first = store.audit.append([_event(1)])[0]
    second, third = store.audit.append([_event(2), _event(3, result="denied", reason="nope")])
    assert [first.seq, second.seq, third.seq] == [1, 2, 3]
    assert first.prev_hash == GENESIS_HASH
    assert second.prev_hash == first.hash and third.prev_hash == second.hash
    assert third.hash == record_hash(
        3,
        third.at,
        "key00003",
        "admin",
        "retail",
        "apply",
        "Deployment",
        "dep-3",
        "denied",
        "nope",
        "req-3",
        second.hash,
    )
    report = store.audit.verify()
    assert (report.ok, report.records, report.head_seq, report.head_hash) == (
        True,
        3,
        3,
        third.hash,
    )


def test_stored_records_read_back_with_the_hashed_fields(store: Store) -> None:
    appended = store.audit.append([_event(1, object_name="x" * 600)])[0]
    listed = store.audit.list()
    assert listed == [appended]
    assert len(listed[0].object_name) == 512  # clipped to the column before hashing
    assert listed[0].at.tzinfo is not None
    assert store.audit.verify().ok


def test_an_empty_log_verifies(store: Store) -> None:
    report = store.audit.verify()
    assert (report.ok, report.records, report.head_seq) == (True, 0, 0)


def test_an_unknown_result_is_refused(store: Store) -> None:
    with pytest.raises(InvalidRequest, match="not one of ok, denied, failed"):
        store.audit.append([_event(1, result="maybe")])


def test_list_filters_and_limits(store: Store) -> None:
    _fill(store, 6)
    store.audit.append([_event(7, action="authenticate", result="denied", actor="")])
    assert [r.seq for r in store.audit.list(tenant="retail")] == [1, 3, 5, 7]
    assert [r.seq for r in store.audit.list(actor="gvk_key00002")] == [2]
    assert [r.seq for r in store.audit.list(result="denied")] == [7]
    assert [r.seq for r in store.audit.list(action="apply", limit=2)] == [5, 6]
    everything = store.audit.list()
    assert [r.seq for r in everything] == [1, 2, 3, 4, 5, 6, 7]
    after = everything[0].at + timedelta(microseconds=1)
    later = [r.seq for r in store.audit.list(since=after)]
    assert 1 not in later and later == sorted(later)
    assert store.audit.list(until=everything[0].at) == []
    future = datetime.now(UTC) + timedelta(hours=1)
    assert store.audit.list(since=future) == []


def test_concurrent_appends_keep_one_chain(store: Store) -> None:
    def append_many(worker: int) -> None:
        for n in range(10):
            store.audit.append([_event(worker * 100 + n)])

    threads = [threading.Thread(target=append_many, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report = store.audit.verify()
    assert (report.ok, report.records) == (True, 40)


def _deployment(name: str) -> StoredObject:
    return StoredObject("Deployment", "retail", name, body={"kind": "Deployment", "n": name})


def test_a_change_and_its_record_are_committed_together(store: Store) -> None:
    applied = store.apply(
        [_deployment("shelf")],
        audit=lambda result: [
            _event(1, object_name=obj.name, reason=outcome) for obj, outcome in result
        ],
    )
    assert [outcome for _, outcome in applied] == ["created"]
    [record] = store.audit.list()
    assert (record.object_name, record.reason) == ("shelf", "created")
    assert store.delete(
        "Deployment", "retail", "shelf", audit=lambda deleted: [_event(2, reason=str(deleted))]
    )
    assert [r.reason for r in store.audit.list()] == ["created", "True"]
    assert store.audit.verify().ok


def test_a_change_whose_record_cannot_be_written_is_rolled_back(store: Store) -> None:
    store.apply([_deployment("kept")], audit=lambda _: [_event(1)])

    def failing(_: object) -> list[AuditEvent]:
        raise RuntimeError("the audit table is not writable")

    with pytest.raises(RuntimeError, match="not writable"):
        store.apply([_deployment("lost")], audit=failing)
    with pytest.raises(InvalidRequest, match="audit result 'maybe'"):
        store.delete("Deployment", "retail", "kept", audit=lambda _: [_event(2, result="maybe")])
    with pytest.raises(RuntimeError, match="not writable"):
        store.cordon("cpu-0", "key00001", "maintenance", audit=failing)
    # nothing of the three changes is stored, and the log has only the first record
    assert store.get("Deployment", "retail", "lost") is None
    assert store.get("Deployment", "retail", "kept") is not None
    assert store.list_cordons() == []
    assert [r.seq for r in store.audit.list()] == [1]
    assert store.audit.verify().ok


def test_a_key_and_its_record_are_committed_together(store: Store) -> None:
    keys = KeyRing(store)
    info, _ = keys.create(
        "tenant", "retail", audit=lambda made: [_event(1, object_name=made.display_id)]
    )
    [record] = store.audit.list()
    assert record.object_name == info.display_id

    def failing(_: object) -> list[AuditEvent]:
        raise RuntimeError("no room for the record")

    with pytest.raises(RuntimeError):
        keys.revoke(info.display_id, audit=failing)
    assert keys.get(info.display_id).revoked_at is None  # type: ignore[union-attr]
    with pytest.raises(RuntimeError):
        keys.create("tenant", "retail", audit=failing)
    assert [k.id for k in keys.list()] == [info.id]


def test_two_stores_on_one_database_append_to_one_chain(store: Store) -> None:
    with Store(store.url) as other:
        threads = [
            threading.Thread(target=lambda s=s: [s.audit.append([_event(n)]) for n in range(10)])
            for s in (store, other)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    report = store.audit.verify()
    assert (report.ok, report.records) == (True, 20)


def test_a_modified_record_is_named(store: Store) -> None:
    _fill(store)
    _sql(store, "UPDATE audit_log SET result = 'ok', actor = 'someone' WHERE seq = 3")
    report = store.audit.verify()
    assert (report.ok, report.bad_seq, report.records) == (False, 3, 2)
    assert "record 3 was modified" in report.problem


def test_a_deleted_record_is_named(store: Store) -> None:
    _fill(store)
    _sql(store, "DELETE FROM audit_log WHERE seq = 3")
    report = store.audit.verify()
    assert (report.ok, report.bad_seq) == (False, 3)
    assert "record 3 deleted: record 4 follows record 2" in report.problem


def test_reordered_records_are_named(store: Store) -> None:
    _fill(store)
    # Swap records 3 and 4 (through a free seq: the primary key is checked per row).
    _sql(
        store,
        "UPDATE audit_log SET seq = 1000 WHERE seq = 3",
        "UPDATE audit_log SET seq = 3 WHERE seq = 4",
        "UPDATE audit_log SET seq = 4 WHERE seq = 1000",
    )
    report = store.audit.verify()
    assert (report.ok, report.bad_seq) == (False, 3)
    assert "out of order: record 3 chains to record 4" in report.problem


def test_an_inserted_record_is_named_even_with_a_correct_hash(store: Store) -> None:
    _fill(store)
    second = store.audit.list(limit=1000)[1]
    at = datetime.now(UTC).replace(microsecond=0)
    forged = record_hash(
        3, at, "x", "admin", "", "key.create", "ApiKey", "gvk_x", "ok", "", "", second.hash
    )
    # Make room after record 2 (seq + 1000 first: the primary key is checked per row).
    _sql(
        store,
        "UPDATE audit_log SET seq = seq + 1000 WHERE seq >= 3",
        "UPDATE audit_log SET seq = seq - 999 WHERE seq >= 1000",
        "INSERT INTO audit_log (seq, at, actor, role, tenant, action, object_kind, object_name,"
        " result, reason, request_id, prev_hash, hash) VALUES (3, :at, 'x', 'admin', '',"
        " 'key.create', 'ApiKey', 'gvk_x', 'ok', '', '', :prev, :hash)",
        at=at.replace(tzinfo=None) if store.url.startswith("sqlite") else at,
        prev=second.hash,
        hash=forged,
    )
    report = store.audit.verify()
    assert (report.ok, report.bad_seq) == (False, 3)
    assert "record 3 was inserted: record 4 chains to record 2" in report.problem


def test_a_record_appended_by_hand_with_a_made_up_link_is_named(store: Store) -> None:
    _fill(store, 2)
    _sql(
        store,
        "INSERT INTO audit_log (seq, at, actor, role, tenant, action, object_kind, object_name,"
        " result, reason, request_id, prev_hash, hash) VALUES (3, :at, 'x', 'admin', '',"
        " 'apply', '', '', 'ok', '', '', :prev, :hash)",
        at=datetime(2026, 1, 1),
        prev="ab" * 32,
        hash="cd" * 32,
    )
    report = store.audit.verify()
    assert (report.ok, report.bad_seq) == (False, 3)
    assert "record 3 does not chain to record 2" in report.problem


def test_an_anchor_catches_records_removed_from_the_end(store: Store) -> None:
    _fill(store)
    head = store.audit.verify()
    assert store.audit.verify(anchor=(head.head_seq, head.head_hash)).ok
    _sql(store, "DELETE FROM audit_log WHERE seq >= 4")
    assert store.audit.verify().ok  # the chain alone cannot see a cut tail
    report = store.audit.verify(anchor=(head.head_seq, head.head_hash))
    assert (report.ok, report.bad_seq) == (False, 5)
    assert "anchor" in report.problem and "removed from the end" in report.problem


def test_verify_on_a_database_without_the_table_says_what_to_do(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE unrelated (x INTEGER)")
    engine.dispose()
    log = AuditLog.open(sqlite_url)
    try:
        with pytest.raises(ConfigError, match="no audit log"):
            log.verify()
    finally:
        log.close()


def test_append_async_writes_on_the_log_thread(store: Store) -> None:
    records = asyncio.run(store.audit.append_async([_event(1), _event(2)]))
    assert [r.seq for r in records] == [1, 2]
    assert store.audit.verify().records == 2


def test_cli_verify_reads_the_database_directly(store: Store) -> None:
    _fill(store, 3)
    runner = CliRunner()
    intact = runner.invoke(app, ["audit", "verify", "--db", store.url])
    assert intact.exit_code == 0, intact.output
    head = store.audit.verify()
    assert f"3 records; head 3:{head.head_hash}" in intact.output
    anchored = runner.invoke(
        app, ["audit", "verify", "--db", store.url, "--anchor", f"3:{head.head_hash}"]
    )
    assert anchored.exit_code == 0, anchored.output
    assert f"3 records; anchor 3 matches; head 3:{head.head_hash}" in anchored.output
    wrong = head.head_hash[:-1] + ("0" if head.head_hash[-1] != "0" else "1")
    mismatch = runner.invoke(app, ["audit", "verify", "--db", store.url, "--anchor", f"2:{wrong}"])
    assert mismatch.exit_code == 1
    assert "record 2 no longer has the anchored hash" in mismatch.output
    assert "(1 record before it intact)" in " ".join(mismatch.output.split())
    _sql(store, "DELETE FROM audit_log WHERE seq = 2")
    broken = runner.invoke(app, ["audit", "verify", "--db", store.url])
    assert broken.exit_code == 1
    assert "record 2 deleted: record 3 follows record 1" in broken.output


def test_cli_verify_without_a_database_says_where_it_looked(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["audit", "verify", "--state", str(tmp_path / "none")])
    assert result.exit_code == 1
    assert "no database at" in result.output and "--db" in result.output
    assert not (tmp_path / "none").exists()


def test_cli_verify_refuses_a_malformed_anchor(sqlite_url: str) -> None:
    result = CliRunner().invoke(app, ["audit", "verify", "--db", sqlite_url, "--anchor", "3"])
    assert result.exit_code == 1 and "expected SEQ:HASH" in result.output


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-21T13:00:00Z", datetime(2026, 11, 21, 13, 0, tzinfo=UTC)),
        ("2026-11-21T13:00:00", datetime(2026, 11, 21, 13, 0, tzinfo=UTC)),
        ("2026-11-21T15:00:00+02:00", datetime(2026, 11, 21, 13, 0, tzinfo=UTC)),
        ("2h", datetime(2026, 11, 21, 11, 0, tzinfo=UTC)),
        ("90s", datetime(2026, 11, 21, 12, 58, 30, tzinfo=UTC)),
    ],
)
def test_cli_times_are_rfc3339_or_a_duration_ago(text: str, expected: datetime) -> None:
    now = datetime(2026, 11, 21, 13, 0, tzinfo=UTC)
    assert parse_time(text, now=now) == expected


def test_cli_time_that_is_neither_says_both_forms() -> None:
    with pytest.raises(ConfigError, match=r"neither a time like .* nor a duration ago"):
        parse_time("yesterday")


def test_the_bootstrap_admin_key_is_on_record(store: Store, tmp_path: Path) -> None:
    keys = KeyRing(store)
    secret = keys.ensure_admin_key(tmp_path)
    assert secret is not None
    assert keys.ensure_admin_key(tmp_path) is None  # not created again, not recorded again
    (record,) = store.audit.list()
    key_id = secret.split("_")[1]
    assert (record.action, record.result, record.object_name) == (
        "key.create",
        "ok",
        f"gvk_{key_id}",
    )
    assert str(tmp_path / "admin.key") in record.reason


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_log SET at = 'not a date' WHERE seq = 3",
        "UPDATE audit_log SET actor = x'ff' WHERE seq = 3",
    ],
    ids=["a date that is none", "bytes for text"],
)
def test_a_value_the_log_never_writes_is_tampering_not_a_crash(
    sqlite_url: str, statement: str
) -> None:
    with Store(sqlite_url) as store:
        _fill(store)
        _sql(store, statement)
        report = store.audit.verify()
    assert (report.ok, report.records) == (False, 2)
    assert report.problem.startswith(
        "a record after record 2 cannot be read as the log writes it, so it was changed"
    )


def test_a_nul_in_a_records_text_is_kept_as_text_not_lost(store: Store) -> None:
    """PostgreSQL's text refuses NUL: the record would not be written at all."""
    event = AuditEvent(action="request", result="denied", object_name="x\x00y", reason="r\x00")
    store.audit.append([event])
    [record] = store.audit.list(action="request")
    assert (record.object_name, record.reason) == ("x\\0y", "r\\0")
    assert store.audit.verify().ok
