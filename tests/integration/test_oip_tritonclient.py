"""The whole inference protocol through the real Triton HTTP client, binary and JSON tensors."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as http
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from gpuvisor.demo.models import sample_inputs
from gpuvisor.launch import NodeProcess

# deployment -> (tenant, model file, model version)
DEMO = {
    "shelf-detector": ("retail", "shelf-classifier", "3"),
    "sku-lookup": ("retail", "sku-lookup", "1"),
    "intent-router": ("support", "intent-router", "2"),
    "basket-scorer": ("analytics", "basket-scorer", "1"),
}


def _direct(models_dir: Path, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(
        str(models_dir / f"{model}.onnx"), providers=["CPUExecutionProvider"]
    )
    feed = {k: (v.astype(str) if v.dtype == object else v) for k, v in inputs.items()}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed)))


def _client(node: NodeProcess) -> http.InferenceServerClient:
    return http.InferenceServerClient(node.address)


def test_server_health_and_metadata(demo_node: NodeProcess) -> None:
    client = _client(demo_node)
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "gpuvisor"
    assert "binary_tensor_data" in meta["extensions"]
    assert "model_repository" in meta["extensions"]


def test_head_is_answered_wherever_get_is(demo_node: NodeProcess) -> None:
    """Health checkers and load balancers send HEAD: the GET answer's status and headers."""
    headers = demo_node.auth(demo_node.tenant_key("retail"))
    for path in ("/v2/health/live", "/v2/health/ready", "/v2", "/v2/models/shelf-detector"):
        got = httpx.get(demo_node.url + path, headers=headers, timeout=30)
        head = httpx.head(demo_node.url + path, headers=headers, timeout=30)
        assert head.status_code == got.status_code == 200, (path, head.status_code)
        assert head.content == b"" and int(head.headers["content-length"]) == len(got.content)
    assert httpx.head(demo_node.url + "/v2/models/shelf-detector", timeout=30).status_code == 401
    assert httpx.head(demo_node.url + "/v2/models/shelf-detector/infer").status_code == 405


@pytest.mark.parametrize("deployment", sorted(DEMO))
def test_model_ready_and_metadata(
    demo_node: NodeProcess, models_dir: Path, deployment: str
) -> None:
    tenant, model, version = DEMO[deployment]
    headers = demo_node.auth(demo_node.tenant_key(tenant))
    client = _client(demo_node)
    assert client.is_model_ready(deployment, headers=headers)
    assert client.is_model_ready(deployment, model_version=version, headers=headers)
    meta = client.get_model_metadata(deployment, headers=headers)
    assert meta["name"] == deployment
    assert meta["versions"] == [version]
    assert meta["platform"] == "onnxruntime_onnx"
    session = ort.InferenceSession(
        str(models_dir / f"{model}.onnx"), providers=["CPUExecutionProvider"]
    )
    assert [i["name"] for i in meta["inputs"]] == [i.name for i in session.get_inputs()]
    assert [o["name"] for o in meta["outputs"]] == [o.name for o in session.get_outputs()]
    assert all(i["shape"][0] == -1 for i in meta["inputs"]), "batch dimension is variable"
    assert (
        client.get_model_metadata(deployment, model_version=version, headers=headers)["name"]
        == deployment
    )


def test_model_configuration_as_triton_tools_read_it(demo_node: NodeProcess) -> None:
    """Triton's model configuration extension: batch size, data types and dims without the
    batch dimension, as the deployment serves them; another tenant's model is not found."""
    headers = demo_node.auth(demo_node.tenant_key("analytics"))
    client = _client(demo_node)
    assert "model_configuration" in client.get_server_metadata()["extensions"]
    config = client.get_model_config("basket-scorer", headers=headers)
    assert config == {
        "name": "basket-scorer",
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "max_batch_size": 32,
        "input": [{"name": "features", "data_type": "TYPE_FP32", "dims": [16]}],
        "output": [{"name": "score", "data_type": "TYPE_FP32", "dims": [1]}],
        "dynamic_batching": {"max_queue_delay_microseconds": 5000},
    }
    version = DEMO["basket-scorer"][2]
    assert client.get_model_config("basket-scorer", version, headers=headers) == config
    strings = client.get_model_config(
        "sku-lookup", headers=demo_node.auth(demo_node.tenant_key("retail"))
    )
    assert {t["data_type"] for t in strings["input"]} == {"TYPE_STRING"}
    with pytest.raises(InferenceServerException) as other_tenant:
        client.get_model_config("sku-lookup", headers=headers)
    assert other_tenant.value.status() == "404"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("deployment", sorted(DEMO))
@pytest.mark.parametrize("batch", [1, 3])
def test_infer_matches_onnxruntime(
    demo_node: NodeProcess, models_dir: Path, deployment: str, binary: bool, batch: int
) -> None:
    tenant, model, _ = DEMO[deployment]
    headers = demo_node.auth(demo_node.tenant_key(tenant))
    inputs = sample_inputs(model, batch=batch)
    triton_inputs = []
    for name, array in inputs.items():
        tensor = http.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array, binary_data=binary)
        triton_inputs.append(tensor)
    expected = _direct(models_dir, model, inputs)
    outputs = [http.InferRequestedOutput(name, binary_data=binary) for name in expected]
    result = _client(demo_node).infer(
        deployment, triton_inputs, outputs=outputs, headers=headers, request_id="req-42"
    )
    assert result.get_response()["id"] == "req-42"
    for name, want in expected.items():
        got = result.as_numpy(name)
        assert got is not None, f"output {name} missing"
        if want.dtype.kind in "OUS":
            assert [x.decode() if isinstance(x, bytes) else x for x in got.ravel()] == list(
                want.astype(str).ravel()
            )
        else:
            assert got.dtype == want.dtype
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_infer_covers_fp32_int64_and_bytes(demo_node: NodeProcess) -> None:
    """The demo exercises the three datatypes the acceptance names."""
    seen = set()
    for deployment, (tenant, _model, _) in DEMO.items():
        meta = _client(demo_node).get_model_metadata(
            deployment, headers=demo_node.auth(demo_node.tenant_key(tenant))
        )
        seen.update(i["datatype"] for i in meta["inputs"])
    assert {"FP32", "INT64", "BYTES"} <= seen


def test_default_outputs_are_binary(demo_node: NodeProcess) -> None:
    """With no outputs requested, the client asks for binary outputs and gets them."""
    headers = demo_node.auth(demo_node.tenant_key("analytics"))
    features = sample_inputs("basket-scorer", batch=2)["features"]
    tensor = http.InferInput("features", list(features.shape), "FP32")
    tensor.set_data_from_numpy(features)
    result = _client(demo_node).infer("basket-scorer", [tensor], headers=headers)
    response = result.get_response()
    assert response["outputs"][0]["parameters"]["binary_data_size"] == 2 * 4
    assert result.as_numpy("score").shape == (2, 1)


def test_repository_index_unload_and_load(demo_node: NodeProcess) -> None:
    headers = demo_node.auth(demo_node.tenant_key("retail"))
    client = _client(demo_node)
    index = {m["name"]: m for m in client.get_model_repository_index(headers=headers)}
    assert set(index) == {"shelf-detector", "sku-lookup"}, "only the caller's own deployments"
    assert index["shelf-detector"]["state"] == "READY"
    assert index["shelf-detector"]["version"] == "3"

    client.unload_model("shelf-detector", headers=headers)
    assert not client.is_model_ready("shelf-detector", headers=headers)
    index = {m["name"]: m for m in client.get_model_repository_index(headers=headers)}
    assert index["shelf-detector"]["state"] == "UNAVAILABLE"
    # {"ready": true}: only the models ready for inference
    url = f"{demo_node.url}/v2/repository/index"
    ready = httpx.post(url, headers=headers, json={"ready": True}, timeout=30)
    assert [m["name"] for m in ready.json()] == ["sku-lookup"]
    everything = httpx.post(url, headers=headers, json={"ready": False}, timeout=30)
    assert {m["name"] for m in everything.json()} == {"shelf-detector", "sku-lookup"}
    refused = httpx.post(url, headers=headers, json={"ready": "yes"}, timeout=30)
    assert (refused.status_code, refused.json()["error"]) == (
        400,
        "'ready' must be true or false, not \"yes\"",
    )
    image = http.InferInput("image", [1, 3, 32, 32], "FP32")
    image.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(InferenceServerException) as unavailable:
        client.infer("shelf-detector", [image], headers=headers)
    assert unavailable.value.status() == "503"

    # Triton's load with a configuration or files of its own: gpuvisor loads what the
    # manifests say, and says so rather than loading something else than asked
    with pytest.raises(InferenceServerException) as override:
        client.load_model(
            "shelf-detector",
            headers=dict(headers),  # tritonclient adds to the dict it is given
            config='{"max_batch_size": 4}',
            files={"file:1/model.onnx": b"xx"},
        )
    assert override.value.status() == "400"
    assert "override its config, file:1/model.onnx" in str(override.value.message())
    assert not client.is_model_ready("shelf-detector", headers=headers)

    client.load_model("shelf-detector", headers=headers)
    assert client.is_model_ready("shelf-detector", headers=headers)
    result = client.infer("shelf-detector", [image], headers=headers)
    assert result.as_numpy("probabilities").shape == (1, 10)


def test_a_model_whose_slice_failed_is_unavailable_in_the_index(
    demo_node: NodeProcess, tmp_path: Path
) -> None:
    """Not LOADING: a client that waits for LOADING to turn READY would wait for ever."""
    headers = demo_node.auth(demo_node.tenant_key("retail"))
    demo_node.apply_as_admin(
        f"""
apiVersion: gpuvisor/v1
kind: Model
metadata: {{name: missing, tenant: retail}}
spec: {{source: "{tmp_path / "missing.onnx"}"}}
---
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {{name: missing, tenant: retail}}
spec: {{model: missing, profile: rt-small}}
"""
    )
    admin = demo_node.auth(demo_node.admin_key)
    try:
        deadline = time.monotonic() + 60
        while True:
            entry = next(
                m
                for m in _client(demo_node).get_model_repository_index(headers=headers)
                if m["name"] == "missing"
            )
            if entry["state"] != "LOADING":
                break
            assert time.monotonic() < deadline, entry
            time.sleep(0.05)
        assert entry["state"] == "UNAVAILABLE"
        assert "not found" in entry["reason"]
        # its metadata says why, and does not ask to retry what no retry mends
        answer = httpx.get(f"{demo_node.url}/v2/models/missing", headers=headers)
        assert answer.status_code == 503 and "retry-after" not in answer.headers
        assert "Failed" in answer.json()["error"] and "not found" in answer.json()["error"]
    finally:
        for kind in ("deployments", "models"):
            httpx.delete(f"{demo_node.url}/api/v1/{kind}/missing?tenant=retail", headers=admin)


def test_loading_a_deployment_with_no_replicas_answers_at_once(demo_node: NodeProcess) -> None:
    """Nothing will turn Ready: the load says so now, not after workers.startTimeout."""
    demo_node.apply_as_admin(
        """
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {name: none-yet, tenant: analytics}
spec: {model: basket-scorer, profile: batch-large, replicas: 0}
"""
    )
    admin = demo_node.auth(demo_node.admin_key)
    try:
        started = time.monotonic()
        answer = httpx.post(
            f"{demo_node.url}/v2/repository/models/none-yet/load",
            headers=demo_node.auth(demo_node.tenant_key("analytics")),
            timeout=60,
        )
        assert answer.status_code == 503, answer.text
        assert "has no replicas" in answer.json()["error"]
        assert time.monotonic() - started < 10
    finally:
        httpx.delete(f"{demo_node.url}/api/v1/deployments/none-yet?tenant=analytics", headers=admin)
