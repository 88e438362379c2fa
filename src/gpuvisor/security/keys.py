"""API keys: creation, authentication (a sha256 and a dict lookup), revocation, the admin key."""

from __future__ import annotations

import builtins
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from gpuvisor import errors
from gpuvisor.security.admin_key import ADMIN_KEY_FILE, admin_key_path, read_admin_key
from gpuvisor.security.key_text import (
    ID_ALPHABET,
    ID_LENGTH,
    KEY_PREFIX,
    claimed_key_id,
    extract_key,
    hash_secret,
    redact_secrets,
)
from gpuvisor.security.principals import ROLES, Principal, Role
from gpuvisor.store.audit import NODE_ROLE, AuditEvent
from gpuvisor.store.repo import RevokedKey, Store, StoredKey

__all__ = [
    "ADMIN_KEY_FILE",
    "KEY_PREFIX",
    "ROLES",
    "KeyInfo",
    "KeyRing",
    "Principal",
    "Revocation",
    "Role",
    "admin_key_path",
    "claimed_key_id",
    "extract_key",
    "hash_secret",
    "node_made_key_record",
    "read_admin_key",
    "redact_secrets",
]

log = logging.getLogger("gpuvisor.security")

_SECRET_BYTES = 32  # token_urlsafe(32) is 43 characters
NO_KEY_MESSAGE = "no API key: send 'Authorization: Bearer <key>'"


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _as_utc(value: datetime) -> datetime:
    aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value
    return aware.astimezone(UTC)


def _format_time(value: datetime) -> str:
    return _as_utc(value).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class KeyInfo:
    """What may be shown about a key; never its secret."""

    id: str
    role: Role
    tenant: str | None
    description: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None = None

    @property
    def display_id(self) -> str:
        """Return the id as users see it in messages, e.g. ``gvk_ab12cd34``."""
        return f"{KEY_PREFIX}{self.id}"


@dataclass(frozen=True)
class Revocation:
    """What revoking a key did: ``key`` as it is now (``revoked_at`` set) and whether it
    ``already_revoked`` before this call, in which case nothing changed."""

    key: KeyInfo
    already_revoked: bool


@dataclass(frozen=True)
class _CachedKey:
    principal: Principal
    expires_at: datetime | None
    revoked_at: datetime | None


def _info_from_stored(key: StoredKey) -> KeyInfo:
    return KeyInfo(
        id=key.id,
        role=_checked_role(key.role),
        tenant=key.tenant,
        description=key.description,
        created_at=key.created_at,
        expires_at=key.expires_at,
        revoked_at=key.revoked_at,
        last_used_at=key.last_used_at,
    )


def _checked_role(role: str) -> Role:
    if role == "admin":
        return "admin"
    if role == "operator":
        return "operator"
    if role == "tenant":
        return "tenant"
    raise errors.InvalidRequest(
        f"unknown role {role!r} (expected one of {', '.join(ROLES)})", role=role
    )


class KeyRing:
    """API keys over a Store, with an in-memory cache so authentication never waits on the DB.

    The cache maps sha256(secret) to the key's principal and validity. Creating or
    revoking a key through any KeyRing on the same Store takes effect on the next
    ``authenticate`` call; writes made by another process are picked up within
    ``refresh_interval`` seconds (None: only on the Store's own writes).
    """

    def __init__(
        self,
        store: Store,
        *,
        refresh_interval: float | None = 10.0,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._store = store
        self._refresh_interval = refresh_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, _CachedKey] = {}
        self._loaded_version = -1
        self._loaded_at = 0.0
        self._pending_usage: dict[str, datetime] = {}

    # ------------------------------------------------------------------ create

    def create(
        self,
        role: Role = "tenant",
        tenant: str | None = None,
        description: str = "",
        expires_at: datetime | None = None,
        audit: Callable[[KeyInfo], Sequence[AuditEvent]] | None = None,
    ) -> tuple[KeyInfo, str]:
        """Create a key; return its info and the secret (shown once, never stored). ``audit``'s
        records of the new key are committed with it.

        A tenant key needs a tenant; admin and operator keys must not have one. Raises
        errors.InvalidRequest otherwise, or when ``expires_at`` is not in the future.
        """
        checked_role = _checked_role(role)
        if checked_role == "tenant" and not tenant:
            raise errors.InvalidRequest("a tenant key needs a tenant", role=role)
        if checked_role != "tenant" and tenant:
            raise errors.InvalidRequest(
                f"an {checked_role} key cannot belong to a tenant (got tenant {tenant!r})",
                role=role,
                tenant=tenant,
            )
        now = self._clock()
        expiry = None if expires_at is None else _as_utc(expires_at)
        if expiry is not None and expiry <= now:
            raise errors.InvalidRequest(
                f"expiry {_format_time(expiry)} is not in the future", expires_at=expiry
            )
        for _attempt in range(5):
            key_id = "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LENGTH))
            secret = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(_SECRET_BYTES)}"
            stored = StoredKey(
                id=key_id,
                role=checked_role,
                tenant=tenant if checked_role == "tenant" else None,
                secret_hash=hash_secret(secret),
                description=description,
                created_at=now,
                expires_at=expiry,
            )
            info = _info_from_stored(stored)
            try:
                self._store.insert_key(stored, None if audit is None else _bound(audit, info))
            except errors.Conflict:
                continue  # an id collision: 36**8 ids make this vanishingly rare
            return info, secret
        raise errors.GpuvisorError("could not allocate a unique API key id")

    # ------------------------------------------------------------ authenticate

    def authenticate(self, secret: str | None) -> Principal:
        """Return the Principal of a key secret.

        Raises errors.Unauthenticated when there is no key, or it is unknown, revoked or
        expired, with a message saying which.
        """
        if not secret:
            raise errors.Unauthenticated(NO_KEY_MESSAGE)
        self._refresh_if_stale()
        entry = self._cache.get(hash_secret(secret))
        if entry is None:
            claimed = claimed_key_id(secret)
            if claimed is None:
                raise errors.Unauthenticated("unknown API key")
            # the id is not secret: naming it lets an operator tie repeated tries to one key
            raise errors.Unauthenticated(
                f"unknown API key (no key {KEY_PREFIX}{claimed} with this secret)",
                claimed_key_id=claimed,
            )
        principal = entry.principal
        shown = f"{KEY_PREFIX}{principal.key_id}"
        if entry.revoked_at is not None:
            raise errors.Unauthenticated(f"API key {shown} was revoked", key_id=principal.key_id)
        now = self._clock()
        if entry.expires_at is not None and entry.expires_at <= now:
            raise errors.Unauthenticated(
                f"API key {shown} expired at {_format_time(entry.expires_at)}",
                key_id=principal.key_id,
            )
        self._pending_usage[principal.key_id] = now
        return principal

    def _is_stale(self) -> bool:
        return self._loaded_version != self._store.keys_version or (
            self._refresh_interval is not None
            and time.monotonic() - self._loaded_at >= self._refresh_interval
        )

    def _refresh_if_stale(self) -> None:
        if self._is_stale():
            self.refresh()

    def refresh(self) -> None:
        """Reload the key cache from the database (one SELECT; no writes)."""
        with self._lock:
            version = self._store.keys_version
            cache = {
                key.secret_hash: _CachedKey(
                    principal=Principal(_checked_role(key.role), key.tenant, key.id),
                    expires_at=key.expires_at,
                    revoked_at=key.revoked_at,
                )
                for key in self._store.list_keys()
            }
            # One assignment: readers see the old or the new dict, never a partial one.
            self._cache = cache
            self._loaded_version = version
            self._loaded_at = time.monotonic()

    def flush_usage(self) -> None:
        """Write the last-used times gathered by ``authenticate`` to the database.

        ``authenticate`` only notes them in memory (no write on the request path); the
        node calls this periodically, and ``list`` calls it so listings are current.
        """
        pending, self._pending_usage = self._pending_usage, {}
        self._store.touch_keys(dict(pending))

    # ------------------------------------------------------------- list/revoke

    def list(self, tenant: str | None = None) -> builtins.list[KeyInfo]:
        """Return every key (or one tenant's keys), oldest first, without secrets."""
        self.flush_usage()
        return [_info_from_stored(key) for key in self._store.list_keys(tenant=tenant)]

    def get(self, key_id: str) -> KeyInfo | None:
        """Return one key's info by id (``ab12cd34`` or ``gvk_ab12cd34``), or None."""
        stored = self._store.get_key(key_id.removeprefix(KEY_PREFIX))
        return None if stored is None else _info_from_stored(stored)

    def revoke(
        self, key_id: str, audit: Callable[[bool], Sequence[AuditEvent]] | None = None
    ) -> bool:
        """Revoke a key by id (``ab12cd34`` or ``gvk_ab12cd34``), effective at once, with
        ``audit``'s records of the result.

        Returns False when no such key exists; revoking twice keeps the first time
        (``revoke_once`` also says whether the key already was revoked).
        """
        outcome = self.revoke_once(key_id, None if audit is None else lambda _: audit(True))
        return outcome is not None

    def revoke_once(
        self, key_id: str, audit: Callable[[Revocation], Sequence[AuditEvent]] | None = None
    ) -> Revocation | None:
        """Revoke a key by id (``ab12cd34`` or ``gvk_ab12cd34``), effective at once, unless
        it already is; return what happened, or None when no such key exists.

        A key revoked before keeps its first revocation time. Of calls racing to revoke one
        key (threads, requests, nodes on one database) exactly one revokes it; the others are
        repeats, told the winner's time. ``audit``'s records of the outcome are committed with
        it, whichever it was, so the caller decides what a repeat is recorded as.
        """
        revoked = self._store.revoke_key(
            key_id.removeprefix(KEY_PREFIX),
            self._clock(),
            None if audit is None else lambda revoked: _audit_revocation(audit, revoked),
        )
        return None if revoked is None else _revocation_of(revoked)

    # --------------------------------------------------------------- admin key

    def ensure_admin_key(self, state_dir: Path) -> str | None:
        """On first start create an admin key, write it to ``<state_dir>/admin.key`` and return it.

        "First start" means no usable (unrevoked, unexpired) admin key exists, so
        revoking every admin key and restarting is the way back in. Returns None when a
        usable admin key exists; the file is then left alone.
        """
        now = self._clock()
        admins = self._store.list_keys(role="admin")
        for key in admins:
            if key.revoked_at is None and (key.expires_at is None or key.expires_at > now):
                return None
        path = admin_key_path(state_dir)
        if not admins and path.exists():
            # a database that never held an admin key, in a state directory whose node had
            # one: the database was deleted, or --db names another. Keep the old key's file.
            kept = path.with_name(path.name + ".old")
            path.replace(kept)
            log.warning(
                "the database holds no admin key but %s exists: this state directory had a "
                "node whose database is not this one (deleted, or --db names another), and "
                "what it stored is not here. A new admin key is made; the old one is kept in %s",
                path,
                kept,
            )
        _, secret = self.create(
            role="admin",
            description="bootstrap admin key",
            audit=lambda info: [
                node_made_key_record(info, f"role admin, the bootstrap admin key written to {path}")
            ],
        )
        _write_private_file(path, secret + "\n")
        return secret


def node_made_key_record(info: KeyInfo, reason: str) -> AuditEvent:
    """The audit record of a key the node made itself, not an API caller (no actor): the
    bootstrap admin key, the demo's tenant keys."""
    return AuditEvent(
        action="key.create",
        result="ok",
        role=NODE_ROLE,
        tenant=info.tenant or "",
        object_kind="ApiKey",
        object_name=info.display_id,
        reason=reason,
    )


def _write_private_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600, atomically (never world-readable, even briefly)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o600)  # a leftover temporary file must not widen it
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _revocation_of(revoked: RevokedKey) -> Revocation:
    return Revocation(_info_from_stored(revoked.key), already_revoked=revoked.already_revoked)


def _audit_revocation(
    audit: Callable[[Revocation], Sequence[AuditEvent]], revoked: RevokedKey | None
) -> Sequence[AuditEvent]:
    """``audit``'s records of what the store's revocation did; none for an unknown key."""
    return [] if revoked is None else audit(_revocation_of(revoked))


def _bound(
    audit: Callable[[KeyInfo], Sequence[AuditEvent]], info: KeyInfo
) -> Callable[[None], Sequence[AuditEvent]]:
    """``audit`` of ``info``, as the Store calls it (with what its write returned)."""
    return lambda _: audit(info)
