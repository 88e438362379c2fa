"""TorchScript and torch.export models served end to end, next to the ONNX ones."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as http

from gpuvisor.launch import NodeProcess

torch = pytest.importorskip(
    "torch", reason="the torch extra is part of the test install (make test)"
)


class Scorer(torch.nn.Module):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(7)
        self.linear = torch.nn.Linear(8, 3)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(3, 8, generator=generator))
            self.linear.bias.copy_(torch.randn(3, generator=generator))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.linear(features), dim=-1)


def _save_models(folder: Path) -> None:
    model = Scorer().eval()
    meta = {
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 8]}],
        "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, 3]}],
    }
    torch.jit.save(
        torch.jit.script(model),
        str(folder / "scorer.pt"),
        _extra_files={"gpuvisor.json": json.dumps(meta)},
    )
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (torch.zeros(2, 8),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(folder / "scorer.pt2"))


MANIFEST = """
apiVersion: gpuvisor/v1
kind: Profile
metadata: {{name: torch-best-effort}}
spec: {{memory: 1Gi, computeShare: 0.0, latencyClass: batch}}
---
apiVersion: gpuvisor/v1
kind: Model
metadata: {{name: torch-scorer, tenant: analytics}}
spec: {{version: "1", format: torchscript, source: {folder}/scorer.pt}}
---
apiVersion: gpuvisor/v1
kind: Model
metadata: {{name: export-scorer, tenant: analytics}}
spec: {{version: "1", format: torch-export, source: {folder}/scorer.pt2}}
---
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {{name: torch-scorer, tenant: analytics}}
spec: {{model: torch-scorer, profile: torch-best-effort}}
---
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {{name: export-scorer, tenant: analytics}}
spec: {{model: export-scorer, profile: torch-best-effort}}
"""


def test_torch_formats_serve_like_onnx(demo_node: NodeProcess, tmp_path: Path) -> None:
    _save_models(tmp_path)
    applied = httpx.post(
        f"{demo_node.url}/api/v1/apply",
        headers=demo_node.auth(demo_node.admin_key),
        content=MANIFEST.format(folder=tmp_path),
    )
    assert applied.status_code == 200, applied.text
    demo_node.wait_ready(120)
    headers = demo_node.auth(demo_node.tenant_key("analytics"))
    client = http.InferenceServerClient(demo_node.address)
    features = np.random.default_rng(3).normal(size=(4, 8)).astype(np.float32)
    with torch.no_grad():
        expected = Scorer().eval()(torch.from_numpy(features)).numpy()
    for name, platform, output in (
        ("torch-scorer", "pytorch_libtorch", "scores"),
        ("export-scorer", "pytorch_export", "output__0"),
    ):
        meta = client.get_model_metadata(name, headers=headers)
        assert meta["platform"] == platform
        assert meta["inputs"][0]["shape"] == [-1, 8]
        tensor = http.InferInput(meta["inputs"][0]["name"], [4, 8], "FP32")
        tensor.set_data_from_numpy(features)
        result = client.infer(name, [tensor], headers=headers)
        np.testing.assert_allclose(result.as_numpy(output), expected, rtol=1e-5, atol=1e-6)
