"""Device operations under /api/v1/devices: cordon, uncordon and drain (admin and operator keys).

A cordoned device takes no new slices and its slices move to other devices of their pools
at once (or wait Pending with the reasons), except ``disallowMigration`` ones, which stay.
The cordon is kept in the store, so it survives restarts, until uncordoned.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from gpuvisor.api import audit
from gpuvisor.api.errors import Text, error_responses
from gpuvisor.api.oip import principal_of
from gpuvisor.control.controller import Controller
from gpuvisor.errors import Forbidden
from gpuvisor.node import Node
from gpuvisor.security.keys import Principal
from gpuvisor.store.audit import AuditEvent

log = logging.getLogger("gpuvisor.control")

__all__ = ["devices_router"]

_SETTLED = ("Ready", "Pending", "Failed")


class CordonRequest(BaseModel):
    reason: Text = Field("", max_length=1024, description="why, for the audit log and status")


class DeviceAction(BaseModel):
    device: str
    cordoned: bool
    changed: bool = Field(description="false when the device already was (or was not) cordoned")
    slices: list[dict[str, Any]] = Field(
        default_factory=list,
        description="the slices that were on the device, where they are now, and why",
    )


def _require_operator(principal: Principal) -> None:
    if not principal.sees_all:
        raise Forbidden(f"{principal.kind_of_key} may not cordon or drain devices")


def devices_router(node: Node) -> APIRouter:
    # refusals: no key or a wrong one, a tenant key, an unknown device
    router = APIRouter(
        prefix="/api/v1/devices", tags=["devices"], responses=error_responses(401, 403, 404)
    )

    def controller() -> Controller:
        assert node.controller is not None
        return node.controller

    def on_device(device_id: str) -> list[str]:
        """The replicas with an instance on the device."""
        on = (s.replica_id for s in controller().slices.values() if s.device_id == device_id)
        return list(dict.fromkeys(on))

    async def settle(replica_ids: list[str], timeout: float) -> list[dict[str, Any]]:
        """Wait until every instance of each moved replica is Ready, Pending or Failed and
        none still has to move (replicas move ``rollout.maxSurge`` at a time), or the
        timeout; then return their status (a moved instance may come back under its
        replica's own id)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = [s for rid in replica_ids for s in controller().instances(rid)]
            if all(s.state in _SETTLED for s in states) and not any(
                controller().moving(rid) for rid in replica_ids
            ):
                break
            await asyncio.sleep(0.1)
        return [s.to_dict() for rid in replica_ids for s in controller().instances(rid)]

    def operator_key(request: Request, action: str, device_id: str) -> Principal:
        """The admin or operator key behind ``action`` on the device, with the action named
        for the audit log; a tenant key is refused (403)."""
        principal = principal_of(node, request)
        audit.begin(request, action, "Device", device_id)
        _require_operator(principal)
        return principal

    async def cordoning_key(request: Request) -> Principal:
        """The key behind a cordon or drain, checked before FastAPI's refusal of its body or
        parameters is answered (``audit.checks_key_with``)."""
        return operator_key(request, "device.cordon", request.path_params["device_id"])

    async def set_cordon(
        request: Request, device_id: str, cordon: bool, reason: str, wait: float
    ) -> dict[str, Any]:
        action = "device.cordon" if cordon else "device.uncordon"
        principal = operator_key(request, action, device_id)
        node.topology.require(device_id)
        before = on_device(device_id)
        store = node.store
        assert store is not None
        ok = audit.recorder(request, principal, action)
        done = reason or ("cordoned" if cordon else "uncordoned")
        # a repeat changes nothing, and is recorded so (as apply records an unchanged object)
        unchanged = "unchanged: already cordoned" if cordon else "unchanged: was not cordoned"

        def record(changed: bool) -> list[AuditEvent]:
            return ok([("Device", device_id, "", done if changed else unchanged)])

        if cordon:
            changed = await asyncio.to_thread(
                store.cordon, device_id, principal.key_id, reason, record
            )
        else:
            changed = await asyncio.to_thread(store.uncordon, device_id, record)
        if changed:
            log.info(
                "device %s %s by key gvk_%s%s: %d slice(s) on it",
                device_id,
                "cordoned" if cordon else "uncordoned",
                principal.key_id,
                f" ({reason})" if reason else "",
                len(before),
            )
        await controller().reconcile()
        slices = await settle(before, wait) if before else []
        return {"device": device_id, "cordoned": cordon, "changed": changed, "slices": slices}

    @router.post(
        "/{device_id}/cordon",
        response_model=DeviceAction,
        summary="Cordon a device: no new slices; its slices move elsewhere now",
    )
    @audit.checks_key_with(cordoning_key)
    async def cordon(
        request: Request, device_id: str, body: CordonRequest | None = None
    ) -> dict[str, Any]:
        return await set_cordon(request, device_id, True, body.reason if body else "", 0.0)

    @router.post(
        "/{device_id}/drain",
        response_model=DeviceAction,
        summary="Cordon a device and wait until its slices run elsewhere (or are Pending)",
    )
    @audit.checks_key_with(cordoning_key)
    async def drain(
        request: Request,
        device_id: str,
        body: CordonRequest | None = None,
        timeout: float = Query(60.0, gt=0, le=600, description="seconds to wait"),
    ) -> dict[str, Any]:
        return await set_cordon(request, device_id, True, body.reason if body else "", timeout)

    @router.post(
        "/{device_id}/uncordon",
        response_model=DeviceAction,
        summary="Return a device to placement; Pending slices may be placed on it",
    )
    async def uncordon(request: Request, device_id: str) -> dict[str, Any]:
        return await set_cordon(request, device_id, False, "", 0.0)

    return router
