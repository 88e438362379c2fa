"""Reference checks between objects (profiles, pools, models, tenants) and model version choice."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpuvisor.errors import SpecError
from gpuvisor.spec.kinds import Metadata, Model, ModelSpec
from gpuvisor.spec.loader import find_model, load_documents, validate_references

HEADER = "apiVersion: gpuvisor/v1\n"

CLUSTER = """\
apiVersion: gpuvisor/v1
kind: Tenant
metadata: {name: retail}
---
apiVersion: gpuvisor/v1
kind: Profile
metadata: {name: rt-small}
spec: {memory: 1Gi}
---
apiVersion: gpuvisor/v1
kind: Pool
metadata: {name: inference}
---
apiVersion: gpuvisor/v1
kind: Model
metadata: {name: shelf-detector, tenant: retail}
spec: {version: 3, source: m.onnx}
"""


def deployment_yaml(name: str = "shelf-detector", tenant: str = "retail", **spec: str) -> str:
    fields = {"model": "shelf-detector", "profile": "rt-small", **spec}
    body = ", ".join(f"{key}: {value}" for key, value in fields.items())
    return (
        HEADER
        + f"kind: Deployment\nmetadata: {{name: {name}, tenant: {tenant}}}\nspec: {{{body}}}\n"
    )


def test_the_exact_unknown_profile_line() -> None:
    existing = load_documents(CLUSTER, "cluster.yaml")
    text = "---\n".join(
        [
            HEADER + "kind: Profile\nmetadata: {name: rt-large}\nspec: {memory: 4Gi}\n",
            HEADER + "kind: Pool\nmetadata: {name: batch}\n",
            deployment_yaml(profile="rt-smal"),
        ]
    )
    new = load_documents(text, "deployments.yaml")
    with pytest.raises(SpecError) as info:
        validate_references(new, existing)
    assert info.value.message == (
        "deployments.yaml doc 3 Deployment/shelf-detector: spec.profile: "
        "unknown profile 'rt-smal' (did you mean 'rt-small'?)"
    )
    assert info.value.fields["problems"] == [
        {
            "source": "deployments.yaml",
            "doc": 3,
            "kind": "Deployment",
            "name": "shelf-detector",
            "path": "spec.profile",
            "message": "unknown profile 'rt-smal' (did you mean 'rt-small'?)",
        }
    ]


@pytest.mark.parametrize(
    ("document", "expected_message"),
    [
        (
            deployment_yaml(profile="gold"),
            "spec.profile: unknown profile 'gold' (known profiles: rt-small)",
        ),
        (
            deployment_yaml(pool="inferense"),
            "spec.pool: unknown pool 'inferense' (did you mean 'inference'?)",
        ),
        (
            deployment_yaml(model="basket"),
            "spec.model: unknown model 'basket' of tenant 'retail' (known models: shelf-detector)",
        ),
        (
            deployment_yaml(model="shelf-detector@4"),
            "spec.model: model 'shelf-detector' has no version '4' (known versions: 3)",
        ),
        (
            deployment_yaml(tenant="retial"),
            "metadata.tenant: unknown tenant 'retial' (did you mean 'retail'?)",
        ),
        (
            HEADER + "kind: Model\nmetadata: {name: m, tenant: bank}\nspec: {source: m.onnx}\n",
            "metadata.tenant: unknown tenant 'bank' (known tenants: retail)",
        ),
        (
            HEADER + "kind: Tenant\nmetadata: {name: bank}\nspec: {pools: [default, regulated]}\n",
            "spec.pools[1]: unknown pool 'regulated' (known pools: default, inference)",
        ),
    ],
)
def test_dangling_references(document: str, expected_message: str) -> None:
    existing = load_documents(CLUSTER, "cluster.yaml")
    new = load_documents(document, "new.yaml")
    with pytest.raises(SpecError) as info:
        validate_references(new, existing)
    lines = info.value.message.splitlines()
    assert any(line.endswith(expected_message) for line in lines), lines
    assert all(line.startswith("new.yaml doc 1 ") for line in lines)


@pytest.mark.parametrize(
    "document",
    [
        deployment_yaml(),
        deployment_yaml(pool="default"),
        deployment_yaml(model="shelf-detector@3", pool="inference"),
    ],
)
def test_valid_references_pass(document: str) -> None:
    existing = load_documents(CLUSTER, "cluster.yaml")
    validate_references(load_documents(document, "new.yaml"), existing)


def test_references_may_point_into_the_same_apply() -> None:
    validate_references(load_documents(CLUSTER + "---\n" + deployment_yaml()), [])


def test_no_profiles_at_all_says_so() -> None:
    new = load_documents(deployment_yaml())
    with pytest.raises(
        SpecError, match=r"unknown profile 'rt-small' \(no profiles are defined yet\)"
    ):
        validate_references(new, [])


def test_tenant_pool_restriction_and_replacement_by_new_objects() -> None:
    existing = load_documents(CLUSTER, "cluster.yaml")
    restricted = load_documents(
        HEADER + "kind: Tenant\nmetadata: {name: retail}\nspec: {pools: [inference]}\n", "t.yaml"
    )
    elsewhere = load_documents(deployment_yaml(pool="default"), "d.yaml")
    with pytest.raises(SpecError, match="tenant 'retail' may only deploy to pools inference"):
        validate_references(restricted + elsewhere, existing)
    with pytest.raises(SpecError, match="may only deploy to pools inference"):
        validate_references(elsewhere, existing + restricted)
    # the stored tenant is restricted, but the newly applied version lifts the restriction
    lifted = load_documents(HEADER + "kind: Tenant\nmetadata: {name: retail}\n", "t2.yaml")
    validate_references(lifted + elsewhere, existing + restricted)


def model(name: str, version: str, tenant: str = "retail") -> Model:
    return Model(
        metadata=Metadata(name=name, tenant=tenant),
        spec=ModelSpec(version=version, source=f"/models/{name}-{version}.onnx"),
    )


@pytest.mark.parametrize(
    ("versions", "asked", "expected"),
    [
        (["1", "2", "10"], None, "10"),
        (["9", "10", "3"], None, "10"),
        (["1.9", "1.10", "1.2"], None, "1.10"),
        # a pre-release comes before its release, a leading v is no number of its own
        (["1.10", "1.10-rc1"], None, "1.10"),
        (["1.10-rc1", "1.9"], None, "1.10-rc1"),
        (["1.10-rc9", "1.10-rc10"], None, "1.10-rc10"),
        (["1.10", "v0.1"], None, "1.10"),
        (["v2", "1.10"], None, "v2"),
        (["2", "v2-beta"], None, "2"),
        (["2024.06", "2024.10", "2023.12"], None, "2024.10"),
        (["latest", "1"], None, "1"),
        (["1.10", "1.10.1"], None, "1.10.1"),
        (["1", "2", "10"], "2", "2"),
        (["1", "2"], "3", None),
        ([], None, None),
    ],
)
def test_find_model_chooses_the_version(
    versions: list[str], asked: str | None, expected: str | None
) -> None:
    models = [model("shelf", v) for v in versions] + [model("shelf", "99", tenant="other")]
    found = find_model(models, "retail", "shelf", asked)
    assert (found.spec.version if found else None) == expected
    if found is not None:
        assert found.metadata.tenant == "retail"


@given(st.lists(st.integers(min_value=0, max_value=10**6), min_size=1, unique=True))
def test_find_model_highest_numeric_version_compares_as_integers(numbers: list[int]) -> None:
    models = [model("m", str(n)) for n in numbers]
    found = find_model(models, "retail", "m", None)
    assert found is not None and found.spec.version == str(max(numbers))


def test_find_model_ignores_other_names_and_tenants() -> None:
    models = [model("a", "1"), model("b", "5"), model("a", "7", tenant="bank")]
    found = find_model(models, "retail", "a", None)
    assert found is not None and found.spec.version == "1"
    assert find_model(models, "retail", "c", None) is None
