"""The inference route, ``POST /v2/models/{name}[/versions/{version}]/infer``: the node's hot
path, with its request and response bodies for the OpenAPI document.

The node never decodes tensors: a request body is forwarded as raw bytes to the slice's
worker, which validates, runs and encodes. Here the node authenticates, routes, bounds the
body size, reads the request's outline (rows, priority, timeout) and queues it. NodeApp
(api/app.py) answers these paths ahead of FastAPI's middleware, routing and dependency
solving; ``inference_router`` declares the same handler to FastAPI, which documents it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gpuvisor.api.audit import record_refusal
from gpuvisor.api.errors import (
    ErrorBody,
    client_request_id,
    error_response,
    error_responses,
    gpuvisor_error_response,
    unexpected_error_response,
)
from gpuvisor.api.oip import principal_of, read_body
from gpuvisor.api.outline import RequestOutline, request_outline
from gpuvisor.client_watch import disconnect_of
from gpuvisor.errors import GpuvisorError, InvalidRequest
from gpuvisor.node import Node
from gpuvisor.runtime.tensors import DATATYPES
from gpuvisor.security.keys import redact_secrets

__all__ = [
    "document_request_body",
    "infer_response",
    "inference_router",
    "inference_target",
    "serve_inference",
]

log = logging.getLogger("gpuvisor.api")

_JSON = "application/json"


def _datatype() -> Any:
    return Field(
        description="the tensor's element type", json_schema_extra={"enum": list(DATATYPES)}
    )


# ---- request and response bodies, for the OpenAPI document (the worker decodes them) -----


class RequestTensorBody(BaseModel):
    name: str = Field(description="one of the model's inputs (GET /v2/models/{name} lists them)")
    shape: list[int] = Field(description="the tensor's size in each dimension")
    datatype: str = _datatype()
    parameters: dict[str, Any] | None = Field(
        None,
        description='with binary data: {"binary_data_size": N}, the bytes of this tensor after '
        "the JSON header",
    )
    data: list[Any] | None = Field(
        None,
        description="the elements, flat or nested, in row-major order: numbers, true/false, or "
        "strings for BYTES; absent when the tensor is sent as binary data",
    )


class RequestedOutputBody(BaseModel):
    name: str
    parameters: dict[str, Any] | None = Field(
        None, description='{"binary_data": true} to receive this output as binary data'
    )


class InferRequestBody(BaseModel):
    id: str | None = Field(None, description="echoed in the response")
    parameters: dict[str, Any] | None = Field(
        None,
        description="priority (a non-negative integer, 1 the highest, 0 the default: orders "
        "requests within the caller's own deployment), timeout (microseconds: a request that "
        "cannot finish in time is refused before it queues, or dropped once late), "
        "binary_data_output (true: every output as binary data)",
    )
    inputs: list[RequestTensorBody]
    outputs: list[RequestedOutputBody] | None = Field(
        None, description="the outputs to return (default: all)"
    )


class ResponseTensorBody(BaseModel):
    name: str
    shape: list[int]
    datatype: str = _datatype()
    parameters: dict[str, Any] | None = Field(
        None, description='{"binary_data_size": N} when the output follows as binary data'
    )
    data: list[Any] | None = Field(
        None, description="the elements, flat, in row-major order (absent for binary outputs)"
    )


class InferResponseBody(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseTensorBody]


_BINARY_NOTE = (
    "With Triton's binary tensor extension the body is a JSON header of Inference-Header-"
    "Content-Length bytes followed by the tensors' raw bytes (little-endian; BYTES elements "
    "each a 4-byte length and the bytes), in the order of the header's inputs; the response "
    "is framed the same way when an output is requested as binary data. The body may be "
    "sent with Content-Encoding gzip or deflate."
)
_INFER_REQUEST: dict[str, Any] = {
    "parameters": [
        {
            "name": "Inference-Header-Content-Length",
            "in": "header",
            "required": False,
            "description": "the byte length of the JSON header, when binary tensor data follows",
            "schema": {"type": "integer", "minimum": 0},
        }
    ],
    "requestBody": {
        "required": True,
        "description": _BINARY_NOTE,
        "content": {
            _JSON: {"schema": {"$ref": "#/components/schemas/InferRequestBody"}},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
            },
        },
    },
}
_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The outputs (JSON, or a JSON header and binary data: see the request)",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    **error_responses(400, 401, 404, 413, 429, 503),
    500: {"description": "The model failed while running", "model": ErrorBody},
}


async def _read_request(node: Node, request: Request) -> tuple[bytes, int, RequestOutline]:
    """The body, its Inference-Header-Content-Length (-1: none) and its outline; raises
    GpuvisorError for one too large, a header length that does not fit it, or an invalid
    ``priority`` or ``timeout``."""
    body = await read_body(request, node.spec.limits.max_body_size)
    header_length = -1
    raw_length = request.headers.get("inference-header-content-length")
    if raw_length is not None:
        if not (raw_length.isascii() and raw_length.isdigit()):  # no sign, '_' or spaces
            raise InvalidRequest(
                f"invalid Inference-Header-Content-Length header {raw_length!r}: expected the "
                "byte length of the JSON header"
            )
        header_length = int(raw_length)
        if not 0 <= header_length <= len(body):
            raise InvalidRequest(
                f"Inference-Header-Content-Length {header_length} is outside the body's "
                f"{len(body)} bytes"
            )
    return body, header_length, request_outline(body if header_length < 0 else body[:header_length])


async def infer_response(node: Node, request: Request, name: str, version: str | None) -> Response:
    """Serve one inference request on the caller's deployment ``name``; raise GpuvisorError on refusal."""
    trace_id = client_request_id(request.headers.get("x-request-id")) or os.urandom(16).hex()
    request.state.request_id = trace_id
    principal = principal_of(node, request)
    dep = node.find_deployment(principal, name, version)
    try:
        body, header_length, outline = await _read_request(node, request)
    except GpuvisorError as exc:  # refused by the node before it queues: counted all the same
        node.count_request(dep, exc.code)
        raise
    outcome = await node.infer(
        dep,
        body,
        header_length,
        trace_id,
        outline.priority,
        outline.timeout,
        outline.rows,
        client_gone=disconnect_of(request.receive),
        version=version,
    )
    headers = {"X-Request-ID": trace_id}
    if outcome.status != 200:
        log.info(
            "%s %s -> %d: %s",
            request.method,
            redact_secrets(request.url.path),
            outcome.status,
            outcome.body[:300].decode(errors="replace"),
            extra={"tenant": principal.tenant, "request_id": trace_id},
        )
    if outcome.header_length >= 0:
        headers["Inference-Header-Content-Length"] = str(outcome.header_length)
        media_type = "application/octet-stream"
    else:
        media_type = _JSON
    return Response(
        outcome.body, status_code=outcome.status, headers=headers, media_type=media_type
    )


async def serve_inference(
    node: Node, scope: Scope, receive: Receive, send: Send, name: str, version: str | None
) -> None:
    """Answer one inference request as a raw ASGI exchange, errors rendered as everywhere else."""
    if scope["method"] != "POST":
        refused = error_response(
            405,
            f"{scope['method']} is not allowed on an inference path: send a POST",
            code="method_not_allowed",
        )
        refused.headers["Allow"] = "POST"
        await refused(scope, receive, send)
        return
    request = Request(scope, receive)
    try:
        response = await infer_response(node, request, name, version)
    except GpuvisorError as exc:
        await record_refusal(node, request, exc)
        response = gpuvisor_error_response(request, exc)
    except Exception as exc:
        response = unexpected_error_response(request, exc)
    await response(scope, receive, send)


def inference_target(scope: Scope) -> tuple[str, str | None] | None:
    """Return (model, version or None) when ``scope`` is an inference request (or another
    method on an inference path, which serve_inference refuses), else None."""
    if scope["type"] != "http":
        return None
    return _infer_target(scope["path"])


def _infer_target(path: str) -> tuple[str, str | None] | None:
    """Return (model, version or None) for an inference path, None for any other path."""
    if not (path.startswith("/v2/models/") and path.endswith("/infer")):
        return None
    parts = path[len("/v2/models/") : -len("/infer")].split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], None
    if len(parts) == 3 and parts[0] and parts[1] == "versions" and parts[2]:
        return parts[0], parts[2]
    return None


def document_request_body(schemas: dict[str, Any]) -> None:
    """Add InferRequestBody and the models it uses to an OpenAPI document's schemas (the
    route reads its body raw, so FastAPI does not collect them)."""
    schema = InferRequestBody.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in schema.pop("$defs", {}).items():
        schemas.setdefault(name, definition)
    schemas.setdefault("InferRequestBody", schema)


def inference_router(node: Node) -> APIRouter:
    """The inference routes as FastAPI sees them: the same handler NodeApp serves ahead of
    FastAPI, declared here so that the OpenAPI document describes them."""
    router = APIRouter(tags=["inference"])
    documented: dict[str, Any] = {
        "response_model": InferResponseBody,
        "responses": _INFER_RESPONSES,
        "openapi_extra": _INFER_REQUEST,
    }

    @router.post("/v2/models/{name}/infer", summary="Run inference", **documented)
    async def infer(request: Request, name: str) -> Response:
        return await infer_response(node, request, name, None)

    @router.post(
        "/v2/models/{name}/versions/{version}/infer",
        summary="Run inference on a model version (404 unless the deployment serves it)",
        **documented,
    )
    async def infer_version(request: Request, name: str, version: str) -> Response:
        return await infer_response(node, request, name, version)

    return router
