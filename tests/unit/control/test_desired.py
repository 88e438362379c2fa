"""Desired state: every replica the store asks for, resolved, with a reason when it cannot be."""

from __future__ import annotations

from gpuvisor.control.desired import desired_slices
from gpuvisor.spec.loader import load_documents

MANIFEST = """
apiVersion: gpuvisor/v1
kind: Tenant
metadata: {name: retail}
---
apiVersion: gpuvisor/v1
kind: Profile
metadata: {name: rt}
spec: {memory: 1Gi, computeShare: 0.25, latencyClass: critical}
---
apiVersion: gpuvisor/v1
kind: Model
metadata: {name: m, tenant: retail}
spec: {version: "2", source: /models/m2.onnx}
---
apiVersion: gpuvisor/v1
kind: Model
metadata: {name: m, tenant: retail}
spec: {version: "10", source: /models/m10.onnx}
---
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {name: d, tenant: retail}
spec: {model: m, profile: rt, replicas: 3}
"""


def test_replicas_resolve_to_the_highest_model_version() -> None:
    slices = desired_slices(load_documents(MANIFEST), unloaded=set())
    assert [s.slice_id for s in slices] == ["retail/d/0", "retail/d/1", "retail/d/2"]
    assert {s.model.spec.version for s in slices if s.model} == {"10"}
    assert all(not s.problem for s in slices)
    assert len({s.spec_hash for s in slices}) == 1


def test_unloaded_deployments_have_no_replicas() -> None:
    assert desired_slices(load_documents(MANIFEST), unloaded={("retail", "d")}) == []


def test_spec_hash_changes_with_the_profile() -> None:
    before = desired_slices(load_documents(MANIFEST), set())[0].spec_hash
    after = desired_slices(load_documents(MANIFEST.replace("memory: 1Gi", "memory: 2Gi")), set())[
        0
    ].spec_hash
    assert before != after


def test_applying_the_implicit_default_pool_as_it_is_changes_no_replica() -> None:
    """A saved `get pools` listing applied again stores the implicit pool `default` with its
    settings: the same spec, so nothing restarts. Other settings are a change."""
    implicit = desired_slices(load_documents(MANIFEST), set())[0].spec_hash
    pool = "apiVersion: gpuvisor/v1\nkind: Pool\nmetadata: {name: default}\n"
    applied = load_documents(MANIFEST + "---\n" + pool + "spec: {}\n")
    assert desired_slices(applied, set())[0].spec_hash == implicit
    spread = load_documents(MANIFEST + "---\n" + pool + "spec: {placement: spread}\n")
    assert desired_slices(spread, set())[0].spec_hash != implicit


def test_pinning_the_version_a_deployment_already_serves_changes_no_replica() -> None:
    unpinned = desired_slices(load_documents(MANIFEST), set())[0].spec_hash
    pinned = load_documents(MANIFEST.replace("spec: {model: m,", "spec: {model: m@10,"))
    assert desired_slices(pinned, set())[0].spec_hash == unpinned
    older = load_documents(MANIFEST.replace("spec: {model: m,", "spec: {model: m@2,"))
    assert desired_slices(older, set())[0].spec_hash != unpinned


def test_missing_model_is_a_reason_not_a_crash() -> None:
    docs = [d for d in load_documents(MANIFEST) if d.kind != "Model"]
    slices = desired_slices(docs, set())
    assert slices and all("model 'm' not found in tenant 'retail'" in s.problem for s in slices)


def test_a_slice_of_a_dedicated_pool_tells_placement_so() -> None:
    """Another tenant's slice from another pool must not land on its device: placement sees
    the slices already placed as dedicated or not."""
    from gpuvisor.control.launch import new_instance, placement_snapshot
    from gpuvisor.inventory.cpu import discover_cpu

    dedicated = MANIFEST.replace(
        "spec: {model: m, profile: rt, replicas: 3}",
        "spec: {model: m, profile: rt, replicas: 1, pool: mine}",
    ) + (
        "---\napiVersion: gpuvisor/v1\nkind: Pool\nmetadata: {name: mine}\n"
        "spec: {tenancy: dedicated}\n"
    )
    for text, expected in ((dedicated, True), (MANIFEST, False)):
        want = desired_slices(load_documents(text), unloaded=set())[0]
        state = new_instance(want, want.slice_id)
        state.device_id, state.state = "cpu-0", "Ready"
        [placed] = (
            placement_snapshot([discover_cpu(memory=4 << 30)], [state], "").get("cpu-0").slices
        )
        assert (state.dedicated, placed.dedicated) == (expected, expected)


def test_a_slice_on_a_gpu_has_its_worker_pinned_to_that_gpu_by_uuid() -> None:
    """NVML's index is CUDA's only under PCI bus order and with no CUDA_VISIBLE_DEVICES of the
    node's own: the worker sees its GPU alone, by UUID, as cuda:0."""
    from gpuvisor.control.launch import new_instance, slice_launch
    from gpuvisor.inventory.cpu import discover_cpu
    from gpuvisor.inventory.device import Device

    want = desired_slices(load_documents(MANIFEST), unloaded=set())[0]
    assert want.model is not None
    state = new_instance(want, want.slice_id)
    gpu = Device("gpu-3", "gpu", "nvml", "H100-80GB", 80 << 30, uuid="GPU-abcd", index=3)
    launch = slice_launch(state, want.model, want.deployment, gpu, batch_nice=10)
    assert (launch.gpu_uuid, launch.load.device_kind, launch.load.device_index) == (
        "GPU-abcd",
        "cuda",
        0,
    )
    # NVML could not tell its UUID: the index is all there is
    unknown = Device("gpu-3", "gpu", "nvml", "H100-80GB", 80 << 30, index=3)
    launch = slice_launch(state, want.model, want.deployment, unknown, batch_nice=10)
    assert (launch.gpu_uuid, launch.load.device_index) == (None, 3)
    launch = slice_launch(state, want.model, want.deployment, discover_cpu(4 << 30), 10)
    assert (launch.gpu_uuid, launch.load.device_kind) == (None, "cpu")
