"""The admin REST API under /api/v1: apply manifests, read and delete objects, devices,
slices, keys and the audit log. Request and response bodies are pydantic models, so all of it is in
/openapi.json."""

from __future__ import annotations

import asyncio
import difflib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, BeforeValidator, Field

from gpuvisor.api import audit
from gpuvisor.api.errors import error_responses
from gpuvisor.api.oip import principal_of, read_body
from gpuvisor.control.checks import check_apply
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
from gpuvisor.spec.kinds import (
    API_VERSION,
    DEFAULT_POOL,
    TENANT_SCOPED,
    Deployment,
    Metadata,
    Model,
    Pool,
    Resource,
    Tenant,
    resource_key,
)
from gpuvisor.spec.loader import (
    load_documents,
    resource_from_dict,
    resource_to_dict,
)
from gpuvisor.store.repo import StoredObject
from gpuvisor.units import parse_duration

__all__ = ["admin_router"]

PLURALS = {
    "tenants": "Tenant",
    "profiles": "Profile",
    "pools": "Pool",
    "models": "Model",
    "deployments": "Deployment",
}
_MAX_MANIFEST = 4 << 20
# Any other kind answers 404 naming these (so the document lists them, and the route checks).
_PLURAL = PathParam(
    description="the kind of object, in the plural", json_schema_extra={"enum": list(PLURALS)}
)
_NAME = PathParam(description="the object's name")


class ApplyResult(BaseModel):
    kind: str
    name: str
    tenant: str | None = None
    outcome: Literal["created", "configured", "unchanged"]
    warnings: list[str] = Field(
        default_factory=list,
        description="stored, but will not serve as it is: a model file missing on the node, "
        "replicas that fit on no device",
    )


class ApplyResponse(BaseModel):
    results: list[ApplyResult]


class ObjectList(BaseModel):
    """Objects of one kind as a List, which `gpuvisor apply -f` (POST /apply) takes back."""

    api_version: Literal["gpuvisor/v1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["List"] = "List"
    items: list[dict[str, Any]] = Field(
        description="manifests (apiVersion, kind, metadata, spec), with the node's status where "
        "it reports one; apply ignores status"
    )


class KeyCreate(BaseModel):
    role: Literal["admin", "operator", "tenant"] = "tenant"
    tenant: str | None = None
    description: str = ""
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


class DeletedObject(BaseModel):
    kind: str
    name: str
    tenant: str | None


class DeleteResult(BaseModel):
    deleted: DeletedObject


_MANIFESTS = {
    "type": "object",
    "description": "a manifest; the body may hold several, as YAML documents separated by ---",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"type": "string", "enum": ["gpuvisor/v1"]},
        "kind": {"type": "string", "enum": ["Tenant", "Profile", "Pool", "Model", "Deployment"]},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string"}, "tenant": {"type": "string"}},
        },
        "spec": {"type": "object"},
    },
}
_APPLY_REQUEST = {
    "requestBody": {
        "required": True,
        "description": "YAML manifests (multi-document), as 'gpuvisor apply -f' sends them",
        "content": {
            "application/yaml": {"schema": _MANIFESTS},
            "text/yaml": {"schema": _MANIFESTS},
        },
    }
}


class AuditRecordView(BaseModel):
    seq: int
    at: str = Field(description="RFC 3339 UTC time, microseconds")
    actor: str = Field(description="key id without gvk_; empty when no valid key was sent")
    role: str
    tenant: str = Field(description="the tenant the action concerns; empty for none")
    action: str
    object_kind: str
    object_name: str
    result: Literal["ok", "denied", "failed"]
    reason: str
    request_id: str
    prev_hash: str
    hash: str


class AuditList(BaseModel):
    items: list[AuditRecordView]


def _key_view(info: KeyInfo) -> dict[str, Any]:
    return {
        "id": info.display_id,
        "role": info.role,
        "tenant": info.tenant,
        "description": info.description,
        "created_at": info.created_at,
        "expires_at": info.expires_at,
        "revoked_at": info.revoked_at,
        "last_used_at": info.last_used_at,
    }


def require_admin(principal: Principal) -> None:
    if principal.role != "admin":
        raise Forbidden("this needs an admin key (the one in <state>/admin.key)")


def _time_not_number(value: Any) -> Any:
    """Refuse a bare number for a time: pydantic would read it as seconds since 1970, which
    no one filtering an audit log means."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return value
        raise ValueError("give a time like 2026-11-21T10:00:00Z, not a number")
    return value


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


def _revocation_record(outcome: Revocation) -> tuple[str, str, str, str]:
    """The audit record of a revocation: ``revoked``, or for a key that already was
    ``unchanged: …`` (as apply records an object it did not change)."""
    key = outcome.key
    reason = "revoked"
    if outcome.already_revoked and key.revoked_at is not None:
        reason = f"unchanged: already revoked at {key.revoked_at:%Y-%m-%dT%H:%M:%SZ}"
    return ("ApiKey", key.display_id, key.tenant or "", reason)


def _may_write(principal: Principal, resource: Resource) -> None:
    if principal.role == "admin":
        return
    if (
        principal.role == "tenant"
        and resource.kind in TENANT_SCOPED
        and resource.metadata.tenant == principal.tenant
    ):
        return
    if principal.role == "tenant" and resource.kind in TENANT_SCOPED:
        raise NotFound(f"tenant '{resource.metadata.tenant}' not found")
    raise Forbidden(f"{principal.kind_of_key} may not change {resource.kind} objects")


def admin_router(node: Node) -> APIRouter:
    # every route needs a key: without a valid one it answers 401
    router = APIRouter(prefix="/api/v1", tags=["admin"], responses=error_responses(401))

    def store() -> Any:
        assert node.store is not None
        return node.store

    async def all_resources() -> list[Resource]:
        objects = await asyncio.to_thread(store().list)
        return [resource_from_dict(o.body) for o in objects]

    @router.post(
        "/apply",
        response_model=ApplyResponse,
        responses=error_responses(400, 403, 404, 413),
        openapi_extra=_APPLY_REQUEST,
        summary="Apply YAML manifests (multi-document)",
    )
    async def apply(request: Request) -> dict[str, Any]:
        principal = principal_of(node, request)
        audit.begin(request, "apply")
        raw = await read_body(
            request, _MAX_MANIFEST, "fixed for manifests: split a larger apply into several"
        )
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest("manifests must be UTF-8 YAML text") from None
        source = request.headers.get("x-gpuvisor-source", "request")
        base = request.headers.get("x-gpuvisor-base-dir")
        resources = load_documents(text, source=source, base_dir=Path(base) if base else None)
        if not resources:
            raise InvalidRequest(f"{source}: no documents to apply")
        for resource in resources:
            if resource.kind in ("Node", "Fleet"):
                raise InvalidRequest(
                    f"{resource.kind} documents are not applied to a running node: "
                    "pass a Node file to 'gpuvisor up --config', a Fleet to 'gpuvisor plan'"
                )
            meta = resource.metadata
            audit.begin(request, "apply", resource.kind, meta.name, meta.tenant or "")
            _may_write(principal, resource)
        if len(resources) > 1:  # a failure from here on concerns the whole manifest
            audit.begin(request, "apply")
        existing = await all_resources()
        check_apply(resources, existing)
        objects = [StoredObject(*resource_key(r), body=resource_to_dict(r)) for r in resources]
        ok = audit.recorder(request, principal, "apply")
        applied = await asyncio.to_thread(
            store().apply,
            objects,
            lambda applied: ok([(o.kind, o.name, o.tenant, outcome) for o, outcome in applied]),
        )
        if node.controller is not None:
            await node.controller.reconcile()
        bodies = {resource_key(r): r for r in resources}
        return {
            "results": [
                {
                    "kind": o.kind,
                    "name": o.name,
                    "tenant": o.tenant or None,
                    "outcome": outcome,
                    "warnings": _apply_warnings(bodies.get((o.kind, o.tenant, o.name))),
                }
                for o, outcome in applied
            ]
        }

    def _apply_warnings(resource: Resource | None) -> list[str]:
        """What will keep an applied object from serving, as far as the node can tell now."""
        if isinstance(resource, Model):
            source = Path(resource.spec.source)
            if not source.is_file():
                return [
                    f"model file {source} is not on this node (yet): deployments of this "
                    "model stay Failed until it is (they load as soon as it appears)"
                ]
        if isinstance(resource, Deployment) and node.controller is not None:
            slices = node.controller.deployment_slices(
                resource.metadata.tenant or "", resource.metadata.name
            )
            pending = [s for s in slices if s.state == "Pending"]
            if pending:
                replicas = len({s.replica_id for s in slices})
                return [f"{len(pending)} of {replicas} replica(s) Pending: {pending[0].reason}"]
        return []

    async def _find(principal: Principal, kind: str, name: str, tenant: str | None) -> StoredObject:
        if kind in TENANT_SCOPED:
            tenant = tenant or principal.tenant
            if not tenant:
                raise InvalidRequest(f"{kind} objects belong to a tenant: add ?tenant=NAME")
        else:
            tenant = ""
        candidates = await asyncio.to_thread(store().list, kind, tenant)
        for o in candidates:
            if (o.name == name or (kind == "Model" and o.body["metadata"]["name"] == name)) and (
                principal.may_see(o.tenant)
                or (o.tenant == "" and (kind != "Tenant" or o.name == principal.tenant))
            ):
                return o  # type: ignore[no-any-return]
        raise NotFound(f"{kind} '{name}' not found" + (f" in tenant '{tenant}'" if tenant else ""))

    def _with_status(body: dict[str, Any]) -> dict[str, Any]:
        if body.get("kind") != "Deployment" or node.controller is None:
            return body
        tenant, name = body["metadata"].get("tenant", ""), body["metadata"]["name"]
        slices = node.controller.deployment_slices(tenant, name)
        rollout = node.controller.rollout(tenant, name)
        return {
            **body,
            "status": {
                "replicas": rollout.replicas,
                "readyReplicas": rollout.ready,
                "updatedReplicas": rollout.updated,
                "rollout": rollout.describe(),
                "unloaded": (tenant, name) in node.controller.unloaded,
                "slices": [s.to_dict() for s in slices],
            },
        }

    # ---- devices, slices, node ------------------------------------------------------------

    @router.get("/devices", summary="Devices this node serves on")
    async def devices(request: Request) -> dict[str, Any]:
        principal = principal_of(node, request)
        assert node.controller is not None
        items = []
        for device in node.topology.devices:
            on_device = [s for s in node.controller.slices.values() if s.device_id == device.id]
            items.append(
                {
                    **device.to_dict(),
                    # a tenant key sees its own slices' ids only (they name their owners)
                    "slices": [s.id for s in on_device if principal.may_see(s.tenant)],
                    "memoryReserved": sum(s.memory for s in on_device),
                }
            )
        return {"items": items}

    @router.get("/slices", summary="Slices (placed replicas) with state and reason")
    async def slices(request: Request) -> dict[str, Any]:
        principal = principal_of(node, request)
        assert node.controller is not None
        return {
            "items": [
                s.to_dict() for s in node.controller.slices.values() if principal.may_see(s.tenant)
            ]
        }

    @router.get("/status", summary="Node summary")
    async def status(request: Request) -> dict[str, Any]:
        principal = principal_of(node, request)
        assert node.controller is not None
        visible = [s for s in node.controller.slices.values() if principal.may_see(s.tenant)]
        states: dict[str, int] = {}
        for s in visible:
            states[s.state] = states.get(s.state, 0) + 1
        return {
            "ready": node.ready,
            "startedAt": node.started_at,
            "devices": len(node.topology.devices),
            "slices": states,
            "principal": {"role": principal.role, "tenant": principal.tenant},
        }

    # ---- keys -------------------------------------------------------------------------------

    async def key_creator(request: Request) -> Principal:
        """The admin key behind a key creation, checked before FastAPI validates the body (a
        dependency runs first): a refused key or role is answered 401 or 403, and recorded
        with what it asked for, whatever else the body holds."""
        principal = principal_of(node, request)
        role, tenant = _requested_key(await request.body())
        audit.begin(request, "key.create", "ApiKey", "", tenant)
        if principal.role != "admin":
            raise Forbidden(
                f"{principal.kind_of_key} may not create API keys (this asked for "
                f"{_key_wanted(role, tenant)}): it needs an admin key (the one in "
                "<state>/admin.key)"
            )
        return principal

    @router.post(
        "/keys",
        response_model=KeyCreated,
        status_code=201,
        responses=error_responses(400, 403),
        summary="Create an API key",
    )
    async def create_key(
        request: Request, body: KeyCreate, principal: Principal = Depends(key_creator)
    ) -> dict[str, Any]:
        audit.begin(request, "key.create", "ApiKey", "", body.tenant or "")
        if body.role == "tenant" and body.tenant:
            known = await asyncio.to_thread(store().get, "Tenant", "", body.tenant)
            if known is None:
                tenants = await asyncio.to_thread(store().list, "Tenant")
                raise _no_such_tenant(body.tenant, [t.name for t in tenants])
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
            expires_at = datetime.now(UTC) + timedelta(seconds=lifetime)
        assert node.keys is not None
        expiry = f", expires {expires_at:%Y-%m-%dT%H:%M:%SZ}" if expires_at else ""
        ok = audit.recorder(request, principal, "key.create")
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
        responses=error_responses(403, 404),
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
        outcome = await asyncio.to_thread(
            node.keys.revoke_once, plain, lambda outcome: ok([_revocation_record(outcome)])
        )
        if outcome is None:
            raise NotFound(f"API key gvk_{plain} not found")
        if outcome.already_revoked:
            return {"revoked": f"gvk_{plain}", "already_revoked_at": outcome.key.revoked_at}
        return {"revoked": f"gvk_{plain}"}

    # ---- audit log --------------------------------------------------------------------------

    @router.get(
        "/audit",
        response_model=AuditList,
        responses=error_responses(403),
        summary="List audit records (newest last)",
    )
    async def list_audit(
        request: Request,
        actor: str | None = Query(None, description="key id, with or without gvk_"),
        tenant: str | None = Query(None, description="the tenant the action concerns"),
        action: str | None = Query(
            None,
            description="apply, delete, key.create, key.revoke, device.cordon, device.uncordon, "
            "model.load, model.unload, authenticate or request",
        ),
        result: Literal["ok", "denied", "failed"] | None = None,
        since: Annotated[
            datetime | None,
            Query(description="records at or after this time (ISO 8601)"),
            BeforeValidator(_time_not_number),
        ] = None,
        until: Annotated[
            datetime | None,
            Query(description="records before this time (ISO 8601)"),
            BeforeValidator(_time_not_number),
        ] = None,
        limit: int = Query(100, ge=1, le=1000, description="the newest this many matches"),
    ) -> dict[str, Any]:
        principal = principal_of(node, request)
        if not principal.sees_all:
            raise Forbidden("the audit log is for admin and operator keys")
        records = await asyncio.to_thread(
            store().audit.list,
            actor=actor,
            tenant=tenant,
            action=action,
            result=result,
            since=since,
            until=until,
            limit=limit,
        )
        return {"items": [r.to_dict() for r in records]}

    # generic kinds last: '/{plural}' would otherwise shadow /devices, /slices, /keys
    @router.get(
        "/{plural}",
        response_model=ObjectList,
        responses=error_responses(404),
        summary="List objects of a kind",
    )
    async def list_objects(
        request: Request, plural: str = _PLURAL, tenant: str | None = None
    ) -> dict[str, Any]:
        principal = principal_of(node, request)
        kind = _kind(plural)
        if principal.role == "tenant" and tenant and tenant != principal.tenant:
            # another tenant's objects do not exist for a tenant key: 404, as for one object
            raise NotFound(f"tenant '{tenant}' not found")
        objects = await asyncio.to_thread(store().list, kind, tenant)
        items = [
            _with_status(o.body)
            for o in objects
            if principal.may_see(o.tenant)
            or (
                (o.tenant == "" and kind in ("Profile", "Pool"))
                or (kind == "Tenant" and o.name == principal.tenant)
            )
        ]
        if kind == "Pool" and not tenant and all(o.name != DEFAULT_POOL for o in objects):
            items.append(_implicit_default_pool())
            items.sort(key=lambda item: str(item["metadata"]["name"]))
        return {"apiVersion": API_VERSION, "kind": "List", "items": items}

    @router.get(
        "/{plural}/{name}",
        responses=error_responses(400, 404),
        summary="Get one object (with status for deployments)",
    )
    async def get_object(
        request: Request, plural: str = _PLURAL, name: str = _NAME, tenant: str | None = None
    ) -> dict[str, Any]:
        principal = principal_of(node, request)
        kind = _kind(plural)
        try:
            found = await _find(principal, kind, name, tenant)
        except NotFound:
            if (kind, name) == ("Pool", DEFAULT_POOL):
                return _implicit_default_pool()
            raise
        return _with_status(found.body)

    @router.delete(
        "/{plural}/{name}",
        response_model=DeleteResult,
        responses=error_responses(400, 403, 404, 409),
        summary="Delete one object",
    )
    async def delete_object(
        request: Request, plural: str = _PLURAL, name: str = _NAME, tenant: str | None = None
    ) -> dict[str, Any]:
        principal = principal_of(node, request)
        kind = _kind(plural)
        audit.begin(request, "delete", kind, name, tenant or principal.tenant or "")
        try:
            found = await _find(principal, kind, name, tenant)
        except NotFound:
            if (kind, name) == ("Pool", DEFAULT_POOL):
                _may_write(principal, _IMPLICIT_DEFAULT_POOL)  # 403 for whoever may not
                raise Conflict(
                    f"Pool {DEFAULT_POOL} cannot be deleted: it was never applied. It is the "
                    "implicit pool of deployments that name none (every device); apply a Pool "
                    f"named {DEFAULT_POOL!r} to change it"
                ) from None
            raise
        _may_write(principal, resource_from_dict(found.body))
        users = _users_of(await all_resources(), kind, found)
        if users:
            raise Conflict(
                f"{kind} {found.name} is used by {', '.join(users)}: delete or change those first"
            )
        ok = audit.recorder(request, principal, "delete")
        deleted = await asyncio.to_thread(
            store().delete,
            kind,
            found.tenant,
            found.name,
            lambda deleted: ok([(kind, found.name, found.tenant, "deleted")] if deleted else []),
        )
        if not deleted:  # another request deleted it meanwhile
            raise NotFound(f"{kind} {found.name} not found")
        if node.controller is not None:
            await node.controller.reconcile()
        return {"deleted": {"kind": kind, "name": found.name, "tenant": found.tenant or None}}

    return router


_IMPLICIT_DEFAULT_POOL = Pool(metadata=Metadata(name=DEFAULT_POOL))
"""The pool deployments that name none use while no Pool ``default`` is applied: an empty
selector (every device) and Pool's defaults for the rest, as the controller places them."""


def _implicit_default_pool() -> dict[str, Any]:
    """Return the implicit ``default`` pool as a stored Pool reads (keys sorted, as the store
    keeps them), with a status saying what it is."""

    def sorted_keys(value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        return {key: sorted_keys(value[key]) for key in sorted(value)}

    return {
        **sorted_keys(resource_to_dict(_IMPLICIT_DEFAULT_POOL)),
        "status": {
            "implicit": True,
            "note": "implicit: not applied; the pool of deployments that name none "
            f"(apply a Pool named {DEFAULT_POOL!r} to change it)",
        },
    }


def _kind(plural: str) -> str:
    kind = PLURALS.get(plural.lower())
    if kind is None:
        raise NotFound(f"unknown kind '{plural}' (expected one of {', '.join(PLURALS)})")
    return kind


def _users_of(resources: list[Resource], kind: str, obj: StoredObject) -> list[str]:
    """Return the objects that refer to ``obj`` (which must not be deleted under them)."""
    users = []
    for r in resources:
        refers = False
        if isinstance(r, Deployment):
            refers = (
                (kind == "Profile" and r.spec.profile == obj.name)
                or (kind == "Pool" and r.spec.pool == obj.name)
                or (
                    kind == "Model"
                    and r.metadata.tenant == obj.tenant
                    and r.spec.model_name == obj.body["metadata"]["name"]
                )
            )
        if kind == "Tenant" and r.kind in TENANT_SCOPED and r.metadata.tenant == obj.name:
            refers = True
        if kind == "Pool" and isinstance(r, Tenant) and obj.name in r.spec.pools:
            refers = True
        if refers:
            owner = f"{r.metadata.tenant}/" if r.metadata.tenant else ""
            users.append(f"{r.kind} {owner}{r.metadata.name}")
    return users
