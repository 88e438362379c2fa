"""The KServe Open Inference Protocol v2 over HTTP, on the caller's own deployments: health,
server and model metadata, readiness, and Triton's model repository extension. Inference
itself is in api/inference.py."""

from __future__ import annotations

import logging
import zlib
from typing import Literal

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from gpuvisor import __version__
from gpuvisor.api.audit import begin, record_ok
from gpuvisor.api.errors import (
    error_responses,
)
from gpuvisor.errors import InvalidRequest, PayloadTooLarge, Unavailable
from gpuvisor.node import Node
from gpuvisor.security.keys import Principal, extract_key
from gpuvisor.units import format_size

__all__ = ["oip_router", "principal_of", "read_body"]

log = logging.getLogger("gpuvisor.api")

EXTENSIONS = ["binary_tensor_data", "model_configuration", "model_repository", "parameters"]
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
        "description": (
            'optional: {"parameters": {...}}. A model\'s configuration and files come from '
            "its Model and Deployment manifests: the `config` and `file:` parameters "
            "(Triton's load with an override) are refused with 400; other parameters are "
            "not used"
        ),
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


def _is_override(parameter: str) -> bool:
    """Whether a load parameter is Triton's configuration or file override."""
    return parameter == "config" or parameter.startswith("file:")


_INDEX_REQUEST = {
    "requestBody": {
        "required": False,
        "description": 'optional: {"ready": true} lists only the models ready for inference',
        "content": {
            "application/json": {
                "schema": {"type": "object", "properties": {"ready": {"type": "boolean"}}}
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
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding == "x-gzip":  # RFC 9110 8.4.1.3: the same as gzip
        encoding = "gzip"
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise InvalidRequest(
            f"unsupported Content-Encoding {encoding!r} (use gzip, deflate or none)"
        )
    return _inflate(body, encoding, limit, too_large)


_MAX_GZIP_MEMBERS = 64  # concatenated gzip files in one body (`cat a.gz b.gz`); a bound
# because each costs the event loop a decompressor of its own


def _inflate(body: bytes, encoding: str, limit: int, too_large: PayloadTooLarge) -> bytes:
    """Decompress a gzip (one or more members, RFC 1952) or deflate body of at most ``limit``
    bytes; a stream cut short or followed by other bytes is refused, not half-read."""
    parts: list[bytes] = []
    size, rest = 0, body
    for _ in range(_MAX_GZIP_MEMBERS):
        inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
        try:
            plain = inflater.decompress(rest, limit + 1 - size)
        except zlib.error as exc:
            raise InvalidRequest(f"body is not valid {encoding} data: {exc}") from None
        size += len(plain)
        if size > limit or inflater.unconsumed_tail:
            raise too_large
        if not inflater.eof:
            raise InvalidRequest(
                f"body is not valid {encoding} data: it ends before its compressed stream does "
                "(cut short on the way?)"
            )
        parts.append(plain)
        rest = inflater.unused_data
        if not rest:
            return b"".join(parts)
        if encoding != "gzip":
            raise InvalidRequest(
                f"body is not valid deflate data: {len(rest)} bytes follow the end of its stream"
            )
    raise InvalidRequest(
        f"body holds more than {_MAX_GZIP_MEMBERS} gzip members: compress it as one stream"
    )


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
        tenant = principal.tenant or ""
        slices = node.controller.deployment_slices(tenant, name)
        wanted = [s for s in slices if version is None or s.model_version == version]
        # what a Ready instance runs (requests go there), else what any instance loaded last
        loaded = [s.loaded for s in wanted if s.loaded is not None and s.state == "Ready"]
        loaded += [s.loaded for s in wanted if s.loaded is not None]
        if not loaded:
            coming = any(s.state in ("Pending", "Loading", "Restarting") for s in wanted)
            raise Unavailable(
                node.not_ready_reason(tenant, name, version), retry_after=1.0 if coming else None
            )
        info = loaded[0]
        return _json(
            {
                "name": name,
                "versions": node.model_versions(dep),
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
        is_ready = bool(node.serving(dep, version))
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
        responses=error_responses(400, 401, 413),
        openapi_extra=_INDEX_REQUEST,
        summary="List the caller's models and their state",
    )
    async def repository_index(request: Request) -> Response:
        principal = principal_of(node, request)
        only_ready = (await _repository_body(request)).get("ready", False)
        if not isinstance(only_ready, bool):
            raise InvalidRequest(
                f"'ready' must be true or false, not {orjson.dumps(only_ready).decode()}"
            )
        assert node.controller is not None
        entries = []
        for dep in sorted(node.controller.deployments(), key=lambda r: r.metadata.name):
            tenant = dep.metadata.tenant or ""
            if principal.tenant is not None and tenant != principal.tenant:
                continue
            slices = node.controller.deployment_slices(tenant, dep.metadata.name)
            ready = any(s.state == "Ready" for s in slices)
            unloaded = (tenant, dep.metadata.name) in node.controller.unloaded
            loading = any(s.state in ("Loading", "Restarting") for s in slices)
            # Failed or Pending (fits on no device) is not on its way to READY by itself
            state = "READY" if ready else ("LOADING" if loading and not unloaded else "UNAVAILABLE")
            if only_ready and not ready:
                continue
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

    async def _repository_body(request: Request) -> dict[str, object]:
        raw = await read_body(request, 1 << 20, "fixed for repository requests")
        if not raw.strip():
            return {}
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"invalid JSON body: {exc}") from None
        if not isinstance(parsed, dict):
            raise InvalidRequest('the body must be a JSON object like {"parameters": {}}')
        return parsed

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
        parameters = (await _repository_body(request)).get("parameters")
        overrides = sorted(
            k for k in (parameters if isinstance(parameters, dict) else {}) if _is_override(k)
        )
        if overrides:
            raise InvalidRequest(
                f"the load of model '{name}' asks to override its {', '.join(overrides)}: "
                "gpuvisor loads a model as its Model and Deployment manifests say; change "
                "them with 'gpuvisor apply' (batching under the Deployment's spec.batching, "
                "the file under the Model's spec.source), then load"
            )
        assert node.controller is not None
        tenant = dep.metadata.tenant or ""
        if (tenant, name) in node.controller.unloaded:  # a record per change, not per call
            await record_ok(node, request, principal, "model.load", [("Deployment", name, "", "")])
        await node.controller.load(tenant, name)
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
        tenant = dep.metadata.tenant or ""
        if (tenant, name) not in node.controller.unloaded:  # a record per change, not per call
            await record_ok(
                node, request, principal, "model.unload", [("Deployment", name, "", "")]
            )
            await node.controller.unload(tenant, name)
        return _json({})

    return router
