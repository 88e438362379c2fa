"""Slow clients are given up: a connection that sends no whole request head in time is
closed, and a body that stops arriving is answered 408 and the connection closed. Uvicorn
serves a small app on 127.0.0.1 with the node's HTTP protocol, the deadlines shortened."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from starlette.types import Message, Receive, Scope, Send

from gpuvisor.api import timeouts
from gpuvisor.api.errors import error_response
from gpuvisor.errors import RequestTimeout


async def _echo_length(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers with the body's length; a body that stalls, with the node's 408."""
    if scope["type"] != "http":
        return
    receive = timeouts.body_deadline(receive, lambda: RequestTimeout("stalled"))
    size = 0
    try:
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
    except RequestTimeout as exc:
        await error_response(exc.http_status, exc.message)(scope, receive, send)
        return
    body = str(size).encode()
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    monkeypatch.setattr(timeouts, "HEAD_TIMEOUT", 0.5)
    monkeypatch.setattr(timeouts, "BODY_STALL", 0.5)
    config = uvicorn.Config(
        _echo_length, host="127.0.0.1", port=0, log_config=None, http=timeouts.http_protocol()
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.01)
    [listening] = server.servers[0].sockets
    yield listening.getsockname()[1]
    server.should_exit = True
    thread.join(10)


def _connect(port: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=5)
    return conn


def _read_all(conn: socket.socket) -> bytes:
    """What the server sends until it closes the connection (b"" if it sends nothing)."""
    chunks = []
    while chunk := conn.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(
    "sent",
    [b"", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Le"],
    ids=["nothing", "part of a head"],
)
def test_a_connection_without_a_whole_head_is_closed(server: int, sent: bytes) -> None:
    with _connect(server) as conn:
        conn.sendall(sent)
        started = time.monotonic()
        assert _read_all(conn) == b""  # closed, with nothing said (no request to answer)
        assert time.monotonic() - started < 4


def test_a_body_that_stalls_is_answered_408_and_the_connection_closed(server: int) -> None:
    with _connect(server) as conn:
        conn.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        answer = _read_all(conn)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"connection: close" in answer.lower()


def test_requests_that_come_whole_are_served_and_the_connection_kept(server: int) -> None:
    """Slow is not stalled: a body sent in pieces, each in time, is read whole; a connection
    kept alive serves the next request, and only a head left half-sent closes it."""
    with _connect(server) as conn:
        conn.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nab")
        time.sleep(0.3)
        conn.sendall(b"cd")
        time.sleep(0.3)
        conn.sendall(b"ef")
        first = conn.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ") and first.endswith(b"\r\n\r\n6"), first
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        second = conn.recv(65536)
        assert second.startswith(b"HTTP/1.1 200 ") and second.endswith(b"0"), second
        conn.sendall(b"GET / HTTP/1.1\r\nHo")
        assert _read_all(conn) == b""


def test_a_body_read_in_time_then_waits_as_long_as_the_request_runs() -> None:
    """Once the body is in, receive waits for http.disconnect without a deadline."""
    messages: list[Message] = [{"type": "http.request", "body": b"x", "more_body": False}]

    async def receive() -> Message:
        if messages:
            return messages.pop()
        await asyncio.sleep(0.2)  # longer than the deadline below
        return {"type": "http.disconnect"}

    async def scenario() -> list[str]:
        timed = timeouts.body_deadline(receive, lambda: RequestTimeout("stalled"))
        return [(await timed())["type"], (await timed())["type"]]

    original = timeouts.BODY_STALL
    timeouts.BODY_STALL = 0.05
    try:
        assert asyncio.run(scenario()) == ["http.request", "http.disconnect"]
    finally:
        timeouts.BODY_STALL = original
