"""Lists in manifests: what `gpuvisor get KIND -o yaml|json` prints reads back as its items."""

from __future__ import annotations

import json

import pytest
import yaml

from gpuvisor.errors import SpecError
from gpuvisor.spec.kinds import Deployment, DeploymentSpec, Metadata, Profile, ProfileSpec, Tenant
from gpuvisor.spec.loader import (
    load_documents,
    origin_of,
    resource_to_dict,
    validate_references,
)

HEADER = "apiVersion: gpuvisor/v1\n"
TENANT = {"apiVersion": "gpuvisor/v1", "kind": "Tenant", "metadata": {"name": "retail"}}
PROFILE = {
    "apiVersion": "gpuvisor/v1",
    "kind": "Profile",
    "metadata": {"name": "p"},
    "spec": {"memory": "1Gi"},
}


def as_list(*items: object, **envelope: object) -> str:
    """Return a List document holding ``items``, as YAML."""
    document = {"apiVersion": "gpuvisor/v1", "kind": "List", **envelope, "items": list(items)}
    return yaml.safe_dump(document, sort_keys=False)


def problem_lines(text: str) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_documents(text, "all.yaml")
    return info.value.message.splitlines()


def test_a_list_stands_for_its_items_in_order_between_other_documents() -> None:
    text = (
        HEADER
        + "kind: Tenant\nmetadata: {name: first}\n---\n"
        + as_list(TENANT, PROFILE)
        + "---\n"
        + HEADER
        + "kind: Tenant\nmetadata: {name: last}\n"
    )
    resources = load_documents(text, "all.yaml")
    assert [r.metadata.name for r in resources] == ["first", "retail", "p", "last"]
    assert [origin_of(r) for r in resources] == [
        "all.yaml doc 1",
        "all.yaml doc 2 item 1",
        "all.yaml doc 2 item 2",
        "all.yaml doc 3",
    ]


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(as_list(TENANT, PROFILE), id="kind: List"),
        pytest.param(yaml.safe_dump({"items": [TENANT, PROFILE]}), id="bare items"),
        pytest.param(json.dumps({"items": [TENANT, PROFILE]}, indent=2), id="json"),
    ],
)
def test_every_shape_of_list_loads(text: str) -> None:
    assert [r.kind for r in load_documents(text)] == ["Tenant", "Profile"]


def test_each_items_status_is_ignored_as_for_one_document() -> None:
    deployment = {
        "apiVersion": "gpuvisor/v1",
        "kind": "Deployment",
        "metadata": {"name": "shelf", "tenant": "retail"},
        "spec": {"model": "m", "profile": "p"},
        "status": {"replicas": 1, "readyReplicas": 1, "slices": [{"id": "retail/shelf/0"}]},
    }
    (loaded,) = load_documents(as_list(deployment))
    assert isinstance(loaded, Deployment) and "status" not in resource_to_dict(loaded)


def test_a_list_printed_as_json_keeps_its_numbers() -> None:
    """JSON writes 0.00001 s as 1e-05, which YAML 1.1 reads as a string (it wants a dot)."""
    deployment = Deployment(
        metadata=Metadata(name="d", tenant="t"),
        spec=DeploymentSpec.model_validate(
            {"model": "m", "profile": "p", "batching": {"maxQueueDelay": 0.00001}}
        ),
    )
    text = json.dumps({"items": [resource_to_dict(deployment)]}, indent=2)
    assert '"maxQueueDelay": 1e-05' in text
    assert load_documents(text) == [deployment]


def test_what_the_node_lists_loads_back_to_the_same_objects(manifest: str) -> None:
    resources = load_documents(manifest)
    listed = {"apiVersion": "gpuvisor/v1", "kind": "List"}
    listed["items"] = [resource_to_dict(r) for r in resources]  # type: ignore[assignment]
    assert load_documents(yaml.safe_dump(listed, sort_keys=False)) == resources
    assert load_documents(json.dumps(listed, indent=2)) == resources


@pytest.mark.parametrize("text", ["items: []\n", "kind: List\nitems:\n", as_list()])
def test_an_empty_list_holds_nothing(text: str) -> None:
    assert load_documents(text) == []


@pytest.mark.parametrize(
    ("item", "expected_line"),
    [
        (
            {**TENANT, "kind": "Tenannt"},
            "all.yaml doc 1 item 2: kind: unknown kind 'Tenannt' (expected one of Tenant, "
            "Profile, Pool, Model, Deployment, Fleet, Node); did you mean 'Tenant'?",
        ),
        (
            {**PROFILE, "spec": {"memory": "lots"}},
            "all.yaml doc 1 item 2 Profile/p: spec.memory: expected a size like '512Mi' or '2Gi' "
            "(units B, K, M, G, T, Ki, Mi, Gi, Ti), got 'lots'",
        ),
        (
            {"kind": "Tenant", "metadata": {"name": "t"}},
            "all.yaml doc 1 item 2 Tenant/t: apiVersion: required field is missing "
            "(expected 'gpuvisor/v1')",
        ),
        (
            {"kind": "List", "items": [PROFILE]},
            "all.yaml doc 1 item 2: kind: a List cannot hold another List: put its items in "
            "this one",
        ),
        (
            None,
            "all.yaml doc 1 item 2: expected a mapping with apiVersion, kind, metadata and spec, "
            "got nothing",
        ),
        (
            "retail",
            "all.yaml doc 1 item 2: expected a mapping with apiVersion, kind, metadata and spec, "
            "got a str",
        ),
        (
            TENANT,
            "all.yaml doc 1 item 2 Tenant/retail: metadata.name: Tenant 'retail' is already "
            "defined in doc 1 item 1; each object may appear once per apply",
        ),
    ],
)
def test_an_items_problem_names_its_place_in_the_list(item: object, expected_line: str) -> None:
    assert problem_lines(as_list(TENANT, item, PROFILE)) == [expected_line]


@pytest.mark.parametrize(
    ("item", "what"),
    [
        ({"id": "cpu-0", "kind": "cpu", "backend": "cpu", "memoryTotal": 2**30}, "a device"),
        ({"id": "retail/shelf/0", "state": "Ready", "tenant": "retail"}, "a slice"),
    ],
)
def test_devices_and_slices_are_said_to_be_status_not_objects(item: object, what: str) -> None:
    advice = (
        f"this is {what} as 'gpuvisor get' prints it: what the node reports, not an object to "
        "apply (apply Tenant, Profile, Pool, Model or Deployment manifests)"
    )
    assert problem_lines(yaml.safe_dump({"items": [item]})) == [f"all.yaml doc 1 item 1: {advice}"]
    assert problem_lines(yaml.safe_dump(item)) == [f"all.yaml doc 1: {advice}"]


@pytest.mark.parametrize(
    ("text", "expected_lines"),
    [
        (
            "apiVersion: v1\nkind: List\nitems: []\n",
            ["all.yaml doc 1 List: apiVersion: unknown value 'v1'; accepted: gpuvisor/v1"],
        ),
        (
            HEADER + "kind: List\nmetadata: {name: x}\nitems: []\n",
            [
                "all.yaml doc 1 List: metadata: unknown field 'metadata' "
                "(accepted fields: apiVersion, kind, items)"
            ],
        ),
        (
            HEADER + "kind: List\nitems: {kind: Tenant}\n",
            ["all.yaml doc 1 List: items: expected a list of objects, got a mapping"],
        ),
        (
            HEADER + "kind: List\n",
            ["all.yaml doc 1 List: items: required field is missing (the list of objects)"],
        ),
    ],
)
def test_a_malformed_list_says_what_is_wrong_with_it(text: str, expected_lines: list[str]) -> None:
    assert problem_lines(text) == expected_lines


def test_every_problem_of_every_item_is_reported_with_its_place() -> None:
    text = HEADER + "kind: Tenant\nmetadata: {name: t}\n---\n"
    text += as_list(TENANT, {**TENANT, "kind": "Widget"}, {**PROFILE, "spec": {"memory": 0}})
    with pytest.raises(SpecError) as info:
        load_documents(text, "all.yaml")
    problems = info.value.fields["problems"]
    assert [(p["doc"], p.get("item"), p["path"]) for p in problems] == [
        (2, 2, "kind"),
        (2, 3, "spec.memory"),
    ]
    assert problems[1] == {
        "source": "all.yaml",
        "doc": 2,
        "item": 3,
        "kind": "Profile",
        "name": "p",
        "path": "spec.memory",
        "message": "must be greater than 0 (got 0)",
    }


def test_a_dangling_reference_in_a_list_names_the_item() -> None:
    deployment = {
        "apiVersion": "gpuvisor/v1",
        "kind": "Deployment",
        "metadata": {"name": "shelf", "tenant": "retail"},
        "spec": {"model": "m", "profile": "rt-smal"},
    }
    new = load_documents(as_list(deployment), "all.yaml")
    existing = [
        Tenant(metadata=Metadata(name="retail")),
        Profile(metadata=Metadata(name="rt-small"), spec=ProfileSpec(memory=2**30)),
    ]
    with pytest.raises(SpecError) as info:
        validate_references(new, existing)
    lines = info.value.message.splitlines()
    assert lines[0] == (
        "all.yaml doc 1 item 1 Deployment/shelf: spec.profile: unknown profile 'rt-smal' "
        "(did you mean 'rt-small'?)"
    )
    assert info.value.fields["problems"][0]["item"] == 1
