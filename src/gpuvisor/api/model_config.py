"""Triton's model configuration extension: ``GET /v2/models/{name}[/versions/{v}]/config``.

What Triton's tools read before they send (``tritonclient``'s ``get_model_config``, Triton's
performance analyzer): the batch size the deployment takes, and each tensor's Triton data
type and dimensions (without the batch dimension when the model is batched). It describes the
caller's own deployment as its slices serve it.
"""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from gpuvisor.api.errors import error_responses
from gpuvisor.api.oip import principal_of
from gpuvisor.control.slices import SliceState
from gpuvisor.errors import Unavailable
from gpuvisor.node import Node
from gpuvisor.runtime import protocol as p

__all__ = ["model_config_router", "triton_type"]

_BACKENDS = {"onnxruntime_onnx": "onnxruntime"}


class ConfigTensorBody(BaseModel):
    name: str
    data_type: str = Field(description="Triton's name: TYPE_FP32, TYPE_STRING for BYTES…")
    dims: list[int] = Field(description="-1 for a variable dimension; no batch dimension")


class DynamicBatchingBody(BaseModel):
    max_queue_delay_microseconds: int


class ModelConfigBody(BaseModel):
    name: str
    platform: str
    backend: str
    max_batch_size: int = Field(description="0: requests are not batched along a dimension")
    input: list[ConfigTensorBody]
    output: list[ConfigTensorBody]
    dynamic_batching: DynamicBatchingBody | None = None


def triton_type(datatype: str) -> str:
    """Triton's configuration name of a KServe v2 datatype (``FP32`` → ``TYPE_FP32``)."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def _tensors(infos: list[p.TensorInfo], batched: bool) -> list[dict[str, object]]:
    return [
        {
            "name": t.name,
            "data_type": triton_type(t.datatype),
            "dims": list(t.shape[1:] if batched else t.shape),
        }
        for t in infos
    ]


def _config(name: str, serving: SliceState, max_queue_delay: float) -> dict[str, object]:
    loaded = serving.loaded
    assert loaded is not None and serving.queue is not None
    batched = loaded.batchable
    config: dict[str, object] = {
        "name": name,
        "platform": loaded.platform,
        "backend": _BACKENDS.get(loaded.platform, "pytorch"),
        "max_batch_size": serving.queue.max_batch_size if batched else 0,
        "input": _tensors(loaded.inputs, batched),
        "output": _tensors(loaded.outputs, batched),
    }
    if batched:
        delay = round(max_queue_delay * 1e6)
        config["dynamic_batching"] = {"max_queue_delay_microseconds": delay}
    return config


def model_config_router(node: Node) -> APIRouter:
    """The model configuration routes, on the caller's own deployments."""
    router = APIRouter(tags=["inference"])

    def _answer(request: Request, name: str, version: str | None) -> Response:
        principal = principal_of(node, request)
        dep = node.find_deployment(principal, name, version)
        assert node.controller is not None
        ready = node.controller.ready_slices(principal.tenant or "", dep.metadata.name)
        serving = next((s for s in ready if s.loaded is not None and s.queue is not None), None)
        if serving is None:
            raise Unavailable(
                f"model '{name}' has no slice ready: its configuration is that of the slices "
                "that serve it; try again once it is ready",
                retry_after=1.0,
            )
        config = _config(name, serving, dep.spec.batching.max_queue_delay)
        return Response(orjson.dumps(config), media_type="application/json")

    @router.get(
        "/v2/models/{name}/config",
        response_model=ModelConfigBody,
        responses=error_responses(401, 404, 503),
        summary="Model configuration (Triton's extension)",
    )
    async def model_config(request: Request, name: str) -> Response:
        return _answer(request, name, None)

    @router.get(
        "/v2/models/{name}/versions/{version}/config",
        response_model=ModelConfigBody,
        responses=error_responses(401, 404, 503),
        summary="Model configuration of one version (Triton's extension)",
    )
    async def model_version_config(request: Request, name: str, version: str) -> Response:
        return _answer(request, name, version)

    return router
