"""What `gpuvisor up` checks and holds before it starts anything: that it can listen on its
address, that its state directory is a directory, and that no other node runs on the same
state directory or database (each refused in one line, before anything is written)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import resource
import socket
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from gpuvisor.errors import ConfigError
from gpuvisor.store.db import make_engine, sqlite_file

__all__ = [
    "HeldLock",
    "check_port_free",
    "check_state_dir",
    "lock_database",
    "lock_state_dir",
    "make_state_dir",
    "raise_open_file_limit",
]


_BIND_HINTS = {
    errno.EADDRINUSE: "Is another node running? Stop it or choose another --port.",
    errno.EADDRNOTAVAIL: "It is not an address of this machine: pass --host 127.0.0.1 or "
    "another address it has.",
    errno.EACCES: "Ports below 1024 need privileges: choose a --port of 1024 or above.",
}


def check_port_free(host: str, port: int) -> None:
    """Raise ConfigError when the node could not listen on ``host``:``port``, saying why."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise ConfigError(
            f"cannot listen on {host}:{port}: {host!r} is not an address ({exc.strerror}). "
            "Pass --host 127.0.0.1 or another address of this machine."
        ) from None
    with socket.socket(family, kind) as probe:
        # as uvicorn binds: the connections of a node that just stopped (TIME_WAIT) must not
        # keep its successor from starting
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            hint = _BIND_HINTS.get(exc.errno or 0, "")
            raise ConfigError(
                f"cannot listen on {host}:{port}: {exc.strerror}." + (f" {hint}" if hint else "")
            ) from None


def check_state_dir(state_dir: Path) -> None:
    """Raise ConfigError when ``state_dir``, or the nearest of its parents that exists, is
    not a directory (checked before anything is written)."""
    existing = next((p for p in (state_dir, *state_dir.parents) if p.exists()), None)
    if existing is None or existing.is_dir():
        return
    what = (
        f"state directory {state_dir} is a file"
        if existing == state_dir
        else f"cannot create the state directory {state_dir}: {existing} is a file"
    )
    raise ConfigError(
        f"{what}, not a directory: pass --state DIR with a directory (it is created when missing)"
    )


def make_state_dir(state_dir: Path) -> None:
    """Create the state directory (private) unless it exists; ConfigError when it cannot be."""
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the state directory {state_dir} ({exc.strerror}): pass --state "
            "DIR with a directory this user may create or write"
        ) from None


def _hold_lock(path: Path, refusal: Callable[[str], str]) -> int:
    """Hold the lock file ``path`` for as long as this process runs (the system lets it go
    when the process ends, SIGKILL included; workers do not inherit it) and return its file
    descriptor; raise ConfigError with ``refusal(who)`` when another node holds it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ConfigError(
            f"cannot write the lock file {path} ({exc.strerror}): the node needs a folder it "
            "may write (a state directory on a read-only file system cannot be used)"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        who = f"another gpuvisor node{f' (pid {holder})' if holder else ''}"
        raise ConfigError(refusal(who)) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def raise_open_file_limit() -> None:
    """Raise this process's soft limit on open files to its hard limit (up to 65,536): every
    client connection, worker and model file takes one, and the usual soft limit of 1,024
    runs out long before the machine does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65_536 if hard == resource.RLIM_INFINITY else min(hard, 65_536)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def lock_state_dir(state_dir: Path) -> int:
    """Hold ``<state>/node.lock`` (``_hold_lock``): one node per state directory."""
    return _hold_lock(
        state_dir / "node.lock",
        lambda who: (
            f"{who} runs on the state directory {state_dir}: two nodes there would share its "
            "database and book the same devices twice. Stop that node first, or give this one "
            "its own --state"
        ),
    )


class HeldLock:
    """A lock the node holds while it runs; ``close`` lets it go (the system does when the
    process ends, SIGKILL included)."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release

    def close(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


def lock_database(db_url: str) -> HeldLock | None:
    """Hold the database for this node: one node per database, whatever their state
    directories (``--db`` naming another node's). A SQLite file's lock file
    ``<file>.lock`` (``_hold_lock``); on PostgreSQL, an advisory lock on the node's schema,
    held by a connection of its own for as long as the node runs. None for an in-memory
    database (nothing else can open it)."""
    parsed = make_url(db_url)
    if parsed.get_backend_name() in ("postgres", "postgresql"):
        return _hold_postgres_lock(db_url)
    path = sqlite_file(db_url)
    if path is None:
        return None
    fd = _hold_lock(
        path.with_name(path.name + ".lock"),
        lambda who: (
            f"{who} uses the database {path}: two nodes on one database would book the same "
            "devices twice and start each other's deployments. Stop that node first, or give "
            "this one its own --db"
        ),
    )
    return HeldLock(lambda: os.close(fd))


def _hold_postgres_lock(db_url: str) -> HeldLock:
    """Take the node's advisory lock on the schema ``db_url`` opens (``current_schema()``:
    nodes on other schemas of the same database keep their own state) on a connection kept
    open for it. Raise ConfigError when the database cannot be reached or another node
    holds the lock (named by the ``application_name`` its connection gave)."""
    shown = make_url(db_url).render_as_string(hide_password=True)
    engine = make_engine(db_url)
    try:
        connection = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        schema = connection.execute(text("SELECT current_schema()")).scalar()
        digest = hashlib.sha256(f"gpuvisor node {schema}".encode()).digest()
        key = int.from_bytes(digest[:8], "big", signed=True)
        me = f"gpuvisor node pid {os.getpid()} on {socket.gethostname()}"[:63]
        connection.execute(text("SELECT set_config('application_name', :me, false)"), {"me": me})
        held = connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key})
        if held.scalar():
            connection.commit()

            def release() -> None:
                with contextlib.suppress(SQLAlchemyError):
                    connection.close()
                engine.dispose()  # closes the connection, which lets the lock go

            return HeldLock(release)
        # an advisory lock's 64-bit key shows in pg_locks as two 32-bit halves
        holder = connection.execute(
            text(
                "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a "
                "ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
                "AND l.classid = :high AND l.objid = :low AND l.objsubid = 1 "
                "AND l.database = (SELECT oid FROM pg_database WHERE datname = "
                "current_database())"
            ),
            {"high": (key >> 32) & 0xFFFFFFFF, "low": key & 0xFFFFFFFF},
        ).scalar()
    except SQLAlchemyError as exc:
        engine.dispose()
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise ConfigError(
            f"cannot open the database {shown}: {reason} (check --db: that PostgreSQL runs "
            "there and that the URL's user, password and database are right)"
        ) from None
    engine.dispose()
    who = f"another gpuvisor node{f' ({holder})' if holder else ''}"
    raise ConfigError(
        f"{who} uses the database {shown} (schema {schema}): two nodes on one database would "
        "book the same devices twice and start each other's deployments. Stop that node "
        "first, or give this one its own database or schema"
    )
