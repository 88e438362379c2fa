"""The node's own rows beside the desired state: cordoned devices, what each replica last
served, and facts the node keeps about itself (a mixin of the Store)."""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import delete, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from gpuvisor.errors import Unavailable
from gpuvisor.store.audit import AuditEvent, AuditLog
from gpuvisor.store.tables import CordonRow, NodeFactRow, ServedSpecRow

__all__ = ["AuditFor", "Cordon", "NodeRows", "ServedRecord", "canonical_json"]

log = logging.getLogger("gpuvisor.store")

_T = TypeVar("_T")
#: The audit records of a write, made from what the write returned; they are committed in the
#: write's own transaction (an audit record is never missing for a committed change, and a
#: change whose record cannot be written is rolled back).
AuditFor = Callable[[_T], Sequence[AuditEvent]]


def _utcnow() -> datetime:
    return datetime.now(UTC)


def canonical_json(body: dict[str, Any]) -> str:
    """``body`` as the store keeps JSON: keys sorted, no spaces, text as it is."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class Cordon:
    """A device taken out of placement by an operator."""

    device_id: str
    actor: str
    reason: str
    at: datetime


@dataclass(frozen=True)
class ServedRecord:
    """What one replica of a deployment last served: the spec's hash and ``body``, the
    deployment, model and profile as they were then."""

    replica_id: str
    tenant: str
    deployment: str
    spec_hash: str
    body: dict[str, Any] = field(hash=False)


class NodeRows:
    """Cordons, served specs and facts, and the serialised writes every table of the Store
    goes through (``_write``)."""

    _engine: Engine
    _write_engine: Engine
    _write_lock: threading.Lock
    _keys_version: int
    audit: AuditLog
    _file: Path | None  # the SQLite database's file, None for another database
    _file_id: tuple[int, int] | None  # its (device, inode) when the store opened it
    _file_problem: str | None

    def _remember_file(self, path: Path | None) -> None:
        self._file, self._file_id, self._file_problem = path, None, None
        if path is not None:
            with contextlib.suppress(OSError):
                info = os.stat(path)
                self._file_id = (info.st_dev, info.st_ino)

    def file_problem(self) -> str | None:
        """Why the store can no longer keep what it is given, or None: its SQLite file was
        deleted or replaced while the node ran (writes would go to a file nobody will open
        again, and be lost at the next start). Logged once."""
        if self._file is None or self._file_id is None:
            return None
        try:
            info = os.stat(self._file)
            moved = (info.st_dev, info.st_ino) != self._file_id
        except FileNotFoundError:
            moved = True
        if not moved:
            return None
        if self._file_problem is None:
            self._file_problem = (
                f"the database file {self._file} was deleted or replaced while the node ran: "
                "nothing more can be stored. Stop the node, put the file back if you can, "
                "and start it again (changes made since the file went are lost)"
            )
            log.error("%s", self._file_problem)
        return self._file_problem

    def _write(
        self,
        work: Callable[[Session], _T],
        *,
        keys_changed: bool = False,
        audit: AuditFor[_T] | None = None,
    ) -> _T:
        problem = self.file_problem()
        if problem is not None:
            raise Unavailable(problem)
        with self._write_lock:
            try:
                with Session(self._write_engine) as session, session.begin():
                    result = work(session)
                    if audit is not None:
                        self.audit.append_in(session, audit(result))
                    return result
            finally:
                # Bumped after the commit, so a cache reloading on the new version sees it.
                if keys_changed:
                    self._keys_version += 1

    # ----------------------------------------------------------------- cordons

    def cordon(
        self, device_id: str, actor: str, reason: str = "", audit: AuditFor[bool] | None = None
    ) -> bool:
        """Cordon a device, with ``audit``'s records of the result; False (and the first record
        kept) when it already was."""

        def add(session: Session) -> bool:
            if session.get(CordonRow, device_id, with_for_update=True) is not None:
                return False
            session.add(CordonRow(device_id=device_id, actor=actor, reason=reason, at=_utcnow()))
            return True

        return self._write(add, audit=audit)

    def uncordon(self, device_id: str, audit: AuditFor[bool] | None = None) -> bool:
        """Lift a cordon, with ``audit``'s records of the result; False when the device was not
        cordoned."""

        def remove(session: Session) -> bool:
            result = session.execute(delete(CordonRow).where(CordonRow.device_id == device_id))
            return bool(getattr(result, "rowcount", 0))

        return self._write(remove, audit=audit)

    def list_cordons(self) -> builtins.list[Cordon]:
        """Return every cordoned device, oldest first."""
        query = select(CordonRow).order_by(CordonRow.at, CordonRow.device_id)
        with Session(self._engine) as session:
            return [Cordon(r.device_id, r.actor, r.reason, r.at) for r in session.scalars(query)]

    # ----------------------------------------------------------------- served specs

    def list_served(self) -> builtins.list[ServedRecord]:
        """Return what each replica last served, by replica."""
        query = select(ServedSpecRow).order_by(ServedSpecRow.replica_id)
        with Session(self._engine) as session:
            return [
                ServedRecord(r.replica_id, r.tenant, r.deployment, r.spec_hash, json.loads(r.body))
                for r in session.scalars(query)
            ]

    def put_served(self, records: Sequence[ServedRecord], forget: Sequence[str] = ()) -> None:
        """Record what replicas serve now (in place of what they served before) and forget the
        replicas ``forget``, in one transaction."""

        def write(session: Session) -> None:
            if replaced := [*forget, *(r.replica_id for r in records)]:
                session.execute(delete(ServedSpecRow).where(ServedSpecRow.replica_id.in_(replaced)))
            session.add_all(
                ServedSpecRow(
                    replica_id=r.replica_id,
                    tenant=r.tenant,
                    deployment=r.deployment,
                    spec_hash=r.spec_hash,
                    body=canonical_json(r.body),
                    at=_utcnow(),
                )
                for r in records
            )

        self._write(write)

    # ----------------------------------------------------------------- facts

    def get_fact(self, name: str) -> str | None:
        """Return what the node recorded under ``name`` (``demo.applied``…), None if nothing."""
        with Session(self._engine) as session:
            row = session.get(NodeFactRow, name)
            return row.value if row is not None else None

    def set_fact(self, name: str, value: str) -> None:
        """Record ``value`` under ``name``, in place of what was there."""

        def write(session: Session) -> None:
            session.execute(delete(NodeFactRow).where(NodeFactRow.name == name))
            session.add(NodeFactRow(name=name, value=value, at=_utcnow()))

        self._write(write)
