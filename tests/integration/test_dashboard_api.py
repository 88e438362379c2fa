"""The dashboard's data (`GET /api/v1/dashboard`) and the /ui files on a real node: each key
sees what it may and nothing of other tenants, numbers follow the load, pending slices say why."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpuvisor.launch import NodeProcess

SHELF_BODY = json.dumps(
    {
        "inputs": [
            {"name": "image", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.1] * 3072}
        ]
    }
).encode()
EXTRA = """
apiVersion: gpuvisor/v1
kind: Tenant
metadata: {name: newcomer}
---
apiVersion: gpuvisor/v1
kind: Profile
metadata: {name: test-greedy}
spec: {memory: 64Mi, computeShare: 0.9, isolation: process, latencyClass: standard}
---
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {name: greedy, tenant: retail}
spec: {model: sku-lookup, profile: test-greedy, pool: inference}
"""
OTHERS_OF_RETAIL = ["support", "analytics", "intent-router", "basket-scorer", "newcomer"]


@pytest.fixture(scope="module")
def node(demo_node: NodeProcess) -> Iterator[NodeProcess]:
    """The demo node plus a tenant with nothing deployed and a retail slice that cannot be placed."""
    admin = demo_node.auth(demo_node.admin_key)
    applied = httpx.post(f"{demo_node.url}/api/v1/apply", headers=admin, content=EXTRA, timeout=60)
    assert applied.status_code == 200, applied.text
    yield demo_node


def _dashboard(node: NodeProcess, key: str) -> dict[str, Any]:
    response = httpx.get(f"{node.url}/api/v1/dashboard", headers=node.auth(key), timeout=10)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def _key(node: NodeProcess, role: str, tenant: str | None = None) -> str:
    created = httpx.post(
        f"{node.url}/api/v1/keys",
        headers=node.auth(node.admin_key),
        json={"role": role, "tenant": tenant},
        timeout=10,
    )
    assert created.status_code == 201, created.text
    return str(created.json()["key"])


def test_a_tenant_key_sees_only_its_own_objects(node: NodeProcess) -> None:
    data = _dashboard(node, node.tenant_key("retail"))
    assert data["viewer"] == {"role": "tenant", "tenant": "retail"}
    assert {d["name"] for d in data["deployments"]} == {"shelf-detector", "sku-lookup", "greedy"}
    assert [t["name"] for t in data["tenants"]] == ["retail"]
    (device,) = data["devices"]
    assert {s["tenant"] for s in device["slices"]} == {"retail"}
    # the other tenants' slices on the shared device: one anonymous block
    assert device["others"]["slices"] == 2
    assert device["others"]["memoryLimit"] == 1536 * 2**20  # intent-router 512Mi + basket 1Gi
    text = json.dumps(data)
    for other in OTHERS_OF_RETAIL:
        assert other not in text, f"a retail key saw '{other}'"


def test_admin_and_operator_keys_see_every_tenant(node: NodeProcess) -> None:
    for key in (node.admin_key, _key(node, "operator")):
        data = _dashboard(node, key)
        assert {t["name"] for t in data["tenants"]} == {
            "retail",
            "support",
            "analytics",
            "newcomer",
        }
        assert {(d["tenant"], d["name"]) for d in data["deployments"]} >= {
            ("retail", "shelf-detector"),
            ("support", "intent-router"),
            ("analytics", "basket-scorer"),
        }
        assert data["devices"][0]["others"] is None


@pytest.mark.parametrize("key", [None, "gvk_abcdefgh_not-a-real-key"])
def test_no_key_or_a_wrong_key_is_401(node: NodeProcess, key: str | None) -> None:
    headers = node.auth(key) if key else {}
    response = httpx.get(f"{node.url}/api/v1/dashboard", headers=headers, timeout=10)
    assert response.status_code == 401
    assert "error" in response.json()


def test_a_tenant_with_nothing_deployed_gets_an_empty_view(node: NodeProcess) -> None:
    data = _dashboard(node, _key(node, "tenant", "newcomer"))
    assert data["deployments"] == [] and data["pending"] == []
    assert [t["name"] for t in data["tenants"]] == ["newcomer"]
    assert data["attention"][0]["level"] == "ok"


def test_a_slice_that_cannot_be_placed_says_why_to_its_tenant_only(node: NodeProcess) -> None:
    retail = _dashboard(node, node.tenant_key("retail"))
    (pending,) = [p for p in retail["pending"] if p["slice"] == "retail/greedy/0"]
    assert pending["state"] == "Pending"
    assert "compute shares would sum to" in pending["reason"]
    assert any("retail/greedy/0 is Pending" in a["text"] for a in retail["attention"])
    (greedy,) = [d for d in retail["deployments"] if d["name"] == "greedy"]
    assert greedy["state"] == "Pending" and greedy["ready"] == 0
    support = _dashboard(node, node.tenant_key("support"))
    assert "greedy" not in json.dumps(support)
    # counted once as an allocation failure, not once per reconcile retry
    time.sleep(2.5)  # longer than one reconcile period
    text = httpx.get(f"{node.url}/metrics", timeout=10).text
    failures = [
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "gpuvisor_allocation_failures_total" and s.labels["deployment"] == "greedy"
    ]
    assert failures == [1.0]


def test_numbers_follow_the_load(node: NodeProcess) -> None:
    key = node.tenant_key("retail")

    def shelf(data: dict[str, Any]) -> dict[str, Any]:
        return next(d for d in data["deployments"] if d["name"] == "shelf-detector")

    before = shelf(_dashboard(node, key))
    with httpx.Client(base_url=node.url, headers=node.auth(key), timeout=30) as http:
        for _ in range(30):
            assert (
                http.post("/v2/models/shelf-detector/infer", content=SHELF_BODY).status_code == 200
            )
    after_all = _dashboard(node, key)
    after = shelf(after_all)
    assert after["requests"]["ok"] - before["requests"]["ok"] == 30
    assert after["answered"] - before["answered"] == 30
    assert 0 < after["p50"] <= after["p99"] < 5
    assert after["rate"] > 0
    (retail,) = after_all["tenants"]
    assert retail["share"] > 0 and retail["entitlement"] == pytest.approx(0.35)
    assert retail["waitP99"] is not None
    admin = _dashboard(node, node.admin_key)
    support = next(t for t in admin["tenants"] if t["name"] == "support")
    assert support["share"] == 0


def test_ui_files_are_served_and_nothing_else(node: NodeProcess) -> None:
    root = httpx.get(f"{node.url}/ui", timeout=10)
    assert root.status_code == 307 and root.headers["location"] == "/ui/"
    page = httpx.get(f"{node.url}/ui/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="app.js">' in page.text and "https://" not in page.text  # offline
    script = httpx.get(f"{node.url}/ui/app.js", timeout=10)
    assert script.headers["content-type"].startswith("text/javascript")
    assert "/api/v1/dashboard" in script.text and "sessionStorage" in script.text
    assert httpx.get(f"{node.url}/ui/app.css", timeout=10).status_code == 200
    for path in ("/ui/nothing.js", "/ui/..%2Fadmin.key", "/ui/%2E%2E%2Fnode.log"):
        missing = httpx.get(f"{node.url}{path}", timeout=10)
        assert missing.status_code == 404, path
        assert "error" in missing.json()
