"""What keeps an object from being deleted: the deployments that use a model version."""

from __future__ import annotations

import pytest

from gpuvisor.api.objects import users_of
from gpuvisor.spec.kinds import resource_key
from gpuvisor.spec.loader import load_documents, resource_to_dict
from gpuvisor.store.repo import StoredObject

MODELS = """
apiVersion: gpuvisor/v1
kind: Model
metadata: {name: scorer, tenant: shop}
spec: {source: /models/scorer-1.onnx, version: "1"}
---
apiVersion: gpuvisor/v1
kind: Model
metadata: {name: scorer, tenant: shop}
spec: {source: /models/scorer-2.onnx, version: "2"}
---
apiVersion: gpuvisor/v1
kind: Model
metadata: {name: scorer, tenant: shop}
spec: {source: /models/scorer-10.onnx, version: "10"}
"""


def _deployment(model: str, tenant: str = "shop") -> str:
    return (
        "---\napiVersion: gpuvisor/v1\nkind: Deployment\n"
        f"metadata: {{name: d, tenant: {tenant}}}\nspec: {{model: {model}, profile: p}}\n"
    )


@pytest.mark.parametrize(
    ("model", "tenant", "blocked"),
    [
        ("scorer@2", "shop", {"2"}),  # a pinned version: only that one is in use
        ("scorer", "shop", {"10"}),  # unpinned: the highest version ("10" > "2"), only
        ("scorer@2", "other", set()),  # another tenant's deployment of a model of that name
        ("counter", "shop", set()),  # another model
    ],
)
def test_a_deployment_holds_only_the_model_version_it_serves(
    model: str, tenant: str, blocked: set[str]
) -> None:
    resources = load_documents(MODELS + _deployment(model, tenant), "test.yaml")
    held = set()
    for r in resources:
        if r.kind != "Model":
            continue
        kind, owner, name = resource_key(r)
        stored = StoredObject(kind, owner, name, resource_to_dict(r))
        if users_of(resources, "Model", stored):
            held.add(r.spec.version)  # type: ignore[attr-defined]
    assert held == blocked
