"""Database engines (SQLite by default, PostgreSQL supported) and schema migration to head."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.pool import StaticPool

from gpuvisor.errors import ConfigError

__all__ = [
    "MIGRATIONS_DIR",
    "WRITE_OPTION",
    "alembic_config",
    "check_database_url",
    "default_url",
    "is_sqlite",
    "make_engine",
    "sqlite_file",
    "upgrade_to_head",
]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# Execution option naming a transaction that will write. On SQLite such a transaction
# starts with BEGIN IMMEDIATE: it takes the write lock up front (waiting up to
# busy_timeout) instead of failing with "database is locked" when a read-then-write
# transaction tries to upgrade its lock after another writer committed.
WRITE_OPTION = "gpuvisor_write"

SQLITE_BUSY_TIMEOUT_MS = 5000
# Arbitrary constant naming gpuvisor's migration lock on PostgreSQL.
_PG_MIGRATION_LOCK_ID = 0x67707669


_SQLITE_HEADER = b"SQLite format 3\x00"


def check_database_url(url: str, *, must_exist: bool = False) -> str:
    """Check a ``--db`` URL before it is opened (opening one creates what is missing);
    return it. Raises ConfigError, saying what to pass instead, when it is not a SQLite or
    PostgreSQL URL, when a SQLite file's directory does not exist, when the file is not a
    SQLite database, or (``must_exist``) when there is no such file."""
    hint = "pass sqlite:///PATH (sqlite:////ABSOLUTE/PATH) or postgresql://USER@HOST/DATABASE"
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise ConfigError(f"--db {url!r} is not a database URL: {hint}") from None
    shown = parsed.render_as_string(hide_password=True)  # never echo a password
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgres", "postgresql"):
        raise ConfigError(f"--db {shown}: gpuvisor keeps its state in SQLite or PostgreSQL; {hint}")
    if parsed.drivername not in ("sqlite", "postgres", "postgresql"):
        try:
            parsed.get_dialect()  # an unknown driver (postgresql+nosuch://) is named here
        except (ArgumentError, NoSuchModuleError):
            raise ConfigError(f"--db {shown}: no such database driver: {hint}") from None
    database = parsed.database or ""
    if backend != "sqlite" or database in ("", ":memory:") or database.startswith("file:"):
        return url
    path = Path(database).expanduser()
    if not path.parent.is_dir():
        # sqlite:///tmp/x.db names tmp/x.db in the current folder: three slashes start a
        # relative path, four an absolute one
        absolute = Path("/", database)
        hint = (
            f" (sqlite:/// takes a path relative to the current folder: for {absolute}, "
            f"write sqlite:///{absolute})"
            if not path.is_absolute() and absolute.parent.is_dir()
            else ""
        )
        raise ConfigError(
            f"--db {shown}: the directory {path.parent} does not exist{hint}; create it first "
            "(gpuvisor does not create a database's directories)"
        )
    if not path.exists():
        if must_exist:
            raise ConfigError(
                f"--db {shown}: there is no database at {path}: pass the URL the node was "
                "started with (its --db), or its --state"
            )
        return url
    if not path.is_file():
        raise ConfigError(f"--db {shown}: {path} is not a file; pass a database file's path")
    try:
        with path.open("rb") as file:
            header = file.read(len(_SQLITE_HEADER))
    except OSError as exc:
        raise ConfigError(f"--db {shown}: cannot read {path}: {exc.strerror}") from None
    if header and header != _SQLITE_HEADER:  # an empty file is an empty database to SQLite
        raise ConfigError(
            f"--db {shown}: {path} is not a SQLite database: pass the node's database, or "
            "a path where none exists yet to start a new one"
        )
    return url


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite database URL, absolute; None for another database, an in-memory
    one, or a ``file:`` URI (whose options decide what it opens)."""
    parsed = make_url(url)
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or database in ("", ":memory:"):
        return None
    if database.startswith("file:"):
        return None
    return Path(database).expanduser().resolve()


def default_url(state_dir: Path) -> str:
    """Return the URL of the default SQLite database inside ``state_dir``."""
    return f"sqlite:///{Path(state_dir) / 'gpuvisor.db'}"


def is_sqlite(engine: Engine | Connection) -> bool:
    """Return True when ``engine`` talks to SQLite."""
    return engine.dialect.name == "sqlite"


def make_engine(url: str) -> Engine:
    """Return an Engine for ``url``.

    SQLite gets WAL journaling, enforced foreign keys, a 5 s busy timeout, connections
    usable from any thread, and real transactions (SQLAlchemy emits BEGIN itself, so
    reads are repeatable and DDL is transactional). A file database's parent directory
    is created. An in-memory database (``sqlite://``, for tests) is one connection shared
    by every thread, so use it from one thread at a time. ``postgresql://`` without a
    driver uses psycopg (v3).
    """
    parsed = make_url(url)
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, pool_pre_ping=True)

    database = parsed.database or ""
    in_memory = database in ("", ":memory:") or "mode=memory" in str(parsed)
    options: dict[str, Any] = {"connect_args": {"check_same_thread": False}}
    if in_memory:
        # Every new connection to ":memory:" is a new empty database: share one.
        options["poolclass"] = StaticPool
    elif not database.startswith("file:"):
        path = Path(database).expanduser()
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Made private before SQLite makes it (SQLite gives its -wal and -shm files the same
        # mode): it holds key hashes and the audit log.
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    engine = create_engine(parsed, **options)
    _install_sqlite_hooks(engine, in_memory=in_memory)
    return engine


def _enable_wal(cursor: Any) -> None:
    """Switch a new database file to WAL journaling (once; the mode persists in the file).

    The switch needs the file to itself and SQLite answers "database is locked" at once,
    without its busy handler, while another connection holds it, as when several nodes or
    commands open a fresh state directory together: retry until the busy timeout.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    delay = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _install_sqlite_hooks(engine: Engine, *, in_memory: bool) -> None:
    @event.listens_for(engine, "connect")
    def _configure_connection(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide where transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            if not in_memory:
                _enable_wal(cursor)
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        writes = connection.get_execution_options().get(WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if writes else "BEGIN")


def alembic_config() -> Config:
    """Return an Alembic Config for gpuvisor's migrations (no alembic.ini needed)."""
    config = Config()
    # Config values go through configparser interpolation: escape '%'.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    return config


def upgrade_to_head(engine: Engine) -> None:
    """Migrate the database behind ``engine`` to the newest schema; a no-op when current.

    Runs Alembic programmatically inside one transaction that holds the database's write
    lock (SQLite) or an advisory lock (PostgreSQL), so two processes starting at once
    migrate once.
    """
    config = alembic_config()
    with engine.connect() as connection:
        connection.execution_options(**{WRITE_OPTION: True})
        with connection.begin():
            if connection.dialect.name == "postgresql":
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK_ID})")
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
