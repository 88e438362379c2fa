"""API keys under /api/v1/keys: create, list and revoke them (admin keys only), every change and
every refusal on record."""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import json
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from gpuvisor.api import audit
from gpuvisor.api.errors import Text, error_responses
from gpuvisor.api.oip import principal_of
from gpuvisor.errors import Conflict, Forbidden, InvalidRequest, NotFound
from gpuvisor.node import Node
from gpuvisor.security.keys import (
    KEY_PREFIX,
    ROLES,
    KeyInfo,
    Principal,
    Revocation,
    claimed_key_id,
)
from gpuvisor.units import parse_duration

__all__ = [
    "KeyCreate",
    "KeyCreated",
    "KeyList",
    "KeyRevoked",
    "KeyView",
    "keys_router",
    "require_admin",
]


class KeyCreate(BaseModel):
    role: Literal["admin", "operator", "tenant"] = "tenant"
    tenant: Text | None = None
    description: Text = Field("", max_length=1024)
    expires_in: str | None = Field(
        default=None,
        alias="expiresIn",
        description="the key's lifetime in hours, minutes or seconds, like '720h' for 30 days "
        "('30d' is not accepted); the CLI's --expires-in",
    )


class KeyView(BaseModel):
    id: str
    role: str
    tenant: str | None
    description: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None = None


class KeyCreated(KeyView):
    key: str = Field(description="the secret, shown once")


class KeyList(BaseModel):
    items: list[KeyView]


class KeyRevoked(BaseModel):
    revoked: str = Field(description="the revoked key's id")
    already_revoked_at: datetime | None = Field(
        None,
        description="only when the key was revoked before this request: when (this request "
        "changed nothing, and is recorded with reason 'unchanged: already revoked at …')",
    )


def _key_view(info: KeyInfo) -> dict[str, Any]:
    """A key as the API shows it (``KeyView``): its fields, with the id as users see it."""
    return {**dataclasses.asdict(info), "id": info.display_id}


def require_admin(principal: Principal) -> None:
    """Raise Forbidden unless ``principal`` holds an admin key."""
    if principal.role != "admin":
        raise Forbidden(
            "this needs an admin key (the node writes its first one to admin.key in its state directory)"
        )


def _requested_key(raw: bytes) -> tuple[str, str]:
    """The role and tenant a key creation's body asks for, as far as it can be read: ("", "")
    for what it does not say or says wrongly (the body is validated later, by the route)."""
    try:
        body = json.loads(raw)
    except ValueError:
        return "", ""
    if not isinstance(body, dict):
        return "", ""
    role, tenant = body.get("role", "tenant"), body.get("tenant")
    return (role if role in ROLES else ""), (tenant if isinstance(tenant, str) else "")


def _key_wanted(role: str, tenant: str) -> str:
    """``an admin key``, ``a tenant key of 'retail'``: what a refused creation asked for."""
    if not role:
        return "a key"
    article = "an" if role[0] in "aeiou" else "a"
    return f"{article} {role} key" + (f" of '{tenant}'" if role == "tenant" and tenant else "")


def _no_such_tenant(tenant: str, known: list[str]) -> InvalidRequest:
    """The refusal of a key for a tenant that does not exist, naming the closest one."""
    close = difflib.get_close_matches(tenant, known, n=1)
    if close:
        return InvalidRequest(
            f"tenant '{tenant}' does not exist: did you mean '{close[0]}'? "
            "(a new tenant needs a Tenant applied first)"
        )
    return InvalidRequest(f"tenant '{tenant}' does not exist: apply a Tenant first")


_MAX_LIFETIME = 100 * 365 * 24 * 3600.0  # seconds; a key's expiry must be a date


def _revocation_record(outcome: Revocation) -> tuple[str, str, str, str]:
    """The audit record of a revocation: ``revoked``, or for a key that already was
    ``unchanged: …`` (as apply records an object it did not change)."""
    key = outcome.key
    reason = "revoked"
    if outcome.already_revoked and key.revoked_at is not None:
        reason = f"unchanged: already revoked at {key.revoked_at:%Y-%m-%dT%H:%M:%SZ}"
    return ("ApiKey", key.display_id, key.tenant or "", reason)


def keys_router(node: Node) -> APIRouter:
    """Return the router of /api/v1/keys (mount it before the admin router's generic
    ``/api/v1/{plural}`` routes, which would otherwise take /keys)."""
    # every route needs a key: without a valid one it answers 401
    router = APIRouter(prefix="/api/v1", tags=["admin"], responses=error_responses(401))

    async def key_creator(request: Request) -> Principal:
        """The admin key behind a key creation, checked before its body: a refused key or role
        is answered 401 or 403, and recorded with what it asked for, whatever else the body
        holds. As a dependency it runs before FastAPI validates the body; a body that is no
        JSON at all FastAPI refuses before any dependency runs, and then the audited error
        handler runs it first (``audit.checks_key_with``)."""
        principal = principal_of(node, request)
        role, tenant = _requested_key(await request.body())
        audit.begin(request, "key.create", "ApiKey", "", tenant)
        if principal.role != "admin":
            raise Forbidden(
                f"{principal.kind_of_key} may not create API keys (this asked for "
                f"{_key_wanted(role, tenant)}): it needs an admin key (the node writes its "
                "first one to admin.key in its state directory)"
            )
        return principal

    @router.post(
        "/keys",
        response_model=KeyCreated,
        status_code=201,
        responses=error_responses(400, 403),
        summary="Create an API key",
    )
    @audit.checks_key_with(key_creator)
    async def create_key(
        request: Request, body: KeyCreate, principal: Principal = Depends(key_creator)
    ) -> dict[str, Any]:
        audit.begin(request, "key.create", "ApiKey", "", body.tenant or "")
        expires_at = None
        if body.expires_in:
            # named as the API and the CLI call it: a CLI user never typed "expiresIn"
            field = f"expiresIn (--expires-in) {body.expires_in!r}"
            try:
                lifetime = parse_duration(body.expires_in)
            except ValueError:
                raise InvalidRequest(
                    f"{field} is not a duration: give hours, minutes or seconds, like '720h' "
                    "for 30 days (units h, m, s, ms, us, ns)"
                ) from None
            if lifetime <= 0:
                raise InvalidRequest(f"{field} is no lifetime: give one longer than 0")
            if lifetime > _MAX_LIFETIME:
                raise InvalidRequest(
                    f"{field} is longer than 100 years ({_MAX_LIFETIME // 3600:.0f}h): give a "
                    "shorter lifetime, or none for a key that does not expire"
                )
            expires_at = datetime.now(UTC) + timedelta(seconds=lifetime)
        assert node.keys is not None
        expiry = f", expires {expires_at:%Y-%m-%dT%H:%M:%SZ}" if expires_at else ""
        ok = audit.recorder(request, principal, "key.create")
        # under the node's write lock: a tenant deleted meanwhile revokes its keys, and one
        # created between its listing of them and its commit would outlive it
        async with node.writes:
            if body.role == "tenant" and body.tenant:
                store = node.store
                assert store is not None
                known = await asyncio.to_thread(store.get, "Tenant", "", body.tenant)
                if known is None:
                    tenants = await asyncio.to_thread(store.list, "Tenant")
                    raise _no_such_tenant(body.tenant, [t.name for t in tenants])
            info, secret = await asyncio.to_thread(
                node.keys.create,
                body.role,
                body.tenant,
                body.description,
                expires_at,
                lambda info: ok(
                    [("ApiKey", info.display_id, info.tenant or "", f"role {info.role}{expiry}")]
                ),
            )
        return {**_key_view(info), "key": secret}

    async def _refuse_last_admin_key(key_id: str) -> None:
        """Refuse to revoke the node's last valid admin key: no admin could then create,
        revoke or apply anything until the node restarted with a new one."""
        assert node.keys is not None
        now = datetime.now(UTC)
        admins = [
            k.display_id
            for k in await asyncio.to_thread(node.keys.list)
            if k.role == "admin"
            and k.revoked_at is None
            and (k.expires_at is None or k.expires_at > now)
        ]
        if admins == [key_id]:
            raise Conflict(
                f"{key_id} is the node's last valid admin key: create another first "
                "(gpuvisor keys create --role admin), then revoke this one"
            )

    @router.get(
        "/keys",
        response_model=KeyList,
        responses=error_responses(403),
        summary="List API keys (never their secrets)",
    )
    async def list_keys(request: Request, tenant: str | None = None) -> dict[str, Any]:
        require_admin(principal_of(node, request))
        assert node.keys is not None
        infos = await asyncio.to_thread(node.keys.list, tenant)
        return {"items": [_key_view(i) for i in infos]}

    @router.delete(
        "/keys/{key_id}",
        response_model=KeyRevoked,
        response_model_exclude_none=True,
        responses=error_responses(403, 404, 409),
        summary="Revoke an API key (a revoked one stays revoked since its first revocation)",
    )
    async def revoke_key(request: Request, key_id: str) -> dict[str, Any]:
        principal = principal_of(node, request)
        # a whole key pasted in place of its id: use the id, and keep the secret out of the
        # audit record and the answer
        plain = claimed_key_id(key_id) or key_id.removeprefix(KEY_PREFIX)
        if "_" in plain:
            raise InvalidRequest(
                "give the key's id (gvk_ and 8 letters or digits, as `gpuvisor keys list` "
                "shows it), not its secret"
            )
        audit.begin(request, "key.revoke", "ApiKey", f"gvk_{plain}")
        require_admin(principal)
        assert node.keys is not None
        ok = audit.recorder(request, principal, "key.revoke")
        # the last-admin check and the revocation under the node's write lock: two admins
        # revoking each other at once each saw the other's key valid, and both went
        async with node.writes:
            await _refuse_last_admin_key(f"gvk_{plain}")
            outcome = await asyncio.to_thread(
                node.keys.revoke_once, plain, lambda outcome: ok([_revocation_record(outcome)])
            )
        if outcome is None:
            raise NotFound(f"API key gvk_{plain} not found")
        if outcome.already_revoked:
            return {"revoked": f"gvk_{plain}", "already_revoked_at": outcome.key.revoked_at}
        return {"revoked": f"gvk_{plain}"}

    return router
