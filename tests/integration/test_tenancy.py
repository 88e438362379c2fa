"""Tenants are isolated: another tenant's deployments do not exist for them; keys are required."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from gpuvisor.launch import NodeProcess

# Every OIP endpoint that names a model, as (method, path template).
MODEL_ENDPOINTS = [
    ("GET", "/v2/models/{m}"),
    ("GET", "/v2/models/{m}/versions/3"),
    ("GET", "/v2/models/{m}/ready"),
    ("GET", "/v2/models/{m}/versions/3/ready"),
    ("GET", "/v2/models/{m}/config"),
    ("GET", "/v2/models/{m}/versions/3/config"),
    ("POST", "/v2/models/{m}/infer"),
    ("POST", "/v2/models/{m}/versions/3/infer"),
    ("POST", "/v2/repository/models/{m}/load"),
    ("POST", "/v2/repository/models/{m}/unload"),
]
INFER_BODY = (
    b'{"inputs":[{"name":"image","shape":[1,3,32,32],"datatype":"FP32","data":['
    + b",".join([b"0"] * 3072)
    + b"]}]}"
)


@pytest.mark.parametrize(("method", "template"), MODEL_ENDPOINTS)
def test_other_tenants_deployment_is_not_found(
    demo_node: NodeProcess, method: str, template: str
) -> None:
    support = demo_node.auth(demo_node.tenant_key("support"))
    path = template.format(m="shelf-detector")  # retail's deployment
    response = httpx.request(
        method, demo_node.url + path, headers=support, content=INFER_BODY, timeout=30
    )
    assert response.status_code == 404, response.text
    body = response.json()
    assert set(body) >= {"error"} and "detail" not in body
    assert "retail" not in body["error"], "the answer must not reveal the owner"
    # The owner itself still reaches it.
    retail = demo_node.auth(demo_node.tenant_key("retail"))
    if "unload" not in path and "load" not in path:
        own = httpx.request(
            method, demo_node.url + path, headers=retail, content=INFER_BODY, timeout=30
        )
        assert own.status_code == 200, own.text


@pytest.mark.parametrize(
    ("method", "template"),
    [*MODEL_ENDPOINTS, ("POST", "/v2/repository/index"), ("GET", "/api/v1/deployments")],
)
@pytest.mark.parametrize("key", [None, "gvk_abcdefgh_not-a-real-key", "garbage"])
def test_missing_or_wrong_key_is_401(
    demo_node: NodeProcess, method: str, template: str, key: str | None
) -> None:
    headers = demo_node.auth(key) if key else {}
    response = httpx.request(
        method,
        demo_node.url + template.format(m="shelf-detector"),
        headers=headers,
        content=INFER_BODY,
        timeout=30,
    )
    assert response.status_code == 401, response.text
    assert "error" in response.json()
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="gpuvisor"'


def test_tenant_sees_only_its_own_objects(demo_node: NodeProcess) -> None:
    retail = demo_node.auth(demo_node.tenant_key("retail"))
    deployments = httpx.get(f"{demo_node.url}/api/v1/deployments", headers=retail).json()["items"]
    assert {d["metadata"]["tenant"] for d in deployments} == {"retail"}
    admin = demo_node.auth(demo_node.admin_key)
    everything = httpx.get(f"{demo_node.url}/api/v1/deployments", headers=admin).json()["items"]
    assert {d["metadata"]["tenant"] for d in everything} == {"retail", "support", "analytics"}


def test_admin_key_applies_manifests_and_tenant_key_cannot_touch_others(
    demo_node: NodeProcess,
) -> None:
    manifest = """
apiVersion: gpuvisor/v1
kind: Profile
metadata: {name: tiny-extra}
spec: {memory: 256Mi, computeShare: 0.0}
"""
    admin = demo_node.auth(demo_node.admin_key)
    applied = httpx.post(f"{demo_node.url}/api/v1/apply", headers=admin, content=manifest)
    assert applied.status_code == 200, applied.text
    assert applied.json()["results"] == [
        {
            "kind": "Profile",
            "name": "tiny-extra",
            "tenant": None,
            "outcome": "created",
            "warnings": [],
            "notes": [],
        }
    ]
    support = demo_node.auth(demo_node.tenant_key("support"))
    refused = httpx.post(f"{demo_node.url}/api/v1/apply", headers=support, content=manifest)
    assert refused.status_code == 403
    foreign = (
        manifest.replace("kind: Profile", "kind: Deployment")
        .replace("metadata: {name: tiny-extra}", "metadata: {name: sneaky, tenant: retail}")
        .replace(
            "spec: {memory: 256Mi, computeShare: 0.0}",
            "spec: {model: shelf-classifier, profile: rt-small}",
        )
    )
    assert (
        httpx.post(f"{demo_node.url}/api/v1/apply", headers=support, content=foreign).status_code
        == 404
    )


def test_tenant_cannot_read_another_tenant_object(demo_node: NodeProcess) -> None:
    support = demo_node.auth(demo_node.tenant_key("support"))
    assert httpx.get(f"{demo_node.url}/api/v1/tenants/retail", headers=support).status_code == 404
    own = httpx.get(f"{demo_node.url}/api/v1/tenants/support", headers=support)
    assert own.status_code == 200 and own.json()["metadata"]["name"] == "support"
    assert (
        httpx.get(f"{demo_node.url}/api/v1/profiles/rt-small", headers=support).status_code == 200
    )


def test_a_tenant_key_names_model_files_only_in_its_model_folders(
    demo_node: NodeProcess, tmp_path: Path
) -> None:
    """Another tenant's model file (here the demo's, in the node's state directory) cannot be
    served under a tenant key once the admin gives the tenant model folders."""
    root = tmp_path / "confined-models"
    root.mkdir()
    shutil.copy(demo_node.state_dir / "demo" / "models" / "basket-scorer.onnx", root / "own.onnx")
    theirs = demo_node.state_dir / "demo" / "models" / "basket-scorer.onnx"
    (root / "link.onnx").symlink_to(theirs)
    admin = demo_node.auth(demo_node.admin_key)

    def apply(headers: dict[str, str], text: str) -> httpx.Response:
        return httpx.post(
            f"{demo_node.url}/api/v1/apply", headers=headers, content=text, timeout=60
        )

    tenant = (
        "apiVersion: gpuvisor/v1\nkind: Tenant\nmetadata: {name: confined}\n"
        f"spec: {{modelRoots: ['{root}']}}\n"
    )
    assert apply(admin, tenant).status_code == 200
    key = demo_node.auth(demo_node.create_tenant_key("confined"))

    def model(source: Path, version: str) -> str:
        return (
            "apiVersion: gpuvisor/v1\nkind: Model\nmetadata: {name: scorer, tenant: confined}\n"
            f"spec: {{source: '{source}', version: '{version}'}}\n"
        )

    assert apply(key, model(root / "own.onnx", "1")).status_code == 200
    for source in (theirs, root / "link.onnx", root / ".." / "elsewhere.onnx"):
        refused = apply(key, model(source, "2"))
        assert refused.status_code == 403, refused.text
        assert "outside tenant 'confined''s model folders" in refused.json()["error"]
    # the admin is not confined
    assert apply(admin, model(theirs, "3")).status_code == 200


@pytest.mark.parametrize(("method", "template"), MODEL_ENDPOINTS)
def test_an_admin_key_on_an_inference_protocol_route_is_told_to_use_a_tenants(
    demo_node: NodeProcess, method: str, template: str
) -> None:
    admin = demo_node.auth(demo_node.admin_key)
    path = template.format(m="shelf-detector")
    response = httpx.request(method, demo_node.url + path, headers=admin, timeout=30)
    assert response.status_code == 404, response.text
    assert response.json()["error"] == (
        "model 'shelf-detector' not found: the inference protocol's routes (inference, "
        "metadata, the model repository) take a tenant's key, not an admin key (create one "
        "with 'gpuvisor keys create --tenant NAME')"
    )


def test_the_clients_request_id_comes_back_on_every_answer(demo_node: NodeProcess) -> None:
    """Metadata, readiness and admin reads too, not only inference and errors: a client
    traces any call by the id it sent."""
    retail = {**demo_node.auth(demo_node.tenant_key("retail")), "X-Request-ID": "trace-7"}
    for path in ("/v2/models/shelf-detector", "/v2/models/shelf-detector/ready", "/v2"):
        answer = httpx.get(demo_node.url + path, headers=retail, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-request-id"] == "trace-7", path
    listed = httpx.get(f"{demo_node.url}/api/v1/deployments", headers=retail, timeout=30)
    assert listed.headers.get_list("x-request-id") == ["trace-7"]
    refused = httpx.get(
        f"{demo_node.url}/v2/models/nothing", headers=retail, timeout=30
    )  # an error sets its own: still one, the client's
    assert refused.headers.get_list("x-request-id") == ["trace-7"]
