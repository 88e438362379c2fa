"""API keys on a real database: create, authenticate, revoke, expire, the admin key, headers."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import text

from gpuvisor import errors
from gpuvisor.security.keys import (
    KeyInfo,
    KeyRing,
    Principal,
    admin_key_path,
    extract_key,
    read_admin_key,
    redact_secrets,
)
from gpuvisor.store.db import default_url, make_engine
from gpuvisor.store.repo import Store

SECRET_FORMAT = re.compile(r"^gvk_([a-z0-9]{8})_[A-Za-z0-9_-]{43}$")
START = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(START)


@pytest.fixture
def ring(store: Store, clock: Clock) -> KeyRing:
    return KeyRing(store, clock=clock)


def test_create_returns_a_well_formed_secret_that_authenticates(ring: KeyRing) -> None:
    info, secret = ring.create(role="tenant", tenant="retail", description="shelf cams")
    match = SECRET_FORMAT.match(secret)
    assert match is not None, secret
    assert match.group(1) == info.id
    assert (info.role, info.tenant, info.description) == ("tenant", "retail", "shelf cams")
    assert info.created_at == START
    assert (info.expires_at, info.revoked_at) == (None, None)
    assert ring.authenticate(secret) == Principal(role="tenant", tenant="retail", key_id=info.id)


@pytest.mark.parametrize("role", ["admin", "operator"])
def test_cluster_roles_have_no_tenant(ring: KeyRing, role: str) -> None:
    info, secret = ring.create(role=role)  # type: ignore[arg-type]
    assert ring.authenticate(secret) == Principal(role=role, tenant=None, key_id=info.id)  # type: ignore[arg-type]


def test_every_secret_and_id_is_different(ring: KeyRing) -> None:
    created = [ring.create(role="operator") for _ in range(20)]
    assert len({info.id for info, _secret in created}) == 20
    assert len({secret for _info, secret in created}) == 20


@pytest.mark.parametrize(
    ("role", "tenant", "expires_in", "message"),
    [
        ("tenant", None, None, "a tenant key needs a tenant"),
        ("tenant", "", None, "a tenant key needs a tenant"),
        ("admin", "retail", None, "an admin key cannot belong to a tenant"),
        ("operator", "retail", None, "an operator key cannot belong to a tenant"),
        ("root", None, None, "unknown role 'root'"),
        ("tenant", "retail", timedelta(0), "is not in the future"),
        (
            "tenant",
            "retail",
            timedelta(hours=-1),
            "expiry 2030-01-01T11:00:00Z is not in the future",
        ),
    ],
)
def test_create_rejects_inconsistent_requests(
    ring: KeyRing, role: str, tenant: str | None, expires_in: timedelta | None, message: str
) -> None:
    expires_at = None if expires_in is None else START + expires_in
    with pytest.raises(errors.InvalidRequest, match=re.escape(message)):
        ring.create(role=role, tenant=tenant, expires_at=expires_at)  # type: ignore[arg-type]
    assert ring.list() == []


@pytest.mark.parametrize("missing", [None, ""])
def test_no_key_says_how_to_send_one(ring: KeyRing, missing: str | None) -> None:
    with pytest.raises(errors.Unauthenticated) as caught:
        ring.authenticate(missing)
    assert caught.value.message == "no API key: send 'Authorization: Bearer <key>'"
    assert caught.value.http_status == 401


def test_unknown_and_tampered_keys_are_unknown(ring: KeyRing) -> None:
    info, secret = ring.create(role="tenant", tenant="retail")
    tampered = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    cases = {
        "gvk_zzzzzzzz_" + "x" * 43: "zzzzzzzz",
        tampered: info.id,
        secret + " ": info.id,
        "not-a-key": None,
        "gvk_short_" + "x" * 43: None,
    }
    for candidate, claimed in cases.items():
        with pytest.raises(errors.Unauthenticated) as caught:
            ring.authenticate(candidate)
        if claimed is None:
            assert caught.value.message == "unknown API key"
        else:
            # the id it claims is named (it is not secret), never the secret
            assert caught.value.message == (
                f"unknown API key (no key gvk_{claimed} with this secret)"
            )
            assert caught.value.fields["claimed_key_id"] == claimed
        # what follows gvk_<id>_ (the secret may hold "_" itself), or the whole of a non-key
        secret_part = candidate.strip().split("_", 2)[-1]
        assert secret_part not in caught.value.message
    assert ring.authenticate(secret).key_id == info.id


def test_revoke_takes_effect_on_the_next_request(ring: KeyRing) -> None:
    info, secret = ring.create(role="tenant", tenant="retail")
    other_info, other_secret = ring.create(role="tenant", tenant="retail")
    assert ring.authenticate(secret).key_id == info.id  # now cached
    assert ring.revoke(info.id) is True
    with pytest.raises(errors.Unauthenticated) as caught:
        ring.authenticate(secret)
    assert caught.value.message == f"API key gvk_{info.id} was revoked"
    assert ring.authenticate(other_secret).key_id == other_info.id


def test_revoke_accepts_the_display_id_and_unknown_ids_return_false(ring: KeyRing) -> None:
    info, _secret = ring.create(role="operator")
    assert ring.revoke(f"gvk_{info.id}") is True
    assert ring.revoke("nosuchid") is False
    revoked = ring.get(info.id)
    assert revoked is not None
    assert revoked.revoked_at == START


def test_revoking_through_another_keyring_on_the_same_store_is_immediate(
    store: Store, clock: Clock
) -> None:
    serving, admin = KeyRing(store, clock=clock, refresh_interval=None), KeyRing(store, clock=clock)
    info, secret = admin.create(role="tenant", tenant="retail")
    assert serving.authenticate(secret).tenant == "retail"
    admin.revoke(info.id)
    with pytest.raises(errors.Unauthenticated, match="was revoked"):
        serving.authenticate(secret)


def test_writes_from_another_process_are_seen_after_the_refresh_interval(
    db_url: str, store: Store, clock: Clock
) -> None:
    serving = KeyRing(store, clock=clock, refresh_interval=0.0)
    with Store(db_url) as elsewhere:  # stands in for another process sharing the database
        info, secret = KeyRing(elsewhere, clock=clock).create(role="tenant", tenant="bank")
        assert serving.authenticate(secret).key_id == info.id
        KeyRing(elsewhere, clock=clock).revoke(info.id)
    with pytest.raises(errors.Unauthenticated, match="was revoked"):
        serving.authenticate(secret)


def test_expired_keys_say_when_they_expired(ring: KeyRing, clock: Clock) -> None:
    info, secret = ring.create(
        role="tenant", tenant="retail", expires_at=START + timedelta(hours=1)
    )
    assert info.expires_at == START + timedelta(hours=1)
    clock.now = START + timedelta(minutes=59)
    assert ring.authenticate(secret).key_id == info.id
    clock.now = START + timedelta(hours=1)
    with pytest.raises(errors.Unauthenticated) as caught:
        ring.authenticate(secret)
    assert caught.value.message == f"API key gvk_{info.id} expired at 2030-01-01T13:00:00Z"


def test_naive_expiry_is_taken_as_utc(ring: KeyRing) -> None:
    info, _secret = ring.create(
        role="operator", expires_at=(START + timedelta(days=1)).replace(tzinfo=None)
    )
    stored = ring.get(info.id)
    assert stored is not None
    assert stored.expires_at == START + timedelta(days=1)


def test_authentication_is_served_from_memory(
    ring: KeyRing, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hot path is a sha256 and a dict lookup: no query once the cache is warm."""
    info, secret = ring.create(role="tenant", tenant="retail")
    ring.authenticate(secret)
    warm = KeyRing(store, refresh_interval=None)
    warm.refresh()

    def no_database(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("authenticate touched the database")

    for method in ("list_keys", "get_key", "find_key_by_hash", "touch_keys", "revoke_key"):
        monkeypatch.setattr(store, method, no_database)
    for _ in range(100):
        assert warm.authenticate(secret).key_id == info.id
    with pytest.raises(errors.Unauthenticated, match="unknown API key"):
        warm.authenticate("gvk_00000000_" + "0" * 43)


def test_list_filters_by_tenant_and_never_shows_secrets(ring: KeyRing) -> None:
    admin, _ = ring.create(role="admin")
    retail, _ = ring.create(role="tenant", tenant="retail")
    bank, _ = ring.create(role="tenant", tenant="bank")
    assert {info.id for info in ring.list()} == {admin.id, retail.id, bank.id}
    assert [info.id for info in ring.list(tenant="retail")] == [retail.id]
    assert ring.list(tenant="nobody") == []
    assert all(isinstance(info, KeyInfo) for info in ring.list())
    assert not any("secret" in name for name in KeyInfo.__dataclass_fields__)


def test_list_shows_when_a_key_was_last_used(ring: KeyRing, clock: Clock) -> None:
    info, secret = ring.create(role="tenant", tenant="retail")
    [listed] = ring.list()
    assert listed.last_used_at is None
    clock.now = START + timedelta(minutes=5)
    ring.authenticate(secret)
    [listed] = ring.list()
    assert listed.last_used_at == START + timedelta(minutes=5)
    assert listed.id == info.id


def test_only_hashes_reach_the_database(ring: KeyRing, store: Store, db_url: str) -> None:
    secrets_made = [ring.create(role="tenant", tenant="retail")[1] for _ in range(3)]
    secrets_made.append(ring.create(role="admin")[1])
    for secret in secrets_made:
        ring.authenticate(secret)
    ring.flush_usage()
    hashes = {key.secret_hash for key in store.list_keys()}
    assert hashes == {hashlib.sha256(s.encode()).hexdigest() for s in secrets_made}

    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT * FROM api_keys")).all()
    finally:
        engine.dispose()
    dumped = repr(rows)
    for secret in secrets_made:
        assert secret not in dumped
        # the random part (token_urlsafe(32): the last 43 characters, which may contain "_")
        assert secret[-43:][:20] not in dumped


def test_secrets_are_nowhere_in_the_sqlite_files(state_dir: Path) -> None:
    with Store(f"sqlite:///{state_dir / 'gpuvisor.db'}") as store:
        ring = KeyRing(store)
        made = [ring.create(role="tenant", tenant="retail")[1] for _ in range(5)]
        for secret in made:
            ring.authenticate(secret)
        ring.flush_usage()
        # WAL mode: committed rows may still sit in the -wal file, so read every file.
        content = b"".join(path.read_bytes() for path in state_dir.glob("gpuvisor.db*"))
        assert hashlib.sha256(made[0].encode()).hexdigest().encode() in content
        for secret in made:
            assert secret.encode() not in content
            # The random part after "gvk_<id>_" (it may itself contain "_", so split twice only).
            random_part = secret.split("_", 2)[2]
            assert len(random_part) >= 40
            assert random_part.encode() not in content


def test_ensure_admin_key_writes_a_private_file_once(ring: KeyRing, state_dir: Path) -> None:
    old_umask = os.umask(0)  # even a permissive umask must not widen the file
    try:
        secret = ring.ensure_admin_key(state_dir)
    finally:
        os.umask(old_umask)
    assert secret is not None
    path = admin_key_path(state_dir)
    assert path == state_dir / "admin.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == secret + "\n"
    assert read_admin_key(state_dir) == secret
    assert ring.authenticate(secret).role == "admin"

    assert ring.ensure_admin_key(state_dir) is None
    assert path.read_text() == secret + "\n"
    assert [info.role for info in ring.list()] == ["admin"]
    assert sorted(p.name for p in state_dir.iterdir() if p.name.startswith(".admin")) == []


def test_ensure_admin_key_is_once_per_database_not_per_process(
    db_url: str, state_dir: Path
) -> None:
    with Store(db_url) as first:
        assert KeyRing(first).ensure_admin_key(state_dir) is not None
    with Store(db_url) as second:
        assert KeyRing(second).ensure_admin_key(state_dir) is None


def test_a_new_admin_key_is_made_when_every_admin_key_is_revoked(
    ring: KeyRing, state_dir: Path
) -> None:
    first = ring.ensure_admin_key(state_dir)
    assert first is not None
    ring.revoke(ring.authenticate(first).key_id)
    second = ring.ensure_admin_key(state_dir)
    assert second is not None
    assert second != first
    assert read_admin_key(state_dir) == second
    assert ring.authenticate(second).role == "admin"


def test_read_admin_key_without_a_file_is_none(tmp_path: Path) -> None:
    assert read_admin_key(tmp_path / "missing") is None
    (tmp_path / "admin.key").write_text("\n")
    assert read_admin_key(tmp_path) is None


@pytest.mark.parametrize(
    ("authorization", "x_api_key", "expected"),
    [
        (None, None, None),
        ("", "", None),
        ("   ", None, None),
        ("Bearer gvk_abc", None, "gvk_abc"),
        ("bearer gvk_abc", None, "gvk_abc"),
        ("BEARER   gvk_abc  ", None, "gvk_abc"),
        (None, "gvk_xyz", "gvk_xyz"),
        (None, "  gvk_xyz ", "gvk_xyz"),
        ("Bearer gvk_abc", "gvk_xyz", "gvk_abc"),
        ("Basic dXNlcjpwdw==", "gvk_xyz", "gvk_xyz"),
        ("Bearer", "gvk_xyz", "gvk_xyz"),
    ],
)
def test_extract_key(
    authorization: str | None, x_api_key: str | None, expected: str | None
) -> None:
    assert extract_key(authorization, x_api_key) == expected


@pytest.mark.parametrize(
    ("authorization", "message"),
    [
        ("Basic dXNlcjpwdw==", "unsupported Authorization scheme 'Basic'"),
        ("gvk_abc", "the Authorization header has no scheme"),
        ("gvk_ab12cd34_S3cretS3cretS3cret", "the Authorization header has no scheme"),
        ("gvk_ab12cd34_S3cretS3cretS3cret x", "the Authorization header is not 'Bearer <key>'"),
        ("Bearer ", "empty Bearer token"),
    ],
)
def test_extract_key_rejects_other_schemes(authorization: str, message: str) -> None:
    with pytest.raises(errors.Unauthenticated, match=re.escape(message)) as caught:
        extract_key(authorization, None)
    # a key sent without "Bearer " is never echoed (answers, logs and audit records show this)
    assert "S3cret" not in caught.value.message and "gvk_" not in caught.value.message


@given(
    token=st.text(
        alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_",
        min_size=1,
        max_size=80,
    )
)
def test_extract_key_returns_any_bearer_token_unchanged(token: str) -> None:
    assert extract_key(f"Bearer {token}", None) == token
    assert extract_key(None, token) == token


def test_redact_secrets_keeps_the_id_and_hides_the_secret() -> None:
    text = "DELETE /api/v1/keys/gvk_ab12cd34_S3cr-et_x9 -> 404; and gvk_ab12cd34 alone"
    assert (
        redact_secrets(text) == "DELETE /api/v1/keys/gvk_ab12cd34_… -> 404; and gvk_ab12cd34 alone"
    )


def test_messages_name_the_kind_of_key_with_its_article() -> None:
    kinds = {role: Principal(role, None, "ab12cd34").kind_of_key for role in ("admin", "operator")}
    assert kinds == {"admin": "an admin key", "operator": "an operator key"}
    assert Principal("tenant", "retail", "ab12cd34").kind_of_key == "a tenant key"


def test_a_new_database_under_an_old_admin_key_keeps_the_old_file_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The state directory had a node (admin.key) but the database never held an admin key:
    it was deleted, or --db names another. The new key does not overwrite the old file."""
    state = tmp_path / "state"
    with Store(default_url(state)) as first:
        old = KeyRing(first).ensure_admin_key(state)
    assert old is not None
    (state / "gpuvisor.db").unlink()
    for extra in ("gpuvisor.db-wal", "gpuvisor.db-shm"):
        (state / extra).unlink(missing_ok=True)
    with Store(default_url(state)) as second:
        new = KeyRing(second).ensure_admin_key(state)
    assert new is not None and new != old
    assert read_admin_key(state) == new
    assert (state / "admin.key.old").read_text() == old + "\n"
    assert "the database holds no admin key but" in caplog.text
    assert "admin.key.old" in caplog.text
