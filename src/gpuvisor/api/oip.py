"""The KServe Open Inference Protocol v2 over HTTP, with Triton's binary tensor extension
and model repository extension, on the caller's own deployments.

The node never decodes tensors: a request body is forwarded as raw bytes to the
slice's worker, which validates, runs and encodes; the node only authenticates,
routes, bounds the body size and queues.
"""

from __future__ import annotations

import logging
import os
import zlib
from typing import Literal

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gpuvisor import __version__
from gpuvisor.api.audit import begin, record_ok, record_refusal
from gpuvisor.api.errors import (
    error_response,
    error_responses,
    gpuvisor_error_response,
    unexpected_error_response,
)
from gpuvisor.api.outline import request_outline
from gpuvisor.errors import GpuvisorError, InvalidRequest, PayloadTooLarge, Unavailable
from gpuvisor.node import Node
from gpuvisor.security.keys import Principal, extract_key, redact_secrets
from gpuvisor.units import format_size

__all__ = [
    "infer_response",
    "inference_target",
    "oip_router",
    "read_body",
    "serve_inference",
]

log = logging.getLogger("gpuvisor.api")

EXTENSIONS = ["binary_tensor_data", "model_repository", "parameters"]
_JSON = "application/json"


# ---- response bodies, for the OpenAPI document (the routes build their JSON directly) -----


class LiveBody(BaseModel):
    live: bool


class ReadyBody(BaseModel):
    ready: bool
    error: str = Field("", description="why the node is not ready (only when it is not)")


class ServerMetadataBody(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadataBody(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for a dimension of any size")


class ModelMetadataBody(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadataBody]
    outputs: list[TensorMetadataBody]


class ModelReadyBody(BaseModel):
    name: str
    ready: bool
    error: str = Field("", description="why the model is not ready (only when it is not)")


class RepositoryEntryBody(BaseModel):
    name: str
    version: str
    state: Literal["READY", "UNAVAILABLE", "LOADING"]
    reason: str
    tenant: str = Field("", description="the deployment's tenant (for admin and operator keys)")


class EmptyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")


_REPOSITORY_REQUEST = {
    "requestBody": {
        "required": False,
        "description": 'optional: {"parameters": {...}} (the parameters are not used)',
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {"parameters": {"type": "object"}},
                }
            }
        },
    }
}


def _json(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type=_JSON)


def principal_of(node: Node, request: Request) -> Principal:
    """Authenticate the request's key (``Authorization: Bearer`` or ``X-API-Key``)."""
    headers = request.headers
    principal = node.authenticate(
        extract_key(headers.get("authorization"), headers.get("x-api-key"))
    )
    request.state.tenant = principal.tenant
    request.state.principal = principal
    return principal


async def read_body(
    request: Request, limit: int, set_by: str = "limits.maxBodySize in the node configuration"
) -> bytes:
    """Return the request body, refusing more than ``limit`` bytes (also after decompression);
    ``set_by``: what the refusal names as the limit's origin."""
    declared = request.headers.get("content-length")
    too_large = PayloadTooLarge(
        f"request body is over the limit of {format_size(limit)} ({set_by})",
        limit=limit,
    )
    if declared is not None:
        try:
            declared_size = int(declared)
        except ValueError:
            raise InvalidRequest(f"invalid Content-Length header {declared!r}") from None
        if declared_size > limit:
            raise too_large
        body = await request.body()
    else:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise InvalidRequest(
            f"unsupported Content-Encoding {encoding!r} (use gzip, deflate or none)"
        )
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        plain = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidRequest(f"body is not valid {encoding} data: {exc}") from None
    if len(plain) > limit or inflater.unconsumed_tail:
        raise too_large
    return plain


async def infer_response(node: Node, request: Request, name: str, version: str | None) -> Response:
    """Serve one inference request on the caller's deployment ``name``; raise GpuvisorError on refusal."""
    trace_id = request.headers.get("x-request-id") or os.urandom(16).hex()
    request.state.request_id = trace_id
    principal = principal_of(node, request)
    dep = node.find_deployment(principal, name, version)
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
    outline = request_outline(body if header_length < 0 else body[:header_length])
    outcome = await node.infer(
        dep, body, header_length, trace_id, outline.priority, outline.timeout, outline.rows
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
            405, f"{scope['method']} is not allowed on an inference path: send a POST"
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


_MODEL_READY_RESPONSES: dict[int | str, dict[str, object]] = {
    400: {"model": ModelReadyBody, "description": "The model is not ready"},
    **error_responses(401, 404),
}


def oip_router(node: Node) -> APIRouter:
    router = APIRouter(tags=["inference"])

    @router.get("/v2/health/live", response_model=LiveBody, summary="Is the node process alive")
    async def live() -> Response:
        return _json({"live": True})

    @router.get(
        "/v2/health/ready",
        response_model=ReadyBody,
        responses={503: {"model": ReadyBody, "description": "The node is starting or stopping"}},
        summary="Is the node ready to serve",
    )
    async def ready() -> Response:
        if not node.ready:
            return _json({"ready": False, "error": "the node is starting or stopping"}, 503)
        return _json({"ready": True})

    @router.get("/v2", response_model=ServerMetadataBody, summary="Server metadata")
    async def server_metadata() -> Response:
        return _json({"name": "gpuvisor", "version": __version__, "extensions": EXTENSIONS})

    def _metadata(request: Request, name: str, version: str | None) -> Response:
        principal = principal_of(node, request)
        dep = node.find_deployment(principal, name, version)
        assert node.controller is not None
        info = node.controller.model_info.get((principal.tenant or "", name))
        if info is None:
            raise Unavailable(
                f"model '{name}' has not been loaded yet; try again shortly", retry_after=1.0
            )
        return _json(
            {
                "name": name,
                "versions": [node.model_version(dep)],
                "platform": info.platform,
                "inputs": [
                    {"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in info.inputs
                ],
                "outputs": [
                    {"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in info.outputs
                ],
            }
        )

    @router.get(
        "/v2/models/{name}",
        response_model=ModelMetadataBody,
        responses=error_responses(401, 404, 503),
        summary="Model metadata",
    )
    async def model_metadata(request: Request, name: str) -> Response:
        return _metadata(request, name, None)

    @router.get(
        "/v2/models/{name}/versions/{version}",
        response_model=ModelMetadataBody,
        responses=error_responses(401, 404, 503),
        summary="Model metadata of one version",
    )
    async def model_version_metadata(request: Request, name: str, version: str) -> Response:
        return _metadata(request, name, version)

    def _ready(request: Request, name: str, version: str | None) -> Response:
        principal = principal_of(node, request)
        dep = node.find_deployment(principal, name, version)
        assert node.controller is not None
        is_ready = bool(node.controller.ready_slices(principal.tenant or "", dep.metadata.name))
        body = {"name": name, "ready": is_ready}
        if not is_ready:
            body["error"] = f"model '{name}' is not ready"
        return _json(body, 200 if is_ready else 400)

    @router.get(
        "/v2/models/{name}/ready",
        response_model=ModelReadyBody,
        responses=_MODEL_READY_RESPONSES,
        summary="Is the model ready",
    )
    async def model_ready(request: Request, name: str) -> Response:
        return _ready(request, name, None)

    @router.get(
        "/v2/models/{name}/versions/{version}/ready",
        response_model=ModelReadyBody,
        responses=_MODEL_READY_RESPONSES,
        summary="Is this model version ready",
    )
    async def model_version_ready(request: Request, name: str, version: str) -> Response:
        return _ready(request, name, version)

    # ---- model repository extension (the caller's own deployments) ------------------------

    @router.post(
        "/v2/repository/index",
        response_model=list[RepositoryEntryBody],
        responses=error_responses(401),
        summary="List the caller's models and their state",
    )
    async def repository_index(request: Request) -> Response:
        principal = principal_of(node, request)
        assert node.controller is not None
        entries = []
        for dep in sorted(node.controller.deployments(), key=lambda r: r.metadata.name):
            tenant = dep.metadata.tenant or ""
            if principal.tenant is not None and tenant != principal.tenant:
                continue
            slices = node.controller.deployment_slices(tenant, dep.metadata.name)
            ready = any(s.state == "Ready" for s in slices)
            unloaded = (tenant, dep.metadata.name) in node.controller.unloaded
            state = "READY" if ready else ("UNAVAILABLE" if unloaded or not slices else "LOADING")
            reason = "unloaded" if unloaded else "; ".join(s.reason for s in slices if s.reason)
            entry = {
                "name": dep.metadata.name,
                "version": node.model_version(dep),
                "state": state,
                "reason": reason,
            }
            if principal.tenant is None:
                entry["tenant"] = tenant
            entries.append(entry)
        return _json(entries)

    async def _repository_body(request: Request) -> None:
        raw = await read_body(request, 1 << 20, "fixed for repository requests")
        if raw.strip():
            try:
                parsed = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise InvalidRequest(f"invalid JSON body: {exc}") from None
            if not isinstance(parsed, dict):
                raise InvalidRequest('the body must be a JSON object like {"parameters": {}}')

    @router.post(
        "/v2/repository/models/{name}/load",
        response_model=EmptyBody,
        responses=error_responses(400, 401, 404, 413, 503),
        openapi_extra=_REPOSITORY_REQUEST,
        summary="Load (start serving) a model",
    )
    async def repository_load(request: Request, name: str) -> Response:
        principal = principal_of(node, request)
        begin(request, "model.load", "Deployment", name, principal.tenant or "")
        dep = node.find_deployment(principal, name)
        await _repository_body(request)
        assert node.controller is not None
        await record_ok(node, request, principal, "model.load", [("Deployment", name, "", "")])
        await node.controller.load(dep.metadata.tenant or "", name)
        await node.wait_deployment_loaded(dep, timeout=node.spec.workers.start_timeout)
        return _json({})

    @router.post(
        "/v2/repository/models/{name}/unload",
        response_model=EmptyBody,
        responses=error_responses(400, 401, 404, 413),
        openapi_extra=_REPOSITORY_REQUEST,
        summary="Unload (stop serving) a model",
    )
    async def repository_unload(request: Request, name: str) -> Response:
        principal = principal_of(node, request)
        begin(request, "model.unload", "Deployment", name, principal.tenant or "")
        dep = node.find_deployment(principal, name)
        await _repository_body(request)
        assert node.controller is not None
        await record_ok(node, request, principal, "model.unload", [("Deployment", name, "", "")])
        await node.controller.unload(dep.metadata.tenant or "", name)
        return _json({})

    return router
