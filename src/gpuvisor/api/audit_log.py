"""The audit log under /api/v1/audit: its records, filtered, for admin and operator keys (what
goes into it is api/audit.py's)."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, BeforeValidator, Field

from gpuvisor.api.errors import error_responses
from gpuvisor.api.oip import principal_of
from gpuvisor.errors import Forbidden
from gpuvisor.node import Node
from gpuvisor.store.audit import AuditAction

__all__ = ["AuditList", "AuditRecordView", "audit_log_router"]


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


def audit_log_router(node: Node) -> APIRouter:
    """Return the router of /api/v1/audit (mount it before the admin router's generic
    ``/api/v1/{plural}`` routes, which would otherwise take /audit)."""
    # every route needs a key: without a valid one it answers 401
    router = APIRouter(prefix="/api/v1", tags=["admin"], responses=error_responses(401))

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
        action: AuditAction | None = Query(None, description="what was done"),
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
        assert node.store is not None
        records = await asyncio.to_thread(
            node.store.audit.list,
            actor=actor,
            tenant=tenant,
            action=action,
            result=result,
            since=since,
            until=until,
            limit=limit,
        )
        return {"items": [r.to_dict() for r in records]}

    return router
