"""The kinds of the declarative API: parsing, defaults, cross-field rules, identity."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from pydantic import TypeAdapter, ValidationError

from gpuvisor.spec.kinds import (
    CLUSTER_SCOPED,
    KIND_MODELS,
    KINDS,
    TENANT_SCOPED,
    Deployment,
    DeploymentSpec,
    Fleet,
    Metadata,
    Model,
    ModelSpec,
    Node,
    Pool,
    Profile,
    ProfileSpec,
    Resource,
    Tenant,
    resource_key,
)

RESOURCE: TypeAdapter[Resource] = TypeAdapter(Resource)
GI, MI = 2**30, 2**20


def parse(text: str) -> Resource:
    return RESOURCE.validate_python(yaml.safe_load(text))


def errors_of(text: str) -> list[dict[str, Any]]:
    with pytest.raises(ValidationError) as info:
        parse(text)
    return [dict(e) for e in info.value.errors()]


def test_every_kind_parses_from_the_realistic_manifest(manifest: str) -> None:
    resources = [RESOURCE.validate_python(doc) for doc in yaml.safe_load_all(manifest)]
    by_name = {(r.kind, r.metadata.name): r for r in resources}
    assert {r.kind for r in resources} == set(KINDS)

    tenant = by_name["Tenant", "retail"]
    assert isinstance(tenant, Tenant)
    assert tenant.metadata.labels == {"team": "stores"}
    assert (tenant.spec.weight, tenant.spec.pools) == (2.0, ["inference"])
    quota = tenant.spec.quota
    assert (quota.memory, quota.compute, quota.deployments) == (8 * GI, 1.5, 10)
    assert (quota.requests_per_second, quota.max_queued) == (500.0, 1000)

    profile = by_name["Profile", "rt-small"]
    assert isinstance(profile, Profile)
    assert profile.spec.memory == GI
    assert (profile.spec.compute_share, profile.spec.latency_class) == (0.25, "critical")
    mig = by_name["Profile", "mig-1g"]
    assert isinstance(mig, Profile)
    assert (mig.spec.isolation, mig.spec.mig_profile) == ("partition", "1g.10gb")

    pool = by_name["Pool", "inference"]
    assert isinstance(pool, Pool)
    assert pool.spec.selector == {"kind": "gpu", "model": "H100*"}
    assert (pool.spec.scheduler, pool.spec.require_signed_models) == ("fixed-share", True)
    assert pool.spec.trusted_keys == ["ed25519:AAAAC3NzaC1lZDI1NTE5"]

    model = by_name["Model", "shelf-detector"]
    assert isinstance(model, Model)
    assert (model.spec.version, model.spec.max_batch_size) == ("3", 32)
    assert model.spec.inputs is not None and model.spec.outputs is not None
    assert model.spec.inputs[0].shape == [-1, 3, 32, 32]
    assert model.spec.outputs[0].datatype == "FP32"

    deployment = by_name["Deployment", "shelf-detector"]
    assert isinstance(deployment, Deployment)
    spec = deployment.spec
    assert (spec.model_name, spec.model_version, spec.replicas) == ("shelf-detector", "3", 2)
    assert spec.batching.max_batch_size == 16
    assert spec.batching.max_queue_delay == pytest.approx(0.002)
    assert spec.slo.latency == pytest.approx(0.05)
    assert (spec.placement.numa, spec.placement.anti_affinity) == ("local", True)
    assert spec.placement.disallow_migration is True

    fleet = by_name["Fleet", "lab"]
    assert isinstance(fleet, Fleet)
    node = fleet.spec.nodes[0]
    assert (node.name, node.numa_nodes, len(node.devices)) == ("edge-1", 2, 2)
    assert (node.devices[0].count, node.devices[0].numa, node.devices[0].mig.enabled) == (
        2,
        1,
        True,
    )
    assert (node.devices[1].count, node.devices[1].numa, node.devices[1].mig.enabled) == (
        1,
        0,
        False,
    )

    config = by_name["Node", "edge-1"]
    assert isinstance(config, Node)
    node_spec = config.spec
    assert node_spec.cluster == "store-42"
    assert (node_spec.cpu.enabled, node_spec.cpu.memory, node_spec.cpu.threads) == (
        "auto",
        4 * GI,
        4,
    )
    assert node_spec.cpu.quantum == pytest.approx(0.01)
    assert node_spec.nvml.enabled is False
    assert node_spec.limits.max_body_size == 16 * MI
    assert node_spec.workers.restart_backoff == pytest.approx(0.25)
    assert node_spec.reconcile_period == pytest.approx(0.5)


def test_defaults_match_the_contract() -> None:
    tenant = parse("{apiVersion: gpuvisor/v1, kind: Tenant, metadata: {name: t}}")
    assert isinstance(tenant, Tenant)
    assert (tenant.spec.weight, tenant.spec.pools, tenant.spec.quota.memory) == (1.0, [], None)
    assert tenant.metadata.labels == {} and tenant.metadata.tenant is None

    profile = parse("{kind: Profile, metadata: {name: p}, spec: {memory: 512Mi}}")
    assert isinstance(profile, Profile)
    assert profile.api_version == "gpuvisor/v1"
    assert (profile.spec.compute_share, profile.spec.isolation) == (0.0, "process")
    assert (profile.spec.latency_class, profile.spec.mig_profile) == ("standard", None)

    pool = parse("{kind: Pool, metadata: {name: p}}")
    assert isinstance(pool, Pool)
    assert (pool.spec.selector, pool.spec.tenancy, pool.spec.scheduler) == (
        {},
        "shared",
        "best-effort",
    )
    assert (pool.spec.require_signed_models, pool.spec.trusted_keys) == (False, [])

    model = parse("{kind: Model, metadata: {name: m, tenant: t}, spec: {source: m.onnx}}")
    assert isinstance(model, Model)
    assert (model.spec.version, model.spec.format, model.spec.max_batch_size) == ("1", "onnx", 0)
    assert (model.spec.sha256, model.spec.signature, model.spec.inputs) == (None, None, None)

    deployment = parse(
        "{kind: Deployment, metadata: {name: d, tenant: t}, spec: {model: m, profile: p}}"
    )
    assert isinstance(deployment, Deployment)
    spec = deployment.spec
    assert (spec.pool, spec.replicas, spec.batching.max_batch_size) == ("default", 1, 8)
    assert (spec.batching.max_queue_delay, spec.slo.latency) == (0.0, None)
    assert (spec.placement.numa, spec.placement.anti_affinity) == ("any", False)
    assert spec.placement.disallow_migration is False

    node = parse("{kind: Node, metadata: {name: n}}")
    assert isinstance(node, Node)
    ns = node.spec
    assert (ns.cluster, ns.cpu.enabled, ns.cpu.memory, ns.cpu.threads) == (
        "local",
        "auto",
        None,
        None,
    )
    assert (ns.cpu.concurrency, ns.cpu.quantum, ns.nvml.enabled, ns.fleet) == (
        1,
        None,
        "auto",
        None,
    )
    assert ns.limits.max_body_size == 64 * MI
    assert (ns.workers.start_timeout, ns.workers.restart_backoff) == (120.0, 0.5)
    assert (ns.workers.restart_backoff_max, ns.reconcile_period) == (30.0, 2.0)


def test_kinds_build_from_python_with_snake_case_names() -> None:
    deployment = Deployment(
        metadata=Metadata(name="shelf", tenant="retail"),
        spec=DeploymentSpec(model="shelf@2", profile="rt-small", replicas=3),
    )
    assert deployment.spec.replicas == 3 and deployment.spec.pool == "default"
    assert deployment.kind == "Deployment" and deployment.api_version == "gpuvisor/v1"
    profile = Profile(metadata=Metadata(name="p"), spec=ProfileSpec(memory=GI, compute_share=0.5))
    assert profile.model_dump(by_alias=True)["spec"]["computeShare"] == 0.5


@pytest.mark.parametrize(
    ("reference", "name", "version"),
    [
        ("shelf-detector", "shelf-detector", None),
        ("shelf-detector@3", "shelf-detector", "3"),
        ("m@2024.06-rc1", "m", "2024.06-rc1"),
    ],
)
def test_deployment_model_reference_splits_name_and_version(
    reference: str, name: str, version: str | None
) -> None:
    spec = DeploymentSpec(model=reference, profile="p")
    assert (spec.model_name, spec.model_version) == (name, version)


@pytest.mark.parametrize("reference", ["Shelf", "shelf@", "@3", "a@b@c", "shelf detector"])
def test_deployment_refuses_malformed_model_references(reference: str) -> None:
    with pytest.raises(ValidationError, match=r"write 'name' .* or 'name@version'"):
        DeploymentSpec(model=reference, profile="p")


SCOPE_CASES = [
    (
        "{kind: Deployment, metadata: {name: d}, spec: {model: m, profile: p}}",
        "belongs to a tenant",
    ),
    ("{kind: Model, metadata: {name: m}, spec: {source: m.onnx}}", "belongs to a tenant"),
    ("{kind: Profile, metadata: {name: p, tenant: t}, spec: {memory: 1Gi}}", "cluster-scoped"),
    ("{kind: Tenant, metadata: {name: p, tenant: t}}", "cluster-scoped"),
    ("{kind: Pool, metadata: {name: p, tenant: t}}", "cluster-scoped"),
    ("{kind: Node, metadata: {name: p, tenant: t}}", "cluster-scoped"),
]


@pytest.mark.parametrize(("text", "fragment"), SCOPE_CASES)
def test_tenant_scope_rules(text: str, fragment: str) -> None:
    (error,) = errors_of(text)
    assert error["type"] == "invalid_field"
    assert error["ctx"]["field"] == "tenant"
    assert error["loc"][1:] == ("metadata",)
    assert fragment in error["msg"]


def test_package_exports_the_public_api() -> None:
    import gpuvisor.spec as spec
    from gpuvisor.spec import fleet_nodes, kinds, loader, node_settings, types

    for module in (kinds, loader, fleet_nodes, node_settings):
        assert set(module.__all__) <= set(spec.__all__), module.__name__
    public_types = {"Size", "Duration", "DnsLabel", "AutoFlag", "ModelVersion", "Sha256Digest"}
    assert public_types <= set(spec.__all__) & set(types.__all__)
    assert all(hasattr(spec, name) for name in spec.__all__)


def test_scope_sets_partition_the_kinds() -> None:
    assert set(KINDS) == CLUSTER_SCOPED | TENANT_SCOPED
    assert not CLUSTER_SCOPED & TENANT_SCOPED
    assert {"Model", "Deployment"} == TENANT_SCOPED
    assert set(KIND_MODELS) == set(KINDS)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("{memory: 1Gi, isolation: partition}", "needs a MIG profile"),
        ("{memory: 1Gi, isolation: process, migProfile: 1g.10gb}", "only used with isolation"),
        ("{memory: 0}", "greater than 0"),
        ("{memory: 1Gi, computeShare: 1.5}", "less than or equal to 1"),
        (
            "{memory: 70Gi, isolation: partition, migProfile: 1g.10gb}",
            "memory 70Gi is more than a 1g.10gb MIG instance holds (10 GB)",
        ),
        (  # MIG profile names are read in any case (as placement reads them)
            "{memory: 500Gi, isolation: partition, migProfile: 1G.10GB}",
            "memory 500Gi is more than a 1G.10GB MIG instance holds (10 GB)",
        ),
        # a share too small to schedule by (it underflowed the dispatcher's arithmetic)
        ("{memory: 1Gi, computeShare: 5e-324}", "0 (no guarantee) or at least 0.001"),
        ("{memory: 1Gi, computeShare: 0.0005}", "0 (no guarantee) or at least 0.001"),
        ("{memory: 1Gi, isolation: vm}", "'shared', 'process', 'partition' or 'exclusive'"),
    ],
)
def test_profile_rules(spec: str, fragment: str) -> None:
    errors = errors_of(f"{{kind: Profile, metadata: {{name: p}}, spec: {spec}}}")
    assert any(fragment in e["msg"] for e in errors), errors


def test_profile_mig_error_names_the_mig_profile_field() -> None:
    (error,) = errors_of(
        "{kind: Profile, metadata: {name: p}, spec: {memory: 1Gi, isolation: partition}}"
    )
    assert error["ctx"]["field"] == "migProfile"


def test_pool_selector_refuses_unknown_device_labels() -> None:
    (error,) = errors_of("{kind: Pool, metadata: {name: p}, spec: {selector: {gpu: H100}}}")
    assert "unknown device label 'gpu'" in error["msg"]
    assert "kind, backend, model, id, node" in error["msg"]
    (typo,) = errors_of("{kind: Pool, metadata: {name: p}, spec: {selector: {knd: gpu}}}")
    assert "unknown device label 'knd' (did you mean 'kind'? accepted:" in typo["msg"]


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("{nodes: []}", "at least 1 item"),
        (
            "{nodes: [{name: a, numaNodes: 1, devices: [{model: L4, numa: 1}]}]}",
            "NUMA node 1 does not exist",
        ),
        ("{nodes: [{name: a}, {name: a}]}", "listed twice"),
        ("{nodes: [{name: a, devices: [{model: L4, count: 0}]}]}", "greater than or equal to 1"),
        # a group of a node's GPUs: no server holds a million (which took a minute to plan)
        (
            "{nodes: [{name: a, devices: [{model: L4, count: 1000000}]}]}",
            "less than or equal to 64",
        ),
    ],
)
def test_fleet_rules(spec: str, fragment: str) -> None:
    errors = errors_of(f"{{kind: Fleet, metadata: {{name: f}}, spec: {spec}}}")
    assert any(fragment in e["msg"] for e in errors), errors


def test_node_worker_backoff_must_be_ordered() -> None:
    (error,) = errors_of(
        "{kind: Node, metadata: {name: n}, spec: {workers: {restartBackoff: 5s, restartBackoffMax: 1s}}}"
    )
    assert error["ctx"]["field"] == "restartBackoffMax"
    (error,) = errors_of(
        "{kind: Node, metadata: {name: n}, spec: {workers: {outOfMemoryRetryMax: 10s}}}"
    )
    assert error["ctx"]["field"] == "outOfMemoryRetryMax"
    assert "at least outOfMemoryRetry (30s)" in error["msg"]


def test_node_out_of_memory_retry_defaults_and_units() -> None:
    node = parse("{kind: Node, metadata: {name: n}, spec: {}}")
    workers = node.spec.workers  # type: ignore[attr-defined]
    assert (workers.out_of_memory_retry, workers.out_of_memory_retry_max) == (30.0, 600.0)
    node = parse(
        "{kind: Node, metadata: {name: n}, "
        "spec: {workers: {outOfMemoryRetry: 500ms, outOfMemoryRetryMax: 2m}}}"
    )
    workers = node.spec.workers  # type: ignore[attr-defined]
    assert (workers.out_of_memory_retry, workers.out_of_memory_retry_max) == (0.5, 120.0)
    (error,) = errors_of(
        "{kind: Node, metadata: {name: n}, spec: {workers: {outOfMemoryRetry: 0s}}}"
    )
    assert error["loc"][-1] in ("outOfMemoryRetry", "out_of_memory_retry")


def test_node_batch_nice_defaults_to_10_and_stays_within_the_os_range() -> None:
    node = parse("{kind: Node, metadata: {name: n}, spec: {}}")
    assert node.spec.workers.batch_nice == 10  # type: ignore[attr-defined]
    off = parse("{kind: Node, metadata: {name: n}, spec: {workers: {batchNice: 0}}}")
    assert off.spec.workers.batch_nice == 0  # type: ignore[attr-defined]
    for bad in ("20", "-1"):
        (error,) = errors_of(
            f"{{kind: Node, metadata: {{name: n}}, spec: {{workers: {{batchNice: {bad}}}}}}}"
        )
        assert error["loc"][-1] == "batchNice", error


def test_model_spec_reads_integer_versions_and_lowers_digests() -> None:
    spec = ModelSpec.model_validate({"version": 7, "source": "m.onnx", "sha256": "A" * 64})
    assert (spec.version, spec.sha256) == ("7", "a" * 64)


@pytest.mark.parametrize(
    ("tensor", "fragment"),
    [
        ({"name": "x", "datatype": "FP33", "shape": [1]}, "FP32"),
        ({"name": "x", "datatype": "FP32", "shape": [-2]}, "greater than or equal to -1"),
        ({"name": "", "datatype": "FP32", "shape": [1]}, "at least 1 character"),
    ],
)
def test_tensor_specs_are_checked(tensor: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        ModelSpec.model_validate({"source": "m.onnx", "inputs": [tensor]})


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (
            "{kind: Model, metadata: {name: m, tenant: t}, spec: {version: 2, source: x}}",
            ("Model", "t", "m@2"),
        ),
        (
            "{kind: Deployment, metadata: {name: d, tenant: t}, spec: {model: m, profile: p}}",
            ("Deployment", "t", "d"),
        ),
        ("{kind: Profile, metadata: {name: p}, spec: {memory: 1Gi}}", ("Profile", "", "p")),
        ("{kind: Tenant, metadata: {name: t}}", ("Tenant", "", "t")),
    ],
)
def test_resource_key(text: str, key: tuple[str, str, str]) -> None:
    assert resource_key(parse(text)) == key
