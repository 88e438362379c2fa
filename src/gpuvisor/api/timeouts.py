"""How long a client may take to send a request: a connection that sends no whole request
head in ``HEAD_TIMEOUT``, or a body that stalls for ``BODY_STALL``, is given up, so that idle
or slow connections (by accident, or sent on purpose to hold the node's connections and file
descriptors) cannot pile up. Uvicorn itself closes a connection idle between requests
(``timeout_keep_alive``) but waits for ever on one that has sent nothing yet, or part of a
request."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from starlette.types import Message, Receive

__all__ = ["BODY_STALL", "HEAD_TIMEOUT", "body_deadline", "http_protocol"]

HEAD_TIMEOUT = 10.0
"""Seconds a connection has to send a request's whole head: from its start, or from the
first byte of a request after the previous one's answer."""
BODY_STALL = 30.0
"""Seconds a request's body may go without a new chunk before the request is given up."""


def body_deadline(receive: Receive, stalled: Callable[[], Exception]) -> Receive:
    """``receive``, raising ``stalled()`` when the request's body stops arriving for
    ``BODY_STALL`` seconds. Once the body is in, ``receive`` waits as long as it is asked
    to (for ``http.disconnect`` while the request runs)."""
    complete = False

    async def timed() -> Message:
        nonlocal complete
        if complete:
            return await receive()
        try:
            async with asyncio.timeout(BODY_STALL):
                message = await receive()
        except TimeoutError:
            raise stalled() from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            complete = True
        return message

    return timed


def _with_head_deadline(protocol: type[Any]) -> type[Any]:
    """A subclass of one of uvicorn's HTTP protocols that closes a connection which has not
    sent a whole request head within ``HEAD_TIMEOUT`` (the app is called once it has)."""

    class HeadDeadline(protocol):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._head_timer: asyncio.TimerHandle | None = None
            app: Any = getattr(self, "app")  # noqa: B009  (set by uvicorn's __init__)

            async def started(scope: Any, receive: Any, send: Any) -> None:
                self._disarm()  # the head is in: what follows has its own limits
                await app(scope, receive, send)

            self.app = started

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            if self._head_timer is None and (cycle is None or cycle.response_complete):
                self._arm()  # a new request begins on a kept-alive connection
            super().data_received(data)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._head_timer = self.loop.call_later(HEAD_TIMEOUT, self._head_overdue)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_overdue(self) -> None:
            self._head_timer = None
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()

    HeadDeadline.__name__ = HeadDeadline.__qualname__ = f"HeadDeadline{protocol.__name__}"
    return HeadDeadline


def http_protocol() -> type[Any]:
    """The HTTP protocol for uvicorn's ``http=``: the one uvicorn would pick (httptools when
    it is installed, else h11), with the request-head deadline."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return _with_head_deadline(HttpToolsProtocol)
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return _with_head_deadline(H11Protocol)
