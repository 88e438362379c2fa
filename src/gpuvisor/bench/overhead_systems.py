"""The systems `gpuvisor bench overhead` compares: direct onnxruntime, OIP calls, a node."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import yaml

from gpuvisor.bench.loadgen import CallFactory, triton_call_factory
from gpuvisor.demo.models import build_demo_model
from gpuvisor.launch import NodeProcess

__all__ = [
    "GpuvisorTarget",
    "build_model",
    "direct_call_factory",
    "direct_session",
    "fetch_outputs",
    "start_gpuvisor",
]

Array = np.ndarray[Any, Any]

TENANT = "bench"


def build_model(name: str, dest: Path) -> Path:
    """Write demo model ``name`` to ``dest/<name>.onnx`` and return its absolute path."""
    dest.mkdir(parents=True, exist_ok=True)
    path = (dest / f"{name}.onnx").resolve()
    path.write_bytes(build_demo_model(name).SerializeToString())
    return path


def direct_session(model_path: Path) -> ort.InferenceSession:
    """Return an onnxruntime CPU session with gpuvisor's worker settings (one intra-op and one
    inter-op thread, sequential execution)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(
        str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
    )


def direct_call_factory(session: ort.InferenceSession, inputs: Mapping[str, Array]) -> CallFactory:
    """Return a factory of Calls that run ``inputs`` on the shared ``session`` (onnxruntime's
    run is thread-safe and releases the GIL)."""
    feed = dict(inputs)

    def make_call() -> Callable[[], object]:
        return lambda: session.run(None, feed)

    return make_call


def fetch_outputs(
    address: str, model: str, inputs: Mapping[str, Array], headers: Mapping[str, str] | None = None
) -> dict[str, Array]:
    """Send one request with tritonclient (binary tensors) and return every output by name."""
    call = triton_call_factory(address, model, inputs, headers)()
    result: Any = call()
    return {o["name"]: result.as_numpy(o["name"]) for o in result.get_response()["outputs"]}


@dataclass
class GpuvisorTarget:
    """A node serving the benchmark's deployment, and the tenant key that reaches it."""

    node: NodeProcess
    model: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def bench_manifest(model: str, model_path: Path, max_batch_size: int) -> str:
    """Return the YAML that deploys ``model_path`` for tenant 'bench': Tenant, Profile (512Mi,
    computeShare 0.5), Model and Deployment (maxBatchSize, maxQueueDelay 0)."""
    docs: list[dict[str, Any]] = [
        {"kind": "Tenant", "metadata": {"name": TENANT}, "spec": {}},
        {
            "kind": "Profile",
            "metadata": {"name": "bench-slice"},
            "spec": {"memory": "512Mi", "computeShare": 0.5},
        },
        {
            "kind": "Model",
            "metadata": {"name": model, "tenant": TENANT},
            "spec": {"format": "onnx", "source": str(model_path)},
        },
        {
            "kind": "Deployment",
            "metadata": {"name": model, "tenant": TENANT},
            "spec": {
                "model": model,
                "profile": "bench-slice",
                "batching": {"maxBatchSize": max_batch_size, "maxQueueDelay": "0ms"},
            },
        },
    ]
    return str(
        yaml.safe_dump_all([{"apiVersion": "gpuvisor/v1", **d} for d in docs], sort_keys=False)
    )


@contextmanager
def start_gpuvisor(
    model: str, model_path: Path, state_dir: Path, max_batch_size: int = 8, timeout: float = 120.0
) -> Iterator[GpuvisorTarget]:
    """Start a node (no demo) on a free loopback port, deploy the model for tenant 'bench',
    create a tenant key and wait until the model is ready; stop the node (by PID) on exit.

    Raises RuntimeError when the node or the deployment does not come up.
    """
    node = NodeProcess(state_dir=state_dir, demo=False)
    try:
        node.start(timeout)
        admin = node.auth(node.admin_key)
        node.apply_as_admin(bench_manifest(model, model_path, max_batch_size))
        target = GpuvisorTarget(node, model, node.create_tenant_key(TENANT, "bench"))
        with httpx.Client(base_url=node.url, timeout=30) as http:
            deadline = time.monotonic() + timeout
            while http.get(f"/v2/models/{model}/ready", headers=target.headers).status_code != 200:
                if time.monotonic() > deadline:
                    slices = http.get("/api/v1/slices", headers=admin).text
                    raise RuntimeError(
                        f"model {model} was not ready within {timeout:.0f}s: {slices}"
                    )
                time.sleep(0.1)
        yield target
    finally:
        node.stop()
