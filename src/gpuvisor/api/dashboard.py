"""The dashboard's routes: its data as JSON for the caller's key (`GET /api/v1/dashboard`,
read by /ui and `gpuvisor top`) and the /ui page itself (static files, no build step)."""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import RedirectResponse, Response

from gpuvisor.api.errors import error_responses
from gpuvisor.api.oip import principal_of
from gpuvisor.errors import NotFound
from gpuvisor.node import Node
from gpuvisor.telemetry.dashboard import build_dashboard

__all__ = ["UI_FILES", "dashboard_router"]

#: The page's files and their media types; nothing else under /ui is served.
UI_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
}


def _ui_file(name: str) -> bytes:
    return resources.files("gpuvisor.api").joinpath("ui", name).read_bytes()


def dashboard_router(node: Node) -> APIRouter:
    """Return the router; include it before the admin router (whose /api/v1/{plural} would
    otherwise take /api/v1/dashboard)."""
    router = APIRouter()

    @router.get(
        "/api/v1/dashboard",
        tags=["admin"],
        responses=error_responses(401),
        summary="Dashboard data for the caller's key: devices, tenants' shares, deployments, "
        "pending slices and what needs attention",
    )
    async def dashboard(request: Request) -> dict[str, Any]:
        return build_dashboard(node, principal_of(node, request))

    @router.get("/ui", include_in_schema=False)
    async def ui_root() -> Response:
        return RedirectResponse("/ui/", status_code=307)

    @router.get("/ui/", include_in_schema=False)
    async def ui_index() -> Response:
        return _serve("index.html")

    @router.get("/ui/{name}", include_in_schema=False)
    async def ui_asset(name: str) -> Response:
        return _serve(name)

    return router


def _serve(name: str) -> Response:
    media_type = UI_FILES.get(name)
    if media_type is None:
        raise NotFound(f"/ui/{name} does not exist (the dashboard is at /ui/)")
    # no-cache: a node upgraded under an open page serves the new script on its next load;
    # no frames: another site cannot show the sign-in form inside its own page
    headers = {
        "Cache-Control": "no-cache",
        "X-Frame-Options": "DENY",
        "Content-Security-Policy": "frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff",
    }
    return Response(_ui_file(name), media_type=media_type, headers=headers)
