"""Tenant quotas on a running node: an apply that would take a tenant over quota.memory,
quota.compute or quota.deployments is refused whole (403 quota_exceeded, with the numbers) and
stores nothing; an apply within the quota passes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from gpuvisor.demo.models import build_demo_model
from gpuvisor.launch import NodeProcess

MI = 2**20

BASE = """
apiVersion: gpuvisor/v1
kind: Tenant
metadata: {{name: retail}}
spec: {{quota: {{memory: 512Mi, compute: 0.5, deployments: 2}}}}
---
apiVersion: gpuvisor/v1
kind: Profile
metadata: {{name: small}}
spec: {{memory: 256Mi, computeShare: 0.1}}
---
apiVersion: gpuvisor/v1
kind: Model
metadata: {{name: scorer, tenant: retail}}
spec: {{source: "{source}"}}
"""


def deployment(name: str, replicas: int) -> str:
    return f"""
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {{name: {name}, tenant: retail}}
spec: {{model: scorer, profile: small, replicas: {replicas}}}
"""


@dataclass
class Setup:
    node: NodeProcess
    tenant_key: str

    def apply(self, *documents: str, key: str | None = None) -> httpx.Response:
        return httpx.post(
            f"{self.node.url}/api/v1/apply",
            headers=self.node.auth(key or self.node.admin_key),
            content="---".join(documents),
            timeout=60,
        )

    def get(self, path: str) -> httpx.Response:
        return httpx.get(
            f"{self.node.url}/api/v1/{path}", headers=self.node.auth(self.node.admin_key)
        )


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, node_db: str | None) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("quotas")
    source = root / "scorer.onnx"
    source.write_bytes(build_demo_model("basket-scorer").SerializeToString())
    node = NodeProcess(state_dir=root / "state", demo=False, db=node_db)
    node.start(timeout=120)
    try:
        node.apply_as_admin(BASE.format(source=source))
        yield Setup(node, node.create_tenant_key("retail"))
    finally:
        node.stop()


def _replicas(setup: Setup, name: str) -> Any:
    response = setup.get(f"deployments/{name}?tenant=retail")
    assert response.status_code == 200, response.text
    return response.json()["spec"]["replicas"]


def test_in_quota_apply_passes_and_over_quota_apply_stores_nothing(setup: Setup) -> None:
    ok = setup.apply(deployment("shelf-detector", 1))
    assert ok.status_code == 200, ok.text
    assert _replicas(setup, "shelf-detector") == 1

    # One multi-document apply: a new deployment within every quota, and a scale-up that takes
    # the tenant to 768Mi against 512Mi. Neither is stored.
    refused = setup.apply(
        deployment("basket-scorer", 0), deployment("shelf-detector", 3), key=setup.tenant_key
    )
    assert refused.status_code == 403, refused.text
    body = refused.json()
    assert body["code"] == "quota_exceeded"
    assert body["error"] == (
        "tenant 'retail' quota.memory is 512Mi: its deployments would use 768Mi (currently "
        "256Mi, +512Mi from shelf-detector ×3 of profile 'small' 256Mi (was shelf-detector ×1 "
        "of profile 'small' 256Mi)); scale deployments down or delete some, or raise the "
        "Tenant's spec.quota.memory to at least 768Mi"
    )
    assert body["tenant"] == "retail" and body["quota"] == "memory"
    assert (body["limit"], body["usage"], body["current"]) == (512 * MI, 768 * MI, 256 * MI)
    assert _replicas(setup, "shelf-detector") == 1
    assert setup.get("deployments/basket-scorer?tenant=retail").status_code == 404

    denied = setup.get("audit?action=apply&result=denied&tenant=retail").json()["items"]
    assert denied and "quota.memory is 512Mi" in denied[-1]["reason"]

    # The same new deployment alone fits (2 deployments, 256Mi) and is stored.
    ok = setup.apply(deployment("basket-scorer", 0), key=setup.tenant_key)
    assert ok.status_code == 200, ok.text
    assert _replicas(setup, "basket-scorer") == 0

    # A third deployment is over quota.deployments.
    third = setup.apply(deployment("price-reader", 0))
    assert third.status_code == 403, third.text
    assert third.json()["error"].startswith(
        "tenant 'retail' quota.deployments is 2: it would have 3 deployments "
        "(currently 2 deployments, +1 from price-reader); "
    )
    assert setup.get("deployments/price-reader?tenant=retail").status_code == 404


def test_lowering_the_quota_below_usage_is_refused_and_scaling_down_passes(setup: Setup) -> None:
    ok = setup.apply(deployment("shelf-detector", 2))
    assert ok.status_code == 200, ok.text  # exactly 512Mi
    lowered = setup.apply(
        "apiVersion: gpuvisor/v1\nkind: Tenant\nmetadata: {name: retail}\n"
        "spec: {quota: {memory: 256Mi, compute: 0.5, deployments: 2}}\n"
    )
    assert lowered.status_code == 403, lowered.text
    assert lowered.json()["error"].startswith(
        "tenant 'retail' quota.memory is 256Mi (lowered from 512Mi by this apply): its "
        "deployments would use 512Mi (currently 512Mi); "
    )
    quota = setup.get("tenants/retail").json()["spec"]["quota"]
    assert quota["memory"] == 512 * MI

    down = setup.apply(deployment("shelf-detector", 0))
    assert down.status_code == 200, down.text
    assert _replicas(setup, "shelf-detector") == 0
