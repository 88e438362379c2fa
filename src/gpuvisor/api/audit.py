"""Audit records for the HTTP API: every mutation, every refused key or role, and every write
refused for its input, with the request id the node logs. Routes name what they are about to
do (``begin``) and hand the Store the records of their success (``recorder``), which it commits
with the change; refusals are recorded by the error handler (``record_refusal``). A write route
whose body FastAPI reads names its key check (``checks_key_with``), which the error handler runs
on a body or parameter FastAPI refused before the route ran."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from weakref import WeakKeyDictionary

from fastapi import Request
from starlette.responses import Response

from gpuvisor.api.errors import (
    described_error,
    gpuvisor_error_response,
    refused_for_its_input,
    request_id_of,
    unexpected_error_response,
)
from gpuvisor.api.refusal_budget import RefusalBudget
from gpuvisor.errors import Forbidden, GpuvisorError, NotFound, Unauthenticated, Unavailable
from gpuvisor.node import Node
from gpuvisor.security.keys import Principal, extract_key, redact_secrets
from gpuvisor.store.audit import AuditEvent, AuditResult

__all__ = [
    "AuditTarget",
    "KeyCheck",
    "audited_error_handler",
    "audited_unexpected_handler",
    "begin",
    "checks_key_with",
    "record_ok",
    "record_refusal",
    "recorder",
]

log = logging.getLogger("gpuvisor.api")

_READS = ("GET", "HEAD", "OPTIONS")
# A refusal's message can quote what the caller sent (a name, a path): its record keeps enough
# to tell what was wrong, and the log stays readable.
_MAX_REASON = 1000


KeyCheck = Callable[[Request], Awaitable[Principal]]
"""A write route's check of the key behind a request: authenticate it, name the action
(``begin``), and raise Forbidden for a role that may not make the request; return the caller."""

_Endpoint = TypeVar("_Endpoint", bound=Callable[..., Any])
_KEY_CHECKS: WeakKeyDictionary[Callable[..., Any], KeyCheck] = WeakKeyDictionary()


def checks_key_with(check: KeyCheck) -> Callable[[_Endpoint], _Endpoint]:
    """Return a decorator (put it under the route's ``@router.post``) marking a write route's
    endpoint as checking its key with ``check`` before its input.

    FastAPI decodes and validates a body and parameters before the route and its dependencies
    run. A request it refuses so is checked with ``check`` first (by ``audited_error_handler``):
    a key that may not write is refused as such (401, 403) whatever its input, and an input
    refused from a key that may is on record under the route's action, not as ``request``.
    """

    def mark(endpoint: _Endpoint) -> _Endpoint:
        _KEY_CHECKS[endpoint] = check
        return endpoint

    return mark


@dataclass(frozen=True)
class AuditTarget:
    """What a request is about to do: the action and the object (kind, name, tenant)."""

    action: str
    kind: str = ""
    name: str = ""
    tenant: str = ""


def begin(request: Request, action: str, kind: str = "", name: str = "", tenant: str = "") -> None:
    """Name the mutation this request is attempting, so a refusal or failure is recorded as such."""
    request.state.audit = AuditTarget(action, kind, name, tenant)


def recorder(
    request: Request, principal: Principal, action: str
) -> Callable[[Sequence[tuple[str, str, str, str]]], list[AuditEvent]]:
    """Return what makes the records of a successful mutation, one per ``(kind, name, tenant,
    reason)`` object. Routes hand it to the Store, which writes the records in the mutation's
    own transaction: a committed change always has its record."""
    request_id = request_id_of(request)

    def events(objects: Sequence[tuple[str, str, str, str]]) -> list[AuditEvent]:
        return [
            AuditEvent(
                action=action,
                result="ok",
                actor=principal.key_id,
                role=principal.role,
                tenant=tenant or principal.tenant or "",
                object_kind=kind,
                object_name=name,
                reason=reason,
                request_id=request_id,
            )
            for kind, name, tenant, reason in objects
        ]

    return events


async def record_ok(
    node: Node,
    request: Request,
    principal: Principal,
    action: str,
    objects: Sequence[tuple[str, str, str, str]],
) -> None:
    """Record a change that is not kept in the database (a deployment loaded or unloaded
    through the repository API), before making it: when the record cannot be written the
    change is not made (the error propagates)."""
    assert node.store is not None
    await node.store.audit.append_async(recorder(request, principal, action)(objects))


async def record_refusal(node: Node, request: Request, exc: GpuvisorError) -> None:
    """Record ``exc`` if it refused a key or a role, failed a mutation, or refused a write for
    its input (as ``request``, naming the endpoint, when the route had not named its action);
    else do nothing.

    A 404 counts as a refusal when a tenant key named another tenant (tenant keys see only
    their own objects, so the API answers "not found" rather than "forbidden").
    """
    target: AuditTarget | None = getattr(request.state, "audit", None)
    principal: Principal | None = getattr(request.state, "principal", None)
    named_tenant = (target.tenant if target else "") or request.query_params.get("tenant") or ""
    result: AuditResult
    if isinstance(exc, Unauthenticated):
        result, principal = "denied", None
    elif isinstance(exc, Forbidden) or (
        isinstance(exc, NotFound)
        and principal is not None
        and principal.role == "tenant"
        and named_tenant not in ("", principal.tenant)
    ):
        result = "denied"
    elif target is not None or (principal is not None and _is_refused_write(request, exc)):
        result = "failed"
    else:
        return
    endpoint = f"{request.method} {redact_secrets(request.url.path)}"
    if isinstance(exc, Unauthenticated) or target is None:
        action = "authenticate" if isinstance(exc, Unauthenticated) else "request"
        target = AuditTarget(action, "endpoint", endpoint, named_tenant)
    key_id = str(exc.fields.get("key_id", "")) if isinstance(exc, Unauthenticated) else ""
    # Each refusal is recorded, but no caller may grow the database as fast as it sends:
    # past a budget, refusals are counted into the caller's next record. The caller is its
    # address without a valid key, its key with one (a tenant key asking again and again
    # for what it may not see).
    if isinstance(exc, Unauthenticated) or principal is None:
        caller = request.client.host if request.client is not None else ""
    else:
        caller = f"key gvk_{principal.key_id}"
    suppressed = _refusal_budget(node).take(caller)
    if suppressed is None:
        return  # counted: the caller's next record says how many
    more = f" (and {suppressed} more from {caller} not recorded one by one)" if suppressed else ""
    reason = _clipped(f"{exc.http_status} {exc.message}{more}")
    await _append(node, [_event(request, target, principal, result, reason, key_id)])


_BUDGETS: WeakKeyDictionary[Node, RefusalBudget] = WeakKeyDictionary()


def _refusal_budget(node: Node) -> RefusalBudget:
    budget = _BUDGETS.get(node)
    if budget is None:
        budget = _BUDGETS[node] = RefusalBudget()
    return budget


def _is_refused_write(request: Request, exc: GpuvisorError) -> bool:
    return request.method not in _READS and refused_for_its_input(exc)


def _clipped(reason: str) -> str:
    return reason if len(reason) <= _MAX_REASON else reason[: _MAX_REASON - 1] + "…"


async def _key_refusal(node: Node, request: Request) -> GpuvisorError | None:
    """Check the key of a write refused for its input before its route checked it (FastAPI
    reads the body and parameters first): with the route's own check where it names one and
    has not run (``checks_key_with``), else by authenticating it. Return the key's refusal, or
    None with the caller (and the route's action) kept on the request for the record. A write
    from a key that may not make it is refused for that, whatever its input."""
    route = request.scope.get("route")
    endpoint = getattr(route, "endpoint", None)
    check = _KEY_CHECKS.get(endpoint) if callable(endpoint) else None
    if check is not None and getattr(request.state, "audit", None) is None:
        try:
            await check(request)
        except GpuvisorError as refused:
            return refused
        return None
    if getattr(request.state, "principal", None) is not None:
        return None
    headers = request.headers
    try:
        key = extract_key(headers.get("authorization"), headers.get("x-api-key"))
        request.state.principal = node.authenticate(key)
    except Unauthenticated as refused:
        return refused
    return None


def _event(
    request: Request,
    target: AuditTarget,
    principal: Principal | None,
    result: AuditResult,
    reason: str,
    key_id: str = "",
) -> AuditEvent:
    """The record of ``target`` attempted by ``principal`` (``key_id`` when no key was valid);
    a key's secret that a caller put where a name or tenant goes is not recorded."""
    return AuditEvent(
        action=target.action,
        result=result,
        actor=principal.key_id if principal else key_id,
        role=principal.role if principal else "",
        tenant=redact_secrets(target.tenant or (principal.tenant if principal else None) or ""),
        object_kind=target.kind,
        object_name=redact_secrets(target.name),
        reason=redact_secrets(reason),
        request_id=request_id_of(request),
    )


def audited_error_handler(node: Node) -> Callable[[Request, Exception], Awaitable[Response]]:
    """Return the app's GpuvisorError handler: record the refusal, then render it as usual."""

    async def handle(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GpuvisorError)
        if _is_refused_write(request, exc):
            exc = await _key_refusal(node, request) or exc
        await record_refusal(node, request, exc)
        return gpuvisor_error_response(request, exc)

    return handle


# SQLite's words for a database the node cannot write now, and what the node answers (503):
# the log level and line, the message, and when to try again
_DATABASE_UNAVAILABLE = {
    "database or disk is full": (
        logging.ERROR,
        "the database's disk is full",
        "the disk that holds the node's database is full, and nothing was changed: free some "
        "space there, then try again",
        30.0,
    ),
    "database is locked": (
        logging.WARNING,
        "the database is locked by another process",
        "the database is busy: another process holds its write lock, and nothing was "
        "changed. Try again; if this lasts, look for a process holding the node's database "
        "open (a sqlite3 shell in a transaction, a backup)",
        1.0,
    ),
}


def database_busy_handler(node: Node) -> Callable[[Request, Exception], Awaitable[Response]]:
    """Return the app's handler for database errors: a SQLite database another process holds
    the write lock of past the busy timeout, or whose disk is full, is a 503 with Retry-After
    (nothing was changed, and no audit record can be written either: the line in the log is
    the record); any other database error is a bug (``audited_unexpected``)."""
    unexpected = audited_unexpected_handler(node)

    async def handle(request: Request, exc: Exception) -> Response:
        text = str(exc)
        known = next((v for k, v in _DATABASE_UNAVAILABLE.items() if k in text), None)
        if known is None:
            return await unexpected(request, exc)
        level, what, message, retry_after = known
        log.log(
            level,
            "%s %s: %s; answered 503",
            request.method,
            redact_secrets(request.url.path),
            what,
        )
        return gpuvisor_error_response(request, Unavailable(message, retry_after=retry_after))

    return handle


def audited_unexpected_handler(node: Node) -> Callable[[Request, Exception], Awaitable[Response]]:
    """Return the app's handler for bugs (500): a mutation that failed on one is recorded as
    failed, with the error, before the 500 is rendered as usual."""

    async def handle(request: Request, exc: Exception) -> Response:
        target: AuditTarget | None = getattr(request.state, "audit", None)
        principal: Principal | None = getattr(request.state, "principal", None)
        if target is not None:
            reason = f"500 internal error: {described_error(exc)}"
            await _append(node, [_event(request, target, principal, "failed", reason)])
        return unexpected_error_response(request, exc)

    return handle


async def _append(node: Node, events: list[AuditEvent]) -> None:
    # The record of a refusal or failure: writing it must not turn the answer into a 500 (no
    # change was made), so a failed write is logged as an error with the record instead.
    if node.store is None:
        return
    try:
        await node.store.audit.append_async(events)
    except Exception:
        log.exception(
            "could not write %d audit record(s): %s",
            len(events),
            "; ".join(f"{e.action} {e.object_kind} {e.object_name} {e.result}" for e in events),
        )
