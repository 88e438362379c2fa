"""The admin REST API under /api/v1: apply manifests, read and delete objects, and the node's
devices, slices and status (keys are api/keys.py's, the audit log api/audit_log.py's). Request
and response bodies are pydantic models, so all of it is in /openapi.json."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, Field

from gpuvisor.api import audit
from gpuvisor.api.errors import error_responses
from gpuvisor.api.objects import (
    IMPLICIT_DEFAULT_POOL,
    PLURALS,
    implicit_default_pool,
    instances_serving,
    kind_of_plural,
    may_write,
    users_of,
)
from gpuvisor.api.oip import principal_of, read_body
from gpuvisor.control.apply_effects import apply_notes, apply_warnings
from gpuvisor.control.checks import check_apply
from gpuvisor.control.slices import SliceState
from gpuvisor.errors import Conflict, Forbidden, InvalidRequest, NotFound
from gpuvisor.inventory.device import Device
from gpuvisor.node import Node
from gpuvisor.security.keys import Principal
from gpuvisor.security.model_roots import check_model_roots
from gpuvisor.spec.kinds import (
    API_VERSION,
    DEFAULT_POOL,
    TENANT_SCOPED,
    Deployment,
    Resource,
    resource_key,
)
from gpuvisor.spec.loader import (
    load_documents,
    resource_from_dict,
    resource_to_dict,
)
from gpuvisor.store.repo import StoredObject

__all__ = ["PLURALS", "admin_router"]

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
        "replicas that fit on no device (a deployment's, or those of every deployment using "
        "a profile)",
    )
    notes: list[str] = Field(
        default_factory=list,
        description="what the apply set moving: the deployments that roll to a new model version",
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


def admin_router(node: Node) -> APIRouter:
    """Return the router of apply, objects, devices, slices and status under /api/v1 (mount it
    after every other router under /api/v1: its ``/api/v1/{plural}`` routes would take theirs)."""
    # every route needs a key: without a valid one it answers 401
    router = APIRouter(prefix="/api/v1", tags=["admin"], responses=error_responses(401))

    def store() -> Any:
        assert node.store is not None
        return node.store

    # One write at a time: an apply's checks (references, quotas, signing) and a delete's
    # check that nothing uses the object hold only against what is stored when it commits.
    # Two applies checked side by side would each pass a quota that both together exceed,
    # and a delete beside an apply could remove what the apply refers to.
    writes = node.writes

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
        # parsed off the event loop: a large manifest must not stall everyone's inference
        resources = await asyncio.to_thread(
            load_documents, text, source=source, base_dir=Path(base) if base else None
        )
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
            may_write(principal, resource)
        if len(resources) > 1:  # a failure from here on concerns the whole manifest
            audit.begin(request, "apply")
        objects = [StoredObject(*resource_key(r), body=resource_to_dict(r)) for r in resources]
        ok = audit.recorder(request, principal, "apply")
        async with writes:
            existing = await all_resources()
            if principal.role == "tenant" and principal.tenant:
                check_model_roots(principal.tenant, resources, existing)
            check_apply(resources, existing)
            applied = await asyncio.to_thread(
                store().apply,
                objects,
                lambda applied: ok([(o.kind, o.name, o.tenant, outcome) for o, outcome in applied]),
            )
        if node.controller is not None:
            await node.controller.reconcile()
        bodies = {resource_key(r): r for r in resources}
        # a deployment in this apply says itself that it is Pending: its profile does not too
        deployments = frozenset(
            (r.metadata.tenant or "", r.metadata.name)
            for r in resources
            if isinstance(r, Deployment)
        )
        return {
            "results": [
                {
                    "kind": o.kind,
                    "name": o.name,
                    "tenant": o.tenant or None,
                    "outcome": outcome,
                    "warnings": apply_warnings(
                        bodies.get((o.kind, o.tenant, o.name)), node.controller, deployments
                    ),
                    "notes": apply_notes(bodies.get((o.kind, o.tenant, o.name)), node.controller),
                }
                for o, outcome in applied
            ]
        }

    async def _find(principal: Principal, kind: str, name: str, tenant: str | None) -> StoredObject:
        if kind in TENANT_SCOPED:
            tenant = tenant or principal.tenant
            if not tenant:
                raise InvalidRequest(f"{kind} objects belong to a tenant: add ?tenant=NAME")
        else:
            tenant = ""
        candidates = await asyncio.to_thread(store().list, kind, tenant)
        found: list[StoredObject] = [
            o
            for o in candidates
            if (o.name == name or (kind == "Model" and o.body["metadata"]["name"] == name))
            and (
                principal.may_see(o.tenant)
                or (o.tenant == "" and (kind != "Tenant" or o.name == principal.tenant))
            )
        ]
        if len(found) > 1:  # a Model named without its version, of which several are stored
            versions = ", ".join(str(o.body["spec"].get("version")) for o in found)
            raise InvalidRequest(
                f"model '{name}' has versions {versions}: name one as {name}@VERSION"
            )
        if found:
            return found[0]
        if tenant and principal.tenant is None:
            await _check_tenant_exists(tenant)
        raise NotFound(f"{kind} '{name}' not found" + (f" in tenant '{tenant}'" if tenant else ""))

    async def _check_tenant_exists(tenant: str) -> None:
        """A misspelt tenant is the mistake to name, not an object missing from it or an
        empty list (a tenant key sees only its own tenant, which exists)."""
        if await asyncio.to_thread(store().get, "Tenant", None, tenant) is None:
            raise NotFound(f"unknown tenant '{tenant}' (`gpuvisor get tenants` lists them)")

    async def _revoke_keys_of(request: Request, principal: Principal, tenant: str) -> None:
        """Revoke a deleted tenant's keys: they would otherwise go on authenticating, and open
        a tenant created later under the same name."""
        if node.keys is None:
            return
        revoked = audit.recorder(request, principal, "key.revoke")
        reason = f"revoked: tenant '{tenant}' was deleted"
        for key in await asyncio.to_thread(node.keys.list, tenant):
            if key.revoked_at is None:
                await asyncio.to_thread(
                    node.keys.revoke_once,
                    key.id,
                    lambda outcome: revoked(
                        [("ApiKey", outcome.key.display_id, tenant, reason)]
                        if not outcome.already_revoked
                        else []
                    ),
                )

    def _slice_item(state: SliceState) -> dict[str, Any]:
        """A slice as the API shows it, with its worker's memory as last sampled (``null``
        before the first sample; ``rssBytes`` is what it used right after loading)."""
        sample = node.sampler.latest if node.sampler is not None else None
        used = sample.slice_memory.get(state.id) if sample is not None else None
        item = {**state.to_dict(), "memoryUsed": used}
        if item["pid"] is None and state.state == "Loading" and node.pool is not None:
            # its worker runs already while it loads the model (for up to startTimeout)
            worker = node.pool.worker_of(state.id)
            item["pid"] = worker.pid if worker is not None else None
        return item

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
                "slices": [_slice_item(s) for s in slices],
            },
        }

    # ---- devices, slices, node ------------------------------------------------------------

    def device_item(device: Device, principal: Principal) -> dict[str, Any]:
        assert node.controller is not None
        # a Failed slice runs nothing and placement gives its room back (control/launch.py)
        on_device = [
            s
            for s in node.controller.slices.values()
            if s.device_id == device.id and s.state != "Failed"
        ]
        return {
            **device.document(),
            # a tenant key sees its own slices' ids only (they name their owners)
            "slices": [s.id for s in on_device if principal.may_see(s.tenant)],
            "memoryReserved": sum(s.memory for s in on_device),
        }

    @router.get("/devices", summary="Devices this node serves on")
    async def devices(request: Request) -> dict[str, Any]:
        principal = principal_of(node, request)
        return {"items": [device_item(d, principal) for d in node.topology.devices]}

    @router.get(
        "/devices/{device_id}",
        summary="One device this node serves on",
        responses=error_responses(404),
    )
    async def device(request: Request, device_id: str) -> dict[str, Any]:
        return device_item(node.topology.require(device_id), principal_of(node, request))

    @router.get("/slices", summary="Slices (placed replicas) with state and reason")
    async def slices(request: Request) -> dict[str, Any]:
        principal = principal_of(node, request)
        assert node.controller is not None
        return {
            "items": [
                _slice_item(s)
                for s in node.controller.slices.values()
                if principal.may_see(s.tenant)
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
        kind = kind_of_plural(plural)
        if principal.role == "tenant" and tenant and tenant != principal.tenant:
            # another tenant's objects do not exist for a tenant key: 404, as for one object
            raise NotFound(f"tenant '{tenant}' not found")
        if tenant is not None:
            await _check_tenant_exists(tenant)
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
            items.append(implicit_default_pool())
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
        kind = kind_of_plural(plural)
        try:
            found = await _find(principal, kind, name, tenant)
        except NotFound:
            if (kind, name) == ("Pool", DEFAULT_POOL):
                return implicit_default_pool()
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
        kind = kind_of_plural(plural)
        audit.begin(request, "delete", kind, name, tenant or principal.tenant or "")
        if kind not in TENANT_SCOPED and principal.role != "admin":
            # refused for the key, whether the object exists or not (audited as denied)
            raise Forbidden(f"{principal.kind_of_key} may not change {kind} objects")
        try:
            found = await _find(principal, kind, name, tenant)
        except NotFound:
            if (kind, name) == ("Pool", DEFAULT_POOL):
                may_write(principal, IMPLICIT_DEFAULT_POOL)  # 403 for whoever may not
                raise Conflict(
                    f"Pool {DEFAULT_POOL} cannot be deleted: it was never applied. It is the "
                    "implicit pool of deployments that name none (every device); apply a Pool "
                    f"named {DEFAULT_POOL!r} to change it"
                ) from None
            raise
        may_write(principal, resource_from_dict(found.body))
        ok = audit.recorder(request, principal, "delete")
        async with writes:
            # deployments of the applied default pool fall back to the implicit one
            implicit = (kind, found.name) == ("Pool", DEFAULT_POOL)
            users = [] if implicit else users_of(await all_resources(), kind, found)
            if users:
                raise Conflict(
                    f"{kind} {found.name} is used by {', '.join(users)}: delete or change those "
                    "first"
                )
            serving = (
                instances_serving(node.controller.slices.values(), found)
                if kind == "Model" and node.controller is not None
                else []
            )
            if serving:
                raise Conflict(
                    f"Model {found.name} still serves in {', '.join(serving)}: a rolling update "
                    "away from it has not finished. Wait until it has (gpuvisor describe "
                    "deployment), or roll the deployment back to this version"
                )
            if kind == "Tenant":
                # its keys go first: a node that stops in between leaves a tenant without
                # keys (an admin makes new ones), never keys that would open a tenant
                # created later under the same name
                await _revoke_keys_of(request, principal, found.name)
            deleted = await asyncio.to_thread(
                store().delete,
                kind,
                found.tenant,
                found.name,
                lambda deleted: ok(
                    [(kind, found.name, found.tenant, "deleted")] if deleted else []
                ),
            )
        if not deleted:  # another request deleted it meanwhile
            raise NotFound(f"{kind} {found.name} not found")
        if node.controller is not None:
            await node.controller.reconcile()
        return {"deleted": {"kind": kind, "name": found.name, "tenant": found.tenant or None}}

    return router
