"""The node's HTTP application: inference protocol, admin API, metrics, all on one server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from gpuvisor import __version__
from gpuvisor.api import timeouts
from gpuvisor.api.admin import admin_router
from gpuvisor.api.audit import (
    audited_error_handler,
    audited_unexpected_handler,
    database_busy_handler,
    record_refusal,
)
from gpuvisor.api.audit_log import audit_log_router
from gpuvisor.api.dashboard import dashboard_router
from gpuvisor.api.devices import devices_router
from gpuvisor.api.errors import (
    ErrorBody,
    client_request_id,
    error_response,
    error_responses,
    gpuvisor_error_response,
    install_error_handlers,
)
from gpuvisor.api.inference import (
    document_request_body,
    inference_router,
    inference_target,
    serve_inference,
)
from gpuvisor.api.keys import keys_router
from gpuvisor.api.model_config import model_config_router
from gpuvisor.api.oip import oip_router, principal_of
from gpuvisor.api.timeouts import body_deadline
from gpuvisor.errors import GpuvisorError, RequestTimeout, Unauthenticated
from gpuvisor.node import Node
from gpuvisor.units import format_size

__all__ = ["create_app"]


def _echoing_request_id(scope: Scope, send: Send) -> Send:
    """``send``, with the request's id on the answer where the route did not set one: the
    client's ``X-Request-ID``, or the one a route generated for it (an admin write records it
    in the audit log, so its answer must say it)."""
    if scope["type"] != "http":
        return send
    raw = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
    usable = client_request_id(raw.decode("latin-1")) if raw is not None else None
    given = usable.encode() if usable is not None else None

    async def echo(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            generated = scope.get("state", {}).get("request_id")
            request_id = given or (str(generated).encode() if generated else None)
            if request_id and not any(k.lower() == b"x-request-id" for k, _ in headers):
                message = {**message, "headers": [*headers, (b"x-request-id", request_id)]}
        await send(message)

    return echo


_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _takes_a_body(scope: Scope) -> bool:
    """Whether a request is one of the admin or repository API's writes (which read a body)."""
    if scope["type"] != "http":
        return False
    path: str = scope["path"]
    return scope["method"] in _BODY_METHODS and (
        path.startswith("/api/v1/") or path.startswith("/v2/repository/")
    )


def _without_body(send: Send) -> Send:
    """``send``, with the answer's headers (its Content-Length too) and none of its body."""

    async def headers_only(message: Message) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return headers_only


def _stalled() -> str:
    return (
        f"the request's body stopped arriving for {timeouts.BODY_STALL:g}s: the request is "
        "given up (send the whole body without pausing)"
    )


#: The largest body any route but inference takes (those that take a body bound it tighter:
#: 4 MiB for manifests); a key creation or a cordon takes a few hundred bytes.
MAX_API_BODY = 8 << 20
_LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1", "[::1]"}


def _refusal(scope: Scope, node: Node) -> Response | None:
    """The answer to a request refused before any route sees it, or None: a body declared
    over ``MAX_API_BODY`` (not on the inference routes, which have their own limit), or,
    on a node that listens on loopback only, a Host header that names no loopback address
    (a web page that rebinds its own name to 127.0.0.1 would read the node as same-origin)."""
    if "\x00" in scope["path"] or b"%00" in scope.get("query_string", b""):
        # no name holds one, and PostgreSQL could not even look it up
        return error_response(
            400, "the request's path or query holds a NUL character", code="invalid_request"
        )
    host = declared = b""
    for key, value in scope["headers"]:
        if key == b"host":
            host = value
        elif key == b"content-length":
            declared = value
    if node.options.host in _LOOPBACK_NAMES:
        text = host.decode("latin-1")
        name = text if text.endswith("]") else text.rsplit(":", 1)[0]
        if name not in _LOOPBACK_NAMES:
            return error_response(
                400,
                f"Host {text!r} is not this node: a node listening on {node.options.host} "
                "answers requests addressed to 127.0.0.1, localhost or [::1] only",
                code="invalid_request",
            )
    if declared.isdigit() and int(declared) > MAX_API_BODY and inference_target(scope) is None:
        return error_response(
            413,
            f"request body is over the limit of {format_size(MAX_API_BODY)} (fixed for the "
            "node's API)",
            code="payload_too_large",
        )
    return None


def _bounded(receive: Receive) -> Receive:
    """``receive``, refusing a body (sent without a Content-Length, in chunks) once it
    passes ``MAX_API_BODY``."""
    seen = 0

    async def bounded() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > MAX_API_BODY:
                # an HTTPException: FastAPI passes it on from its body parsing, where it turns
                # any other error into a 400
                raise StarletteHTTPException(
                    413,
                    f"request body is over the limit of {format_size(MAX_API_BODY)} (fixed "
                    "for the node's API)",
                )
        return message

    return bounded


class NodeApp(FastAPI):
    """The node's FastAPI app, with inference answered ahead of the middleware stack.

    ``POST /v2/models/{name}[/versions/{v}]/infer`` is the hot path: it is served before
    FastAPI's middleware, routing and dependency solving (a measurable share of a small
    model's request), by the same handler code and error rendering as every other route.
    """

    node: Node

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (refusal := _refusal(scope, self.node)) is not None:
            await refusal(scope, receive, send)
            return
        if scope["type"] == "http" and scope["method"] == "HEAD":
            # RFC 9110 9.3.2: HEAD wherever GET is, answered as GET without the body (health
            # checkers and load balancers send it)
            scope, send = {**scope, "method": "GET"}, _without_body(send)
        target = inference_target(scope)
        if target is None:
            if _takes_a_body(scope) and (early := await self._unknown_key(scope)) is not None:
                await early(scope, receive, send)
                return
            receive = body_deadline(receive, lambda: StarletteHTTPException(408, _stalled()))
            await super().__call__(scope, _bounded(receive), _echoing_request_id(scope, send))
        else:
            receive = body_deadline(receive, lambda: RequestTimeout(_stalled()))
            await serve_inference(self.node, scope, receive, send, *target)

    async def _unknown_key(self, scope: Scope) -> Response | None:
        """The 401 of a write whose key the node does not know, answered before its body is
        read (FastAPI reads a route's body before its key is checked: a client without a
        key could make the node hold up to 8 MiB per connection); None for a known key."""
        request = Request(scope)
        try:
            principal_of(self.node, request)
        except Unauthenticated as exc:
            await record_refusal(self.node, request, exc)
            response = gpuvisor_error_response(request, exc)
            response.headers["Connection"] = "close"  # its body is left unread
            return response
        return None

    def openapi(self) -> dict[str, Any]:
        """The OpenAPI document, with invalid parameters and bodies documented as answered.

        FastAPI documents a 422 with its own validation-error body on every route that takes
        parameters; this node answers those requests with a 400 and ``{"error": ...}`` (see
        api/errors.py), so the 422 is replaced by that 400 wherever a route documents none.
        Every route that answers 401 takes an API key, as a Bearer token or an X-API-Key
        header: the document says so (its security schemes), so clients and tools send one.
        """
        if self.openapi_schema:
            return self.openapi_schema
        document = super().openapi()  # also kept as self.openapi_schema, changed in place
        error_ref = {"$ref": "#/components/schemas/ErrorBody"}
        bad_request = error_responses(400)[400]
        for operations in document.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                if "401" in responses:
                    operation["security"] = [{"bearerKey": []}, {"headerKey": []}]
                if "HTTPValidationError" not in str(responses.get("422", "")):
                    continue
                del responses["422"]
                if "400" not in responses:
                    responses["400"] = {
                        "description": bad_request["description"],
                        "content": {"application/json": {"schema": error_ref}},
                    }
        document.setdefault("components", {})["securitySchemes"] = {
            "bearerKey": {
                "type": "http",
                "scheme": "bearer",
                "description": "an API key: 'Authorization: Bearer gvk_...'",
            },
            "headerKey": {
                "type": "apiKey",
                "in": "header",
                "name": "X-API-Key",
                "description": "an API key, when Authorization carries something else",
            },
        }
        schemas = document["components"].setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        schemas.setdefault("ErrorBody", ErrorBody.model_json_schema())
        document_request_body(schemas)
        return document


def create_app(node: Node, manage_lifecycle: bool = True) -> FastAPI:
    """Return the FastAPI app serving ``node``; with ``manage_lifecycle`` the app starts and stops it."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if manage_lifecycle and not node.ready:  # (`up` starts it before serving)
            await node.start()
        try:
            yield
        finally:
            if manage_lifecycle:
                await node.stop()

    app = NodeApp(
        title="gpuvisor",
        version=__version__,
        description="Virtual GPUs for multi-tenant inference: KServe v2 inference protocol and admin API.",
        lifespan=lifespan,
        # a path with a trailing slash is no route (404), not a redirect a client must follow
        # with its body again (`/infer/` would be a POST sent twice)
        redirect_slashes=False,
    )
    app.node = node
    install_error_handlers(app)
    # Refused keys and roles, and failed mutations, go to the audit log before the answer.
    app.add_exception_handler(GpuvisorError, audited_error_handler(node))
    app.add_exception_handler(Exception, audited_unexpected_handler(node))
    app.add_exception_handler(OperationalError, database_busy_handler(node))
    app.include_router(model_config_router(node))
    app.include_router(oip_router(node))
    app.include_router(inference_router(node))
    app.include_router(dashboard_router(node))  # before admin: /api/v1/{plural} would take it
    app.include_router(devices_router(node))
    app.include_router(keys_router(node))
    app.include_router(audit_log_router(node))
    app.include_router(admin_router(node))  # last: /api/v1/{plural} would take /keys, /audit

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        if node.controller is not None:  # instances change state between reconciles too
            node.controller.running.publish_counts()
        return Response(generate_latest(node.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
