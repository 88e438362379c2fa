"""The Store: desired-state objects, API key records and the audit log, over SQLAlchemy."""

from __future__ import annotations

import builtins
import json
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gpuvisor import errors
from gpuvisor.store.audit import AuditLog
from gpuvisor.store.db import WRITE_OPTION, make_engine, sqlite_file, upgrade_to_head
from gpuvisor.store.node_rows import AuditFor, Cordon, NodeRows, ServedRecord, canonical_json
from gpuvisor.store.tables import ApiKeyRow, ObjectRow

__all__ = [
    "ApplyOutcome",
    "Cordon",
    "RevokedKey",
    "ServedRecord",
    "Store",
    "StoredKey",
    "StoredObject",
]

ApplyOutcome = Literal["created", "configured", "unchanged"]

# A concurrent writer on PostgreSQL can insert the same key between our read and our
# insert; the whole apply is then retried (it sees the row on the next attempt).
_APPLY_ATTEMPTS = 3


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class StoredObject:
    """One object as stored: its key (kind, tenant or "" when cluster-scoped, name) and body.

    ``generation`` starts at 1 and grows by one each time the body changes; on input to
    ``Store.apply`` it and the timestamps are ignored.
    """

    kind: str
    tenant: str
    name: str
    body: dict[str, Any] = field(hash=False)
    generation: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        """Return ``(kind, tenant, name)``, the object's identity."""
        return (self.kind, self.tenant, self.name)


@dataclass(frozen=True)
class StoredKey:
    """One API key record: everything except the secret itself, which is never stored."""

    id: str
    role: str
    tenant: str | None
    secret_hash: str
    description: str
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None


@dataclass(frozen=True)
class RevokedKey:
    """What ``Store.revoke_key`` did: the key as it is now (``revoked_at`` set), and whether it
    ``already_revoked`` before the call, which then changed nothing."""

    key: StoredKey
    already_revoked: bool


def _object_from_row(row: ObjectRow) -> StoredObject:
    return StoredObject(
        kind=row.kind,
        tenant=row.tenant,
        name=row.name,
        body=json.loads(row.body),
        generation=row.generation,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _key_from_row(row: ApiKeyRow) -> StoredKey:
    return StoredKey(
        id=row.id,
        role=row.role,
        tenant=row.tenant,
        secret_hash=row.secret_hash,
        description=row.description,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        last_used_at=row.last_used_at,
    )


class Store(NodeRows):
    """Desired state and API keys in one database; safe to call from many threads.

    Construction migrates the schema to head. Each method is one transaction; writes are
    serialised within the process and take the database write lock up front on SQLite.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine = make_engine(url)
        self._write_engine = self._engine.execution_options(**{WRITE_OPTION: True})
        self._write_lock = threading.Lock()
        self._keys_version = 0
        upgrade_to_head(self._engine)
        self._remember_file(sqlite_file(url))
        # The audit log shares the write lock: one writer per process, whatever it writes.
        self.audit = AuditLog(self._engine, write_engine=self._write_engine, lock=self._write_lock)

    # ----------------------------------------------------------------- objects

    def apply(
        self,
        objects: list[StoredObject],
        audit: AuditFor[list[tuple[StoredObject, ApplyOutcome]]] | None = None,
    ) -> list[tuple[StoredObject, ApplyOutcome]]:
        """Create or update ``objects`` in one transaction; return each as stored, with its outcome.

        The outcome is "created" (new key, generation 1), "configured" (body changed,
        generation + 1) or "unchanged". Either every object is written or none is, together
        with the records ``audit`` makes of the result.
        """
        for attempt in range(_APPLY_ATTEMPTS):
            try:
                return self._write(lambda session: self._apply_in(session, objects), audit=audit)
            except IntegrityError:
                if attempt == _APPLY_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _apply_in(
        self, session: Session, objects: list[StoredObject]
    ) -> list[tuple[StoredObject, ApplyOutcome]]:
        now = _utcnow()
        results: list[tuple[StoredObject, ApplyOutcome]] = []
        for obj in objects:
            body = canonical_json(obj.body)
            row = session.scalars(
                select(ObjectRow)
                .where(
                    ObjectRow.kind == obj.kind,
                    ObjectRow.tenant == obj.tenant,
                    ObjectRow.name == obj.name,
                )
                .with_for_update()
            ).one_or_none()
            outcome: ApplyOutcome
            if row is None:
                row = ObjectRow(
                    kind=obj.kind,
                    tenant=obj.tenant,
                    name=obj.name,
                    body=body,
                    generation=1,
                    created_at=now,
                    updated_at=now,
                )
                session.add(row)
                outcome = "created"
            elif row.body != body:
                row.body = body
                row.generation += 1
                row.updated_at = now
                outcome = "configured"
            else:
                outcome = "unchanged"
            session.flush()
            results.append((_object_from_row(row), outcome))
        return results

    def list(self, kind: str | None = None, tenant: str | None = None) -> list[StoredObject]:
        """Return stored objects ordered by (kind, tenant, name).

        ``kind``/``tenant`` of None match everything; ``tenant=""`` selects the
        cluster-scoped objects only.
        """
        query = select(ObjectRow).order_by(ObjectRow.kind, ObjectRow.tenant, ObjectRow.name)
        if kind is not None:
            query = query.where(ObjectRow.kind == kind)
        if tenant is not None:
            query = query.where(ObjectRow.tenant == tenant)
        with Session(self._engine) as session:
            return [_object_from_row(row) for row in session.scalars(query)]

    def get(self, kind: str, tenant: str | None, name: str) -> StoredObject | None:
        """Return the object with this key, or None; a tenant of None means cluster-scoped."""
        with Session(self._engine) as session:
            row = session.scalars(
                select(ObjectRow).where(
                    ObjectRow.kind == kind,
                    ObjectRow.tenant == (tenant or ""),
                    ObjectRow.name == name,
                )
            ).one_or_none()
            return None if row is None else _object_from_row(row)

    def delete(
        self, kind: str, tenant: str | None, name: str, audit: AuditFor[bool] | None = None
    ) -> bool:
        """Delete the object with this key; return whether it existed. ``audit``'s records of
        the result are committed with the deletion."""

        def remove(session: Session) -> bool:
            result = session.execute(
                delete(ObjectRow).where(
                    ObjectRow.kind == kind,
                    ObjectRow.tenant == (tenant or ""),
                    ObjectRow.name == name,
                )
            )
            return bool(getattr(result, "rowcount", 0))

        return self._write(remove, audit=audit)

    # ---------------------------------------------------------------- API keys

    @property
    def keys_version(self) -> int:
        """A counter bumped by every key write through this Store (cache invalidation)."""
        return self._keys_version

    def insert_key(self, key: StoredKey, audit: AuditFor[None] | None = None) -> None:
        """Store a new key record, with ``audit``'s records; raise errors.Conflict if its id or
        hash already exists."""

        def insert(session: Session) -> None:
            session.add(
                ApiKeyRow(
                    id=key.id,
                    tenant=key.tenant,
                    role=key.role,
                    secret_hash=key.secret_hash,
                    description=key.description,
                    created_at=key.created_at,
                    expires_at=key.expires_at,
                    revoked_at=key.revoked_at,
                    last_used_at=key.last_used_at,
                )
            )
            session.flush()

        try:
            self._write(insert, keys_changed=True, audit=audit)
        except IntegrityError as exc:
            raise errors.Conflict(f"API key gvk_{key.id} already exists", key_id=key.id) from exc

    def get_key(self, key_id: str) -> StoredKey | None:
        """Return the key record with this id, or None."""
        with Session(self._engine) as session:
            row = session.get(ApiKeyRow, key_id)
            return None if row is None else _key_from_row(row)

    def find_key_by_hash(self, secret_hash: str) -> StoredKey | None:
        """Return the key record whose secret hashes to ``secret_hash``, or None."""
        with Session(self._engine) as session:
            row = session.scalars(
                select(ApiKeyRow).where(ApiKeyRow.secret_hash == secret_hash)
            ).one_or_none()
            return None if row is None else _key_from_row(row)

    def list_keys(
        self, tenant: str | None = None, role: str | None = None
    ) -> builtins.list[StoredKey]:
        """Return key records ordered by creation; None filters match everything."""
        query = select(ApiKeyRow).order_by(ApiKeyRow.created_at, ApiKeyRow.id)
        if tenant is not None:
            query = query.where(ApiKeyRow.tenant == tenant)
        if role is not None:
            query = query.where(ApiKeyRow.role == role)
        with Session(self._engine) as session:
            return [_key_from_row(row) for row in session.scalars(query)]

    def revoke_key(
        self, key_id: str, at: datetime, audit: AuditFor[RevokedKey | None] | None = None
    ) -> RevokedKey | None:
        """Mark the key revoked at ``at`` unless it already is (the first time is kept), with
        ``audit``'s records of the result; return the key as it is now and whether this call
        revoked it, or None if there is no such key.

        Of calls racing to revoke one key, from any number of processes, exactly one revokes it.
        """

        def revoke(session: Session) -> RevokedKey | None:
            # One conditional UPDATE decides who revokes the key: PostgreSQL re-checks the
            # condition once a concurrent revocation commits, and SQLite has one writer at a time.
            changed = session.execute(
                update(ApiKeyRow)
                .where(ApiKeyRow.id == key_id, ApiKeyRow.revoked_at.is_(None))
                .values(revoked_at=at)
                .execution_options(synchronize_session=False)
            )
            row = session.get(ApiKeyRow, key_id)
            if row is None:
                return None
            revoked_now = getattr(changed, "rowcount", 0) == 1
            return RevokedKey(_key_from_row(row), already_revoked=not revoked_now)

        return self._write(revoke, keys_changed=True, audit=audit)

    def touch_keys(self, last_used: dict[str, datetime]) -> None:
        """Record when each key (by id) was last used; unknown ids are ignored."""
        if not last_used:
            return

        def touch(session: Session) -> None:
            for key_id, at in last_used.items():
                session.execute(
                    update(ApiKeyRow).where(ApiKeyRow.id == key_id).values(last_used_at=at)
                )

        self._write(touch)

    # ----------------------------------------------------------------- plumbing

    def close(self) -> None:
        """Release every pooled connection; the Store must not be used afterwards."""
        self.audit.close()
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
