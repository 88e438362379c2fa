"""The node's HTTP application: inference protocol, admin API, metrics, all on one server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from gpuvisor import __version__
from gpuvisor.api.admin import admin_router
from gpuvisor.api.errors import install_error_handlers
from gpuvisor.api.oip import oip_router
from gpuvisor.node import Node

__all__ = ["create_app"]


def create_app(node: Node, manage_lifecycle: bool = True) -> FastAPI:
    """Return the FastAPI app serving ``node``; with ``manage_lifecycle`` the app starts and stops it."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if manage_lifecycle:
            await node.start()
        try:
            yield
        finally:
            if manage_lifecycle:
                await node.stop()

    app = FastAPI(
        title="gpuvisor",
        version=__version__,
        description="Virtual GPUs for multi-tenant inference: KServe v2 inference protocol and admin API.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(oip_router(node))
    app.include_router(admin_router(node))

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(node.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
