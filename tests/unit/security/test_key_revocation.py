"""Revoking keys on a real database: once is a change, again is not (the first time is kept,
and the caller is told so, to record it as unchanged)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest

from gpuvisor import errors
from gpuvisor.security.keys import KeyRing, Revocation
from gpuvisor.store.audit import AuditEvent
from gpuvisor.store.repo import Store

FIRST = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _record_of(outcome: Revocation) -> list[AuditEvent]:
    reason = "unchanged" if outcome.already_revoked else "revoked"
    return [AuditEvent("key.revoke", "ok", object_name=outcome.key.display_id, reason=reason)]


def test_revoking_twice_keeps_the_first_time_and_says_it_already_was(store: Store) -> None:
    clock = Clock(FIRST)
    ring = KeyRing(store, clock=clock)
    info, secret = ring.create(role="tenant", tenant="retail")

    first = ring.revoke_once(info.display_id, _record_of)
    clock.now = FIRST + timedelta(hours=3)
    second = ring.revoke_once(info.id, _record_of)

    assert first is not None and second is not None
    assert (first.already_revoked, first.key.revoked_at) == (False, FIRST)
    assert (second.already_revoked, second.key.revoked_at) == (True, FIRST)
    stored = ring.get(info.id)
    assert stored is not None and stored.revoked_at == FIRST
    assert [(r.object_name, r.reason) for r in store.audit.list()] == [
        (info.display_id, "revoked"),
        (info.display_id, "unchanged"),
    ]
    with pytest.raises(errors.Unauthenticated, match="was revoked"):
        ring.authenticate(secret)


def test_an_unknown_key_is_none_and_records_nothing(store: Store) -> None:
    ring = KeyRing(store, clock=Clock(FIRST))
    assert ring.revoke_once("gvk_nosuchid", _record_of) is None
    assert store.audit.list() == []


@pytest.mark.parametrize("revoked_before", [False, True])
def test_a_record_that_cannot_be_written_changes_nothing(
    store: Store, revoked_before: bool
) -> None:
    clock = Clock(FIRST)
    ring = KeyRing(store, clock=clock)
    info, _ = ring.create(role="operator")
    if revoked_before:
        ring.revoke_once(info.id)
    clock.now = FIRST + timedelta(hours=1)

    def failing(_: Revocation) -> list[AuditEvent]:
        raise RuntimeError("no room for the record")

    with pytest.raises(RuntimeError):
        ring.revoke_once(info.id, failing)
    stored = ring.get(info.id)
    assert stored is not None
    assert stored.revoked_at == (FIRST if revoked_before else None)


def test_revoke_still_answers_whether_the_key_exists(store: Store) -> None:
    ring = KeyRing(store, clock=Clock(FIRST))
    info, _ = ring.create(role="operator")
    assert ring.revoke(info.id) is True
    assert ring.revoke(info.id) is True  # already revoked: still there, still revoked
    assert ring.revoke("nosuchid") is False


RACERS = 4
RACED_KEYS = 12


def _race(rings: list[KeyRing], key_id: str) -> list[Revocation | None]:
    """Revoke ``key_id`` through every ring at once (threads released together)."""
    start = threading.Barrier(len(rings))

    def revoke(ring: KeyRing) -> Revocation | None:
        start.wait()
        return ring.revoke_once(key_id, _record_of)

    with ThreadPoolExecutor(len(rings)) as pool:
        return list(pool.map(revoke, rings))


def test_racing_revocations_of_one_key_revoke_it_once(store: Store, db_url: str) -> None:
    """Revocations of one key at the same time, through two handles on the database (as two
    nodes, or two requests, would): exactly one revokes it; every other answers, and records,
    that it already was, at the winner's time."""
    with Store(db_url) as other:
        handles = [store, other]
        rings = [
            KeyRing(handles[i % 2], clock=Clock(FIRST + timedelta(minutes=i)))
            for i in range(RACERS)
        ]
        for _ in range(RACED_KEYS):
            info, _secret = rings[0].create(role="operator")
            outcomes = _race(rings, info.id)
            stored = store.get_key(info.id)
            assert stored is not None and stored.revoked_at is not None
            fresh = [o for o in outcomes if o is not None and not o.already_revoked]
            assert len(fresh) == 1, f"{len(fresh)} of {RACERS} revocations of one key were first"
            assert {o.key.revoked_at for o in outcomes if o is not None} == {stored.revoked_at}
            reasons = [r.reason for r in store.audit.list() if r.object_name == info.display_id]
            assert sorted(reasons) == ["revoked"] + ["unchanged"] * (RACERS - 1)
