"""The YAML loader: documents, one-line problems, paths against base_dir, round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpuvisor.errors import SpecError
from gpuvisor.spec.kinds import (
    Deployment,
    DeploymentSpec,
    Metadata,
    Model,
    Node,
    Profile,
    Resource,
    resource_key,
)
from gpuvisor.spec.loader import (
    dump_documents,
    load_documents,
    origin_of,
    resource_from_dict,
    resource_to_dict,
)

HEADER = "apiVersion: gpuvisor/v1\n"


def spec_error(text: str, source: str = "x.yaml") -> SpecError:
    with pytest.raises(SpecError) as info:
        load_documents(text, source)
    return info.value


def one_line(text: str, source: str = "x.yaml") -> str:
    lines = spec_error(text, source).message.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_loads_every_kind_in_order_with_origins(manifest: str) -> None:
    resources = load_documents(manifest, "cluster.yaml")
    kinds = [r.kind for r in resources]
    assert kinds == ["Tenant", "Profile", "Profile", "Pool", "Model", "Deployment", "Fleet", "Node"]
    assert [origin_of(r) for r in resources] == [f"cluster.yaml doc {i}" for i in range(1, 9)]


def test_empty_documents_are_skipped_but_counted() -> None:
    text = "---\n---\n" + HEADER + "kind: Tenant\nmetadata: {name: retail}\n---\n# nothing\n"
    (tenant,) = load_documents(text, "t.yaml")
    assert origin_of(tenant) == "t.yaml doc 2"
    assert load_documents("", "empty.yaml") == []


def test_a_spec_with_nothing_under_it_is_one_left_out() -> None:
    """The docs say `spec` may be omitted; `spec:` alone (YAML's null) means the same."""
    empty = HEADER + "kind: Tenant\nmetadata: {name: retail}\nspec:\n"
    assert load_documents(empty, "t.yaml") == load_documents(
        HEADER + "kind: Tenant\nmetadata: {name: retail}\n", "t.yaml"
    )
    # a spec that is something else than a mapping is still refused
    assert "expected a mapping of fields" in one_line(empty.replace("spec:", "spec: 3"))


def test_values_are_named_as_yaml_writes_them() -> None:
    tenant = HEADER + "kind: Tenant\nmetadata: {name: t}\n"
    assert "spec.pools[0]: must be a valid string (got null)" in one_line(
        tenant + "spec: {pools: [null]}\n"
    )
    assert "spec.pools: expected a list, got a whole number (3)" in one_line(
        tenant + "spec: {pools: 3}\n"
    )


def test_a_reported_status_is_ignored_so_what_get_prints_applies_again() -> None:
    text = HEADER + (
        "kind: Deployment\nmetadata: {name: shelf, tenant: retail}\n"
        "spec: {model: m, profile: p}\n"
        "status: {replicas: 1, readyReplicas: 1, slices: [{id: retail/shelf/0}]}\n"
    )
    (deployment,) = load_documents(text, "got.yaml")
    assert isinstance(deployment, Deployment) and deployment.spec.profile == "p"
    assert "status" not in resource_to_dict(deployment)
    # anything else unknown at the top is still refused
    assert "unknown field 'state'" in one_line(text.replace("status:", "state:"))


def test_unknown_field_is_refused_with_its_path_and_the_accepted_fields() -> None:
    text = HEADER + (
        "kind: Deployment\nmetadata: {name: shelf, tenant: retail}\n"
        "spec: {model: m, profile: p, batching: {maxBatchsize: 4}}\n"
    )
    line = one_line(text)
    assert line.startswith(
        "x.yaml doc 1 Deployment/shelf: spec.batching.maxBatchsize: unknown field 'maxBatchsize'"
    )
    assert "did you mean 'maxBatchSize'?" in line
    assert "accepted fields: maxBatchSize, maxQueueDelay" in line


def test_unknown_field_in_a_list_item_names_the_index() -> None:
    text = (
        HEADER
        + "kind: Fleet\nmetadata: {name: lab}\nspec:\n  nodes:\n  - {name: a}\n  - {name: b, gpus: 2}\n"
    )
    line = one_line(text)
    assert line.startswith("x.yaml doc 1 Fleet/lab: spec.nodes[1].gpus: unknown field 'gpus'")
    assert "accepted fields: name, numaNodes, devices" in line


@pytest.mark.parametrize(
    ("body", "expected_line"),
    [
        (
            "kind: Profile\nmetadata: {name: p}\nspec: {memory: 1Gi, isolation: vm}\n",
            "x.yaml doc 1 Profile/p: spec.isolation: unknown value 'vm'; "
            "accepted: shared, process, partition, exclusive",
        ),
        (
            "kind: Profile\nmetadata: {name: p}\nspec: {memory: lots}\n",
            "x.yaml doc 1 Profile/p: spec.memory: expected a size like '512Mi' or '2Gi' "
            "(units B, K, M, G, T, Ki, Mi, Gi, Ti), got 'lots'",
        ),
        (
            "kind: Profile\nmetadata: {name: p}\nspec: {memory: 1Gi, isolation: partition}\n",
            "x.yaml doc 1 Profile/p: spec.migProfile: isolation 'partition' needs a MIG profile, "
            "e.g. migProfile: 1g.10gb",
        ),
        (
            "kind: Profile\nmetadata: {name: p}\n",
            "x.yaml doc 1 Profile/p: spec: required field is missing",
        ),
        (
            "kind: Profile\nmetadata: {name: Rt_Small}\nspec: {memory: 1Gi}\n",
            "x.yaml doc 1 Profile/Rt_Small: metadata.name: 'Rt_Small' is not a valid name: use "
            "lowercase letters, digits and '-', starting and ending with a letter or digit, at "
            "most 63 characters (e.g. 'shelf-detector')",
        ),
        (
            "kind: Deployment\nmetadata: {name: d, tenant: t}\nspec: {model: m, profile: p, replicas: -1}\n",
            "x.yaml doc 1 Deployment/d: spec.replicas: must be greater than or equal to 0 (got -1)",
        ),
        (
            "kind: Pool\nmetadata: {name: p}\nspec: inference\n",
            "x.yaml doc 1 Pool/p: spec: expected a mapping of fields, got a string ('inference')",
        ),
        (
            "kind: Fleet\nmetadata: {name: f}\nspec: {nodes: [{name: a, devices: [{model: L4, numa: 3}]}]}\n",
            "x.yaml doc 1 Fleet/f: spec.nodes[0].devices[0].numa: NUMA node 3 does not exist: "
            "this node has numaNodes: 1 (valid: 0..0)",
        ),
    ],
)
def test_value_problems_are_one_line_each(body: str, expected_line: str) -> None:
    assert one_line(HEADER + body) == expected_line


@pytest.mark.parametrize(
    ("body", "expected_line"),
    [
        (
            "kind: Deployment\nmetadata: {name: shelf}\nspec: {model: m, profile: p}\n",
            "x.yaml doc 1 Deployment/shelf: metadata.tenant: a Deployment belongs to a tenant: "
            "set metadata.tenant (e.g. tenant: retail)",
        ),
        (
            "kind: Profile\nmetadata: {name: p, tenant: retail}\nspec: {memory: 1Gi}\n",
            "x.yaml doc 1 Profile/p: metadata.tenant: Profile is cluster-scoped and belongs to "
            "no tenant: remove metadata.tenant",
        ),
    ],
)
def test_tenant_scope_mistakes_point_at_metadata_tenant(body: str, expected_line: str) -> None:
    assert one_line(HEADER + body) == expected_line


def test_unknown_kind_lists_the_kinds() -> None:
    text = (
        HEADER
        + "kind: Tenant\nmetadata: {name: t}\n---\n"
        + HEADER
        + "kind: Deploymnet\nmetadata: {name: d}\n"
    )
    line = one_line(text)
    assert line.startswith(
        "x.yaml doc 2: kind: unknown kind 'Deploymnet' "
        "(expected one of Tenant, Profile, Pool, Model, Deployment, Fleet, Node)"
    )
    assert line.endswith("did you mean 'Deployment'?")


@pytest.mark.parametrize(
    ("text", "expected_line"),
    [
        (
            "metadata: {name: a}\n",
            "x.yaml doc 1: kind: required field is missing (expected one of "
            "Tenant, Profile, Pool, Model, Deployment, Fleet, Node)",
        ),
        (
            "kind: Tenant\nmetadata: {name: a}\n",
            "x.yaml doc 1 Tenant/a: apiVersion: required field is missing (expected 'gpuvisor/v1')",
        ),
        (
            "apiVersion: v1\nkind: Tenant\nmetadata: {name: a}\n",
            "x.yaml doc 1 Tenant/a: apiVersion: unknown value 'v1'; accepted: gpuvisor/v1",
        ),
        (
            "- a\n- b\n",
            "x.yaml doc 1: expected a mapping with apiVersion, kind, metadata and spec, got a list",
        ),
    ],
)
def test_envelope_problems(text: str, expected_line: str) -> None:
    assert one_line(text) == expected_line


def test_invalid_yaml_reports_line_and_column() -> None:
    text = HEADER + "kind: Profile\nmetadata: {name: p}\nfoo: a: b\n"
    assert one_line(text, "demo.yaml") == (
        "demo.yaml: invalid YAML at line 4, column 7: mapping values are not allowed here"
    )


def test_duplicate_yaml_keys_are_refused_where_they_occur() -> None:
    text = HEADER + "kind: Profile\nmetadata: {name: p}\nspec:\n  memory: 1Gi\n  memory: 2Gi\n"
    assert one_line(text, "demo.yaml") == (
        "demo.yaml: invalid YAML at line 6, column 3: duplicate key 'memory'"
    )


def test_many_problems_in_many_documents_make_one_error() -> None:
    text = (
        HEADER
        + "kind: Profile\nmetadata: {name: p}\nspec: {memory: 1Gi, computeShare: 2, colour: red}\n"
        "---\n" + HEADER + "kind: Tenant\nmetadata: {name: t}\n"
        "---\n" + HEADER + "kind: Widget\nmetadata: {name: w}\n"
        "---\n" + HEADER + "kind: Deployment\nmetadata: {name: d}\nspec: {profile: p}\n"
    )
    error = spec_error(text, "many.yaml")
    lines = error.message.splitlines()
    assert len(lines) == 5
    problems = error.fields["problems"]
    assert [p["message"] for p in problems] == [line.split(": ", 2)[2] for line in lines]
    assert {p["doc"] for p in problems} == {1, 3, 4}
    assert problems[0] == {
        "source": "many.yaml",
        "doc": 1,
        "kind": "Profile",
        "name": "p",
        "path": "spec.computeShare",
        "message": "must be less than or equal to 1 (got 2)",
    }
    assert {(p["doc"], p["path"]) for p in problems} == {
        (1, "spec.computeShare"),
        (1, "spec.colour"),
        (3, "kind"),
        (4, "metadata.tenant"),
        (4, "spec.model"),
    }
    assert error.to_dict()["code"] == "invalid_spec"


def test_the_same_object_twice_in_one_apply_is_refused() -> None:
    tenant = HEADER + "kind: Tenant\nmetadata: {name: retail}\n"
    model = (
        HEADER
        + "kind: Model\nmetadata: {name: m, tenant: retail}\nspec: {version: %s, source: m.onnx}\n"
    )
    line = one_line("---\n".join([tenant, model % 1, model % 2, tenant]))
    assert line == (
        "x.yaml doc 4 Tenant/retail: metadata.name: Tenant 'retail' is already defined in doc 1; "
        "each object may appear once per apply"
    )
    versions_twice = one_line("---\n".join([model % 1, model % 1]))
    assert "Model 'm' version '1' of tenant 'retail' is already defined in doc 1" in versions_twice


def test_model_source_is_resolved_against_base_dir(tmp_path: Path) -> None:
    text = "---\n".join(
        HEADER + f"kind: Model\nmetadata: {{name: m{i}, tenant: t}}\nspec: {{source: {source}}}\n"
        for i, source in enumerate(["models/a.onnx", "../shared/b.onnx", "/opt/models/c.onnx"])
    )
    sources = [
        r.spec.source for r in load_documents(text, base_dir=tmp_path) if isinstance(r, Model)
    ]
    assert sources == [
        str(tmp_path / "models" / "a.onnx"),
        str(tmp_path.parent / "shared" / "b.onnx"),
        "/opt/models/c.onnx",
    ]
    unresolved = [r.spec.source for r in load_documents(text) if isinstance(r, Model)]
    assert unresolved == ["models/a.onnx", "../shared/b.onnx", "/opt/models/c.onnx"]


def test_node_fleet_path_is_resolved_against_base_dir(tmp_path: Path) -> None:
    text = HEADER + "kind: Node\nmetadata: {name: n}\nspec: {fleet: fleet.yaml}\n"
    (node,) = load_documents(text, base_dir=tmp_path)
    assert isinstance(node, Node)
    assert node.spec.fleet == str(tmp_path / "fleet.yaml")


# --- round trips --------------------------------------------------------------------------


def test_round_trip_through_dicts_keeps_every_object(manifest: str, tmp_path: Path) -> None:
    for resource in load_documents(manifest, "cluster.yaml", base_dir=tmp_path):
        data = resource_to_dict(resource)
        assert json.loads(json.dumps(data)) == data
        assert data["apiVersion"] == "gpuvisor/v1" and data["kind"] == resource.kind
        again = resource_from_dict(data, origin="db Deployment")
        assert again == resource
        assert resource_key(again) == resource_key(resource)
        assert origin_of(again) == "db Deployment"


def test_dicts_use_camel_case_and_numbers(manifest: str) -> None:
    resources = load_documents(manifest)
    deployment = next(r for r in resources if isinstance(r, Deployment))
    data = resource_to_dict(deployment)
    assert data["spec"]["batching"] == {"maxBatchSize": 16, "maxQueueDelay": 0.002}
    assert data["spec"]["placement"]["antiAffinity"] is True
    profile = next(r for r in resources if isinstance(r, Profile))
    assert resource_to_dict(profile)["spec"]["memory"] == 2**30
    assert origin_of(resource_from_dict(resource_to_dict(profile))) == "<stored>"


def test_resource_from_dict_refuses_invalid_data_naming_the_origin() -> None:
    data = {"apiVersion": "gpuvisor/v1", "kind": "Profile", "metadata": {"name": "p"}, "spec": {}}
    with pytest.raises(SpecError) as info:
        resource_from_dict(data, origin="objects row 7")
    assert info.value.message == "objects row 7 Profile/p: spec.memory: required field is missing"


def test_dump_documents_loads_back_to_the_same_objects(manifest: str) -> None:
    resources = load_documents(manifest)
    text = dump_documents(resources)
    assert "computeShare: 0.25" in text and "null" not in text
    assert load_documents(text) == resources


@given(
    memory=st.integers(min_value=1, max_value=2**40),
    share=st.just(0.0) | st.floats(min_value=0.001, max_value=1, allow_nan=False),
    isolation=st.sampled_from(["shared", "process", "exclusive"]),
    latency=st.sampled_from(["critical", "standard", "batch"]),
    delay=st.floats(min_value=0, max_value=10, allow_nan=False),
    replicas=st.integers(min_value=0, max_value=64),
)
def test_round_trip_holds_for_any_valid_profile_and_deployment(
    memory: int, share: float, isolation: str, latency: str, delay: float, replicas: int
) -> None:
    profile = Profile.model_validate(
        {
            "metadata": {"name": "p"},
            "spec": {
                "memory": memory,
                "computeShare": share,
                "isolation": isolation,
                "latencyClass": latency,
            },
        }
    )
    deployment = Deployment(
        metadata=Metadata(name="d", tenant="t"),
        spec=DeploymentSpec.model_validate(
            {
                "model": "m@1",
                "profile": "p",
                "replicas": replicas,
                "batching": {"maxQueueDelay": delay},
            }
        ),
    )
    resources: list[Resource] = [profile, deployment]
    for resource in resources:
        assert resource_from_dict(resource_to_dict(resource)) == resource
    assert load_documents(dump_documents(resources)) == resources


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"kind": "Widget"}, "<stored>: kind: unknown kind 'Widget' (expected one of Tenant, "),
        ({"metadata": {}}, "<stored>: kind: required field is missing (expected one of Tenant, "),
        ([1], "<stored>: expected a mapping of fields, got a list ([1])"),
    ],
)
def test_resource_from_dict_explains_unusable_data(data: object, expected: str) -> None:
    with pytest.raises(SpecError) as info:
        resource_from_dict(data)  # type: ignore[arg-type]
    assert info.value.message.startswith(expected)


def test_equality_ignores_where_an_object_came_from(manifest: str) -> None:
    first = load_documents(manifest, "a.yaml")
    second = load_documents("---\n" + manifest, "b.yaml")
    assert [origin_of(r) for r in first] != [origin_of(r) for r in second]
    assert first == second
    assert first[0] != first[1]
