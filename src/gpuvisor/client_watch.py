"""Notices a client that leaves while its request waits, so that the request is dropped
before it spends device time nobody will read."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import Receive

__all__ = ["CLIENT_WATCH_DELAY", "ClientWatch", "disconnect_of"]

log = logging.getLogger("gpuvisor.node")

# Most requests are answered within milliseconds; watching each one from its start would cost
# a task per request on the node's event loop, the hot path's scarcest resource. A request
# still waiting after this long is watched from then on: a client that leaves within it costs
# at most this much of a request that was about to run anyway.
CLIENT_WATCH_DELAY = 0.02
# An empty last chunk of the body may still come after it has been read; a server that sends
# more than a few messages is not telling of a disconnect, and is not watched any longer.
_STRAY_MESSAGES = 4


def disconnect_of(receive: Receive) -> Callable[[], Awaitable[None]]:
    """Return a function that waits until the client of an ASGI request has disconnected.

    Call it only once the request's body has been read: from then on the server's next
    message for the request is ``http.disconnect``, sent when the connection closes."""

    async def disconnected() -> None:
        for _ in range(_STRAY_MESSAGES):
            if (await receive())["type"] == "http.disconnect":
                return
        raise RuntimeError(f"no http.disconnect among {_STRAY_MESSAGES} messages after the body")

    return disconnected


class ClientWatch:
    """After ``delay`` seconds, await ``gone()``; when it returns, call ``on_gone()``.

    ``cancel()`` (the request was answered) stops the watch at any point; before ``delay``
    it has cost one timer."""

    def __init__(
        self,
        gone: Callable[[], Awaitable[None]],
        on_gone: Callable[[], Any],
        delay: float = CLIENT_WATCH_DELAY,
    ) -> None:
        self._gone = gone
        self._on_gone = on_gone
        self._task: asyncio.Task[None] | None = None
        self._timer = asyncio.get_running_loop().call_later(delay, self._start)

    def _start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="client-watch")

    async def _watch(self) -> None:
        try:
            await self._gone()
        except Exception:  # a server that cannot tell: keep waiting for the answer, as before
            log.debug("cannot watch the client's connection", exc_info=True)
            return
        self._on_gone()

    def cancel(self) -> None:
        self._timer.cancel()
        if self._task is not None:
            self._task.cancel()
