"""A node run in the test's own process, with a client of its app: for tests that make its
store fail, or call its ASGI app the way no HTTP client can."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from gpuvisor.api.app import create_app
from gpuvisor.node import Node, NodeOptions

__all__ = ["node_in_this_process"]


@contextlib.asynccontextmanager
async def node_in_this_process(
    state: Path,
) -> AsyncIterator[tuple[Node, httpx.AsyncClient, dict[str, str]]]:
    """A node run in the test's own process (so that its store can be made to fail), a client
    of its app, and its admin key's header."""
    node = Node(NodeOptions(state_dir=state))
    await node.start()
    try:
        assert node.store is not None
        admin = {"Authorization": f"Bearer {(state / 'admin.key').read_text().strip()}"}
        transport = httpx.ASGITransport(
            app=create_app(node, manage_lifecycle=False), raise_app_exceptions=False
        )
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            yield node, client, admin
    finally:
        await node.stop()
