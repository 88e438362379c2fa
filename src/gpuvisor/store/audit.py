"""The tamper-evident audit log: hash-chained records of every mutation and refused request.

Each record carries the SHA-256 of the record before it (``prev_hash``; the first record
carries 64 zeros) and its own ``hash``, the SHA-256 of a canonical encoding of its fields
and ``prev_hash``. ``AuditLog.verify`` walks the chain in ``seq`` order and names the first
record that was changed, deleted, moved or inserted by hand.

The chain has no secret: someone who can write the database *and* recomputes every hash
after the one they changed, or who removes records from the end, leaves a valid chain.
Keep a copy of the head that ``verify`` reports somewhere else and pass it back as
``anchor`` to catch that too.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.orm import Session

from gpuvisor import errors
from gpuvisor.store.db import WRITE_OPTION, make_engine
from gpuvisor.store.tables import AuditRow

__all__ = [
    "GENESIS_HASH",
    "NODE_ROLE",
    "AuditAction",
    "AuditEvent",
    "AuditLog",
    "AuditRecord",
    "AuditResult",
    "ChainReport",
    "record_hash",
]

AuditResult = Literal["ok", "denied", "failed"]
RESULTS: tuple[str, ...] = ("ok", "denied", "failed")
AuditAction = Literal[
    "apply",
    "delete",
    "key.create",
    "key.revoke",
    "device.cordon",
    "device.uncordon",
    "model.load",
    "model.unload",
    "authenticate",
    "request",
]
"""What an audit record says was done (what ``gpuvisor audit list --action`` filters on)."""
GENESIS_HASH = "0" * 64
# Bumping this makes every existing record fail verification: change the encoding only
# together with a migration that re-chains the log.
_HASH_DOMAIN = b"gpuvisor-audit-v1\n"
# Arbitrary constant naming the audit appenders' lock on PostgreSQL.
_PG_AUDIT_LOCK_ID = 0x67766175
NODE_ROLE = "node"
"""The role of the records the node makes on its own, with no caller: no key has it."""

_LIMITS = {"actor": 64, "role": 32, "tenant": 255, "action": 64, "object_kind": 64}
_LIMITS.update({"object_name": 512, "request_id": 128})
MAX_LIST = 1000


@dataclass(frozen=True)
class AuditEvent:
    """What happened, as the API layer knows it; ``AuditLog.append`` adds seq, time and hashes.

    ``actor`` is the key id (``ab12cd34``, "" when the caller had no valid key or the node
    itself acted), ``role`` the key's role (``NODE_ROLE`` for what the node did on its own:
    the bootstrap admin key, the demo's setup), ``tenant``
    the tenant the action concerns ("" for none), ``reason`` why it was denied or failed
    (or an outcome like "created" for a success).
    """

    action: str
    result: AuditResult
    actor: str = ""
    role: str = ""
    tenant: str = ""
    object_kind: str = ""
    object_name: str = ""
    reason: str = ""
    request_id: str = ""


@dataclass(frozen=True)
class AuditRecord:
    """One stored audit record."""

    seq: int
    at: datetime
    actor: str
    role: str
    tenant: str
    action: str
    object_kind: str
    object_name: str
    result: str
    reason: str
    request_id: str
    prev_hash: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        """Return the record as JSON-ready data (time as RFC 3339 UTC)."""
        data = asdict(self)
        data["at"] = _format_time(self.at)
        return data


@dataclass(frozen=True)
class ChainReport:
    """What ``verify`` found: ``ok``, how many records it read, the head, and the first bad record."""

    ok: bool
    records: int
    head_seq: int
    head_hash: str
    bad_seq: int | None = None
    problem: str = ""


def _format_time(at: datetime) -> str:
    aware = at.replace(tzinfo=UTC) if at.tzinfo is None else at
    return aware.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record_hash(
    seq: int,
    at: datetime,
    actor: str,
    role: str,
    tenant: str,
    action: str,
    object_kind: str,
    object_name: str,
    result: str,
    reason: str,
    request_id: str,
    prev_hash: str,
) -> str:
    """Return the hex SHA-256 of a record's canonical encoding (a JSON array in field order)."""
    fields = [seq, _format_time(at), actor, role, tenant, action, object_kind, object_name]
    fields += [result, reason, request_id, prev_hash]
    encoded = json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(_HASH_DOMAIN + encoded.encode("utf-8")).hexdigest()


def _hash_of_row(row: AuditRow) -> str:
    return record_hash(
        row.seq,
        row.at,
        row.actor,
        row.role,
        row.tenant,
        row.action,
        row.object_kind,
        row.object_name,
        row.result,
        row.reason,
        row.request_id,
        row.prev_hash,
    )


def _record_from_row(row: AuditRow) -> AuditRecord:
    return AuditRecord(
        seq=row.seq,
        at=row.at,
        actor=row.actor,
        role=row.role,
        tenant=row.tenant,
        action=row.action,
        object_kind=row.object_kind,
        object_name=row.object_name,
        result=row.result,
        reason=row.reason,
        request_id=row.request_id,
        prev_hash=row.prev_hash,
        hash=row.hash,
    )


def _clip(event: AuditEvent) -> dict[str, str]:
    """Return the event's fields cut to their column widths (the hash covers what is stored)."""
    values: dict[str, str] = asdict(event)
    for name, value in values.items():
        # no NUL: PostgreSQL's text refuses it, and the record would be lost
        value = value.replace("\x00", "\\0")
        values[name] = value[: _LIMITS[name]] if name in _LIMITS else value
    return values


class AuditLog:
    """Append to, list and verify the ``audit_log`` table of one database.

    Appends are serialised: by a lock within the process, and by the database across
    processes (SQLite's write lock, taken up front; an advisory lock on PostgreSQL), so
    each record chains to the one committed before it.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        write_engine: Engine | None = None,
        lock: threading.Lock | None = None,
    ) -> None:
        self._engine = engine
        self._write_engine = write_engine or engine.execution_options(**{WRITE_OPTION: True})
        self._lock = lock or threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._owns_engine = False

    @classmethod
    def open(cls, url: str) -> AuditLog:
        """Return an AuditLog on the database at ``url`` without migrating it (for ``verify``)."""
        log = cls(make_engine(url))
        log._owns_engine = True
        return log

    # ------------------------------------------------------------------ append

    def append(self, events: Sequence[AuditEvent]) -> list[AuditRecord]:
        """Append ``events`` in order, in one transaction; return the stored records."""
        if not events:
            return []
        with self._lock, Session(self._write_engine) as session, session.begin():
            return self.append_in(session, events)

    def append_in(self, session: Session, events: Sequence[AuditEvent]) -> list[AuditRecord]:
        """Append ``events`` within the caller's write transaction, so that they are committed
        together with the change they record, or not at all. The caller holds the log's lock
        (the Store's write lock) and opened ``session`` on the write engine."""
        if not events:
            return []
        for event in events:
            if event.result not in RESULTS:
                raise errors.InvalidRequest(
                    f"audit result {event.result!r} is not one of {', '.join(RESULTS)}"
                )
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text(f"SELECT pg_advisory_xact_lock({_PG_AUDIT_LOCK_ID})"))
        last = session.execute(
            select(AuditRow.seq, AuditRow.hash).order_by(AuditRow.seq.desc()).limit(1)
        ).first()
        seq, prev_hash = (0, GENESIS_HASH) if last is None else (last[0], last[1])
        at = datetime.now(UTC)
        rows = []
        for event in events:
            seq += 1
            row = AuditRow(seq=seq, at=at, prev_hash=prev_hash, **_clip(event))
            row.hash = digest = _hash_of_row(row)
            session.add(row)
            rows.append(row)
            prev_hash = digest
        session.flush()
        return [_record_from_row(row) for row in rows]

    async def append_async(self, events: Sequence[AuditEvent]) -> list[AuditRecord]:
        """``append`` on the log's own writer thread, so the event loop and the default
        executor never wait on the database for an audit write."""
        if self._executor is None:
            with self._lock:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(1, thread_name_prefix="gpuvisor-audit")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.append, list(events))

    # -------------------------------------------------------------------- list

    def list(
        self,
        *,
        actor: str | None = None,
        tenant: str | None = None,
        action: str | None = None,
        result: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
    ) -> list[AuditRecord]:
        """Return the newest ``limit`` records matching every given filter, oldest first.

        ``actor`` matches the key id with or without its ``gvk_`` prefix; ``since`` is
        inclusive and ``until`` exclusive. ``limit`` is capped at 1000.
        """
        query = select(AuditRow).order_by(AuditRow.seq.desc())
        if actor is not None:
            query = query.where(AuditRow.actor == actor.removeprefix("gvk_"))
        if tenant is not None:
            query = query.where(AuditRow.tenant == tenant)
        if action is not None:
            query = query.where(AuditRow.action == action)
        if result is not None:
            query = query.where(AuditRow.result == result)
        if since is not None:
            query = query.where(AuditRow.at >= since)
        if until is not None:
            query = query.where(AuditRow.at < until)
        query = query.limit(max(1, min(limit, MAX_LIST)))
        with Session(self._engine) as session:
            rows = [_record_from_row(row) for row in session.scalars(query)]
        rows.reverse()
        return rows

    # ------------------------------------------------------------------ verify

    def verify(self, anchor: tuple[int, str] | None = None) -> ChainReport:
        """Walk the chain in ``seq`` order; return a report naming the first bad record.

        ``anchor`` is a ``(seq, hash)`` head noted earlier: the record must still be there
        with that hash, which catches records removed from the end. Raises
        errors.ConfigError when the database has no audit log table.
        """
        try:
            with Session(self._engine) as session:
                report = self._walk(session)
                if report.ok and anchor is not None:
                    report = self._check_anchor(session, report, anchor)
                return report
        except (OperationalError, ProgrammingError) as exc:
            if "audit_log" not in str(exc):
                raise
            raise errors.ConfigError(
                "this database has no audit log: start a node of this gpuvisor version on it "
                "once (it migrates the schema), or check the --state/--db you gave"
            ) from None

    def _walk(self, session: Session, batch: int = 500) -> ChainReport:
        count, previous = 0, None
        rows = iter(
            session.scalars(
                select(AuditRow).order_by(AuditRow.seq).execution_options(yield_per=batch)
            )
        )
        while True:
            try:
                row = next(rows, None)
                if row is None:
                    break
                changed = _hash_of_row(row) != row.hash
            except (ValueError, TypeError, UnicodeDecodeError) as exc:
                # a value the log never writes (a date that is no date, bytes for text):
                # changed in the database directly, so the chain cannot vouch for it
                if batch > 1:  # rows are read a batch at a time: find the record one by one
                    session.rollback()
                    return self._walk(session, batch=1)
                after = f"after record {previous.seq}" if previous else "at the start"
                problem = (
                    f"a record {after} cannot be read as the log writes it, so it was changed "
                    f"in the database ({type(exc).__name__}: {exc})"
                )
                return ChainReport(False, count, *_head(previous), problem=problem)
            expected_prev = GENESIS_HASH if previous is None else previous.hash
            if row.prev_hash != expected_prev:
                bad, problem = self._broken_link(session, row, previous)
                return ChainReport(False, count, *_head(previous), bad_seq=bad, problem=problem)
            if changed:
                problem = (
                    f"record {row.seq} was modified: its fields no longer match its hash "
                    f"({row.action} {row.object_kind} {row.object_name} by {row.actor or '?'})"
                )
                return ChainReport(False, count, *_head(previous), bad_seq=row.seq, problem=problem)
            count += 1
            previous = _Link(row.seq, row.hash)
        return ChainReport(True, count, *_head(previous))

    def _broken_link(
        self, session: Session, row: AuditRow, previous: _Link | None
    ) -> tuple[int, str]:
        """Explain why ``row`` does not chain to ``previous``: return (first bad seq, problem)."""
        linked_seq = session.scalar(select(AuditRow.seq).where(AuditRow.hash == row.prev_hash))
        after = "the start of the log" if previous is None else f"record {previous.seq}"
        if linked_seq is not None and linked_seq > row.seq:
            return row.seq, (
                f"records are out of order: record {row.seq} chains to record {linked_seq}, "
                "which comes after it"
            )
        if linked_seq is not None and previous is not None and linked_seq < previous.seq:
            first_inserted = (
                session.scalar(select(func.min(AuditRow.seq)).where(AuditRow.seq > linked_seq))
                or previous.seq
            )
            return first_inserted, (
                f"record {first_inserted} was inserted: record {row.seq} chains to record "
                f"{linked_seq}, so the records between them were added later"
            )
        expected_seq = 1 if previous is None else previous.seq + 1
        if row.seq > expected_seq:
            missing = (
                f"record {expected_seq}"
                if row.seq == expected_seq + 1
                else f"records {expected_seq} to {row.seq - 1}"
            )
            return expected_seq, f"{missing} deleted: record {row.seq} follows {after}"
        return row.seq, (
            f"record {row.seq} does not chain to {after}: it was inserted or rewritten, or "
            f"{after} was rewritten with a recomputed hash"
        )

    @staticmethod
    def _check_anchor(
        session: Session, report: ChainReport, anchor: tuple[int, str]
    ) -> ChainReport:
        seq, expected = anchor
        stored = session.scalar(select(AuditRow.hash).where(AuditRow.seq == seq))
        if stored == expected:
            return report
        if stored is None:
            problem = f"record {seq} (the anchor) is missing: records were removed from the end"
            before = report.records  # every record left is intact, and before it
        else:
            problem = f"record {seq} no longer has the anchored hash: the chain was rewritten"
            before = session.scalar(select(func.count()).where(AuditRow.seq < seq)) or 0
        return ChainReport(False, before, report.head_seq, report.head_hash, seq, problem)

    # ---------------------------------------------------------------- plumbing

    def close(self) -> None:
        """Stop the writer thread (waiting for queued appends)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._owns_engine:
            self._engine.dispose()


@dataclass(frozen=True)
class _Link:
    seq: int
    hash: str


def _head(previous: _Link | None) -> tuple[int, str]:
    return (0, GENESIS_HASH) if previous is None else (previous.seq, previous.hash)
