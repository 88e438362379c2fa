"""Engines and migrations: SQLite settings, driver choice, Alembic to head and back to current."""

from __future__ import annotations

import io
import sqlite3
import stat
import threading
from contextlib import closing
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from gpuvisor.errors import Unavailable
from gpuvisor.store.db import (
    MIGRATIONS_DIR,
    alembic_config,
    default_url,
    make_engine,
    upgrade_to_head,
)
from gpuvisor.store.repo import Store, StoredObject
from gpuvisor.store.tables import metadata


def head_revision() -> str:
    head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    assert head is not None
    return head


def test_default_url_points_at_gpuvisor_db_in_state_dir(tmp_path: Path) -> None:
    assert default_url(tmp_path) == f"sqlite:///{tmp_path}/gpuvisor.db"


def test_sqlite_engine_uses_wal_foreign_keys_and_busy_timeout(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as connection:
            pragma = connection.exec_driver_sql
            assert pragma("PRAGMA journal_mode").scalar() == "wal"
            assert pragma("PRAGMA foreign_keys").scalar() == 1
            assert pragma("PRAGMA busy_timeout").scalar() == 5000
    finally:
        engine.dispose()


def test_sqlite_engine_creates_the_state_directory(tmp_path: Path) -> None:
    state = tmp_path / "deep" / "state"
    engine = make_engine(default_url(state))
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
    finally:
        engine.dispose()
    assert (state / "gpuvisor.db").is_file()


def test_a_new_sqlite_database_and_its_state_directory_are_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = Store(default_url(state))  # migrates, so SQLite writes through its WAL
    try:
        store.apply([StoredObject("Tenant", "", "retail", {"kind": "Tenant"})])
        modes = {path.name: path.stat().st_mode & 0o777 for path in state.iterdir()}
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert modes["gpuvisor.db"] == 0o600
        assert modes.get("gpuvisor.db-wal", 0o600) == 0o600
        assert set(modes.values()) == {0o600}, modes
    finally:
        store.close()


def test_sqlite_connection_is_usable_from_another_thread(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    results: list[object] = []
    try:
        with engine.connect() as connection:
            worker = threading.Thread(
                target=lambda: results.append(connection.exec_driver_sql("SELECT 7").scalar())
            )
            worker.start()
            worker.join()
    finally:
        engine.dispose()
    assert results == [7]


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("postgresql://user:pw@127.0.0.1:5432/gv", "psycopg"),
        ("postgres://user:pw@127.0.0.1:5432/gv", "psycopg"),
        ("postgresql+psycopg://user:pw@127.0.0.1:5432/gv", "psycopg"),
        ("sqlite:///:memory:", "pysqlite"),
    ],
)
def test_make_engine_picks_the_driver(url: str, driver: str) -> None:
    engine = make_engine(url)  # no connection is made here
    try:
        assert engine.dialect.driver == driver
    finally:
        engine.dispose()


def test_upgrade_to_head_creates_the_schema_on_an_empty_database(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        assert "objects" not in inspect(engine).get_table_names()
        upgrade_to_head(engine)
        tables = set(inspect(engine).get_table_names())
        assert {"objects", "api_keys", "alembic_version"} <= tables
        with engine.connect() as connection:
            assert MigrationContext.configure(connection).get_current_revision() == head_revision()
    finally:
        engine.dispose()


def test_second_start_is_a_no_op_and_keeps_data(db_url: str) -> None:
    with Store(db_url) as store:
        store.apply([StoredObject("Profile", "", "rt-small", {"memory": 1})])
    # A second start runs upgrade_to_head again: nothing to do, nothing lost.
    with Store(db_url) as store:
        assert [obj.name for obj in store.list()] == ["rt-small"]
    engine = make_engine(db_url)
    try:
        upgrade_to_head(engine)
        with engine.connect() as connection:
            versions = connection.exec_driver_sql("SELECT version_num FROM alembic_version").all()
        assert [row[0] for row in versions] == [head_revision()]
    finally:
        engine.dispose()


def test_migrations_match_the_table_declarations(db_url: str) -> None:
    """Guards against editing tables.py without adding a migration (or the reverse)."""
    engine = make_engine(db_url)
    try:
        upgrade_to_head(engine)
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, metadata) == []
    finally:
        engine.dispose()


def test_migrations_render_portable_sql_for_postgresql() -> None:
    """Offline mode compiles every migration for PostgreSQL without a server."""
    buffer = io.StringIO()
    config = alembic_config()
    config.output_buffer = buffer
    config.set_main_option("sqlalchemy.url", "postgresql+psycopg://gv@127.0.0.1/gv")
    command.upgrade(config, "head", sql=True)
    sql = buffer.getvalue()
    assert "CREATE TABLE objects" in sql
    assert "CREATE TABLE api_keys" in sql
    assert "TIMESTAMP WITH TIME ZONE" in sql
    assert "CONSTRAINT uq_objects_kind_tenant_name UNIQUE (kind, tenant, name)" in sql
    assert "SERIAL" in sql  # the integer primary key autoincrements on PostgreSQL too


def test_simultaneous_first_starts_migrate_once(sqlite_url: str) -> None:
    failures: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        try:
            barrier.wait()
            Store(sqlite_url).close()
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    database = sqlite_url.removeprefix("sqlite:///")
    with closing(sqlite3.connect(database)) as connection:
        assert connection.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (head_revision(),)
        ]


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_database_file_gone_under_the_store_refuses_writes_and_says_why(
    sqlite_url: str, state_dir: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite writes on to a deleted file's inode without a word, and the next start finds
    none of it: the store refuses the writes instead, and logs it once."""
    body = {"apiVersion": "gpuvisor/v1", "kind": "Tenant", "metadata": {"name": "a"}}
    with Store(sqlite_url) as store:
        store.apply([StoredObject("Tenant", "", "a", body=body)])
        assert store.file_problem() is None
        db = state_dir / "gpuvisor.db"
        if how == "deleted":
            db.unlink()
        else:
            db.rename(state_dir / "moved.db")
            db.write_bytes(b"")
        for _ in range(2):
            with pytest.raises(Unavailable) as refused:
                store.apply(
                    [StoredObject("Tenant", "", "b", body={**body, "metadata": {"name": "b"}})]
                )
        assert refused.value.message.startswith(f"the database file {db} was deleted or replaced")
        assert refused.value.http_status == 503
    assert caplog.text.count("was deleted or replaced while the node ran") == 1
