"""Fleet planning: existing instances first, then free offsets, then blank MIG GPUs on as few
GPUs as possible; other tiers on whole GPUs; pending replicas with reasons and a defrag plan."""

from __future__ import annotations

import pytest

from gpuvisor.errors import SpecError
from gpuvisor.inventory.device import Device
from gpuvisor.partition.fleet import Workload, plan_fleet
from gpuvisor.partition.mig import GEOMETRIES, MigInstance, check_layout
from gpuvisor.partition.report import plan_summary, plan_to_dict
from gpuvisor.partition.workloads import workloads_from
from gpuvisor.spec.loader import load_documents

GI = 2**30
H100 = GEOMETRIES["H100-80GB"]


def gpu(
    i: int, mig: bool = True, layout: tuple[tuple[int, str], ...] = (), model: str = "H100-80GB"
) -> Device:
    return Device(
        f"n/gpu-{i}",
        "gpu",
        "simulated",
        model,
        80 * GI,
        node="n",
        index=i,
        mig_mode=mig,
        mig_instances=tuple(MigInstance(s, p) for s, p in layout),
    )


def mig(name: str, profile: str, replicas: int, tenant: str = "t", **kw: object) -> Workload:
    return Workload(tenant, name, replicas, "partition", 10 * GI, mig_profile=profile, **kw)  # type: ignore[arg-type]


def test_existing_instances_are_used_before_any_is_added() -> None:
    devices = [gpu(0, layout=((0, "3g.40gb"), (4, "3g.40gb"))), gpu(1)]
    plan = plan_fleet(devices, [mig("a", "3g.40gb", 2)])
    assert plan.pending == []
    first, blank = plan.gpus
    assert sorted(first.holders) == [0, 4] and not first.added
    assert blank.instances == [] and blank.holders == {}


def test_free_offsets_are_filled_before_blank_gpus_are_laid_out() -> None:
    devices = [gpu(0, layout=((0, "4g.40gb"),)), gpu(1)]
    plan = plan_fleet(devices, [mig("a", "1g.10gb", 3)])
    first, blank = plan.gpus
    assert [i.profile for i in first.instances] == ["4g.40gb", "1g.10gb", "1g.10gb", "1g.10gb"]
    assert first.added == {4, 5, 6} and set(first.holders) == {4, 5, 6}
    assert blank.instances == []
    assert check_layout(H100, first.instances) == []


def test_a_gpu_one_pool_laid_out_takes_another_pools_replicas_at_its_free_offsets() -> None:
    """Two pools select the same blank GPU: the second's replica goes beside the first's,
    not Pending with a reason that says it fits there."""
    first = mig("a", "3g.40gb", 1, tenant="t1", pool="all")
    second = mig("b", "3g.40gb", 1, tenant="t2", selector=(("model", "H100*"),), pool="h100")
    plan = plan_fleet([gpu(0)], [first, second])
    assert plan.pending == []
    [laid_out] = plan.gpus
    assert sorted((i.start, i.profile) for i in laid_out.instances) == [
        (0, "3g.40gb"),
        (4, "3g.40gb"),
    ]
    assert check_layout(H100, laid_out.instances) == []


def test_blank_gpus_are_laid_out_on_as_few_gpus_as_possible() -> None:
    devices = [gpu(i) for i in range(4)]
    plan = plan_fleet(devices, [mig("big", "4g.40gb", 2), mig("mid", "3g.40gb", 2)])
    used = [g for g in plan.gpus if g.instances]
    assert len(used) == 2 and plan.pending == []
    for g in used:
        assert sorted(i.profile for i in g.instances) == ["3g.40gb", "4g.40gb"]
        assert g.added == {0, 4} and check_layout(H100, g.instances) == []


def test_existing_only_adds_nothing_and_explains_why() -> None:
    devices = [gpu(0, layout=((0, "4g.40gb"),)), gpu(1, mig=False)]
    plan = plan_fleet(devices, [mig("a", "1g.10gb", 1)], existing_only=True)
    assert plan.gpus[0].added == set()
    (pending,) = plan.pending
    assert pending.replicas == 1
    assert pending.reasons == (
        "n/gpu-0: the MIG layout has no 1g.10gb instance; one more fits at offset 4: create it "
        "(gpuvisor plan exports the layout for nvidia-mig-parted)",
        "n/gpu-1: MIG is not enabled on this GPU: isolation 'partition' needs a MIG instance",
    )


def test_pending_partition_replicas_get_a_defragmentation_plan() -> None:
    devices = [
        gpu(0, layout=((2, "1g.10gb"), (5, "1g.10gb"))),
        gpu(1, layout=((0, "4g.40gb"), (4, "3g.40gb"))),
    ]
    workloads = [mig("small", "1g.10gb", 2, disallow_migration=True), mig("wide", "3g.40gb", 2)]
    plan = plan_fleet(devices, workloads, existing_only=True)
    (pending,) = plan.pending
    assert pending.workload.deployment == "wide" and pending.replicas == 1
    assert "n/gpu-0: 3g.40gb needs slices 0–3 or 4–7 free; slices 2, 5 are taken" in pending.reasons
    assert pending.defrag == ""  # both blockers hold disallowMigration slices
    plan = plan_fleet(devices, [mig("small", "1g.10gb", 2), workloads[1]], existing_only=True)
    assert "then 3g.40gb fits n/gpu-0" in plan.pending[0].defrag


def test_whole_gpu_tiers_pack_by_memory_and_shares() -> None:
    devices = [gpu(0, mig=False), gpu(1, mig=False), gpu(2)]
    workloads = [
        Workload("t", "small", 6, "process", 10 * GI, compute_share=0.2),
        Workload("t", "solo", 1, "exclusive", 1 * GI),
    ]
    plan = plan_fleet(devices, workloads)
    solo = next(g for g in plan.gpus if any(h.workload.deployment == "solo" for h in g.slices))
    assert len(solo.slices) == 1
    other = next(g for g in plan.gpus if g is not solo and not g.device.mig_mode)
    assert len(other.slices) == 5  # compute shares cap it at 5 × 0.2
    (pending,) = plan.pending
    assert pending.replicas == 1
    assert any("compute shares would sum to 1.20 > 1" in r for r in pending.reasons)
    assert any("held exclusively by another slice" in r for r in pending.reasons)
    assert any("MIG is enabled on this GPU" in r for r in pending.reasons)


def test_dedicated_pools_keep_tenants_apart_on_mig_gpus() -> None:
    devices = [gpu(0), gpu(1)]
    workloads = [
        mig("a", "3g.40gb", 1, tenant="retail", tenancy="dedicated"),
        mig("b", "3g.40gb", 1, tenant="support", tenancy="dedicated"),
    ]
    plan = plan_fleet(devices, workloads)
    assert plan.pending == []
    tenants = [{h.workload.tenant for h in g.holders.values()} for g in plan.gpus]
    assert sorted(map(sorted, tenants)) == [["retail"], ["support"]]


def test_a_dedicated_gpu_takes_no_other_tenant_from_a_shared_pool() -> None:
    devices = [gpu(0, mig=False)]
    workloads = [
        Workload("retail", "own", 1, "process", 10 * GI, compute_share=0.2, tenancy="dedicated"),
        Workload("support", "shared", 1, "process", 10 * GI, compute_share=0.2),
    ]
    plan = plan_fleet(devices, workloads)
    assert [{h.workload.tenant for h in g.slices} for g in plan.gpus] == [{"retail"}]
    (pending,) = plan.pending
    assert pending.workload.deployment == "shared"
    assert any(
        "another tenant holds this device through a dedicated pool" in r for r in pending.reasons
    )


def test_pools_select_devices_and_many_devices_share_one_reason_line() -> None:
    devices = [gpu(i, model="A100-40GB") for i in range(5)] + [gpu(5)]
    workload = mig("a", "3g.40gb", 1, selector=(("model", "H100*"),), pool="h100")
    plan = plan_fleet(devices, [workload], existing_only=True)
    assert plan.pending[0].reasons[0] == (
        "n/gpu-0, n/gpu-1, n/gpu-2, … (5 GPUs): not in pool 'h100'"
    )


def test_the_report_has_the_documented_shape() -> None:
    devices = [
        gpu(0, layout=((0, "3g.40gb"), (4, "1g.10gb"), (5, "1g.10gb"), (6, "1g.10gb"))),
        gpu(1, mig=False),
    ]
    workloads = [
        mig("a", "1g.10gb", 2),
        mig("b", "4g.40gb", 1),
        Workload("t", "p", 2, "process", 4 * GI),
    ]
    plan = plan_fleet(devices, workloads, existing_only=True)
    data = plan_to_dict(plan)
    assert set(data) == {"gpus", "pending", "summary"}
    first = data["gpus"][0]
    assert {"node", "id", "model", "instances"} <= set(first)
    assert first["instances"][1] == {
        "profile": "1g.10gb",
        "start": 4,
        "size": 1,
        "deployment": "a",
        "tenant": "t",
        "replica": 0,
        "new": False,
    }
    assert first["instances"][0]["deployment"] is None  # the 3g.40gb holds nothing
    assert first["unusableSlices"] == [7]
    assert data["pending"] == [
        {
            "deployment": "b",
            "tenant": "t",
            "replicas": 1,
            "reasons": data["pending"][0]["reasons"],
            "defrag": None,
        }
    ]
    summary = plan_summary(plan)
    assert (summary["migSlicesUsed"], summary["migSlices"]) == (7, 8)
    assert (summary["unusableMigSlices"], summary["freeMigSlices"]) == (1, 1)
    assert (summary["slicesPlaced"], summary["slicesPending"]) == (4, 1)
    assert summary["wholeGpuMemoryUsed"] == 8 * GI


MANIFESTS = """
apiVersion: gpuvisor/v1
kind: Profile
metadata: {name: mig-small}
spec: {memory: 10Gi, isolation: partition, migProfile: 1g.10gb}
---
apiVersion: gpuvisor/v1
kind: Pool
metadata: {name: h100}
spec: {selector: {model: "H100*"}, tenancy: dedicated, memoryHeadroom: 2Gi}
---
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {name: shelf, tenant: retail}
spec: {model: shelf, profile: mig-small, pool: h100, replicas: 3, placement: {disallowMigration: true}}
"""


def test_manifests_become_workloads() -> None:
    (workload,) = workloads_from(load_documents(MANIFESTS, "apps.yaml"))
    assert workload == Workload(
        "retail",
        "shelf",
        3,
        "partition",
        10 * GI,
        0.0,
        "1g.10gb",
        "h100",
        (("model", "H100*"),),
        "dedicated",
        True,
        2 * GI,
    )


def test_unknown_profiles_and_pools_are_named() -> None:
    text = MANIFESTS.replace("profile: mig-small", "profile: mig-smal").replace(
        "pool: h100", "pool: h200"
    )
    with pytest.raises(SpecError) as caught:
        workloads_from(load_documents(text, "apps.yaml"))
    assert caught.value.message.splitlines() == [
        "apps.yaml doc 3 Deployment/shelf: spec.profile: unknown profile 'mig-smal' (did you mean 'mig-small'?)",
        "apps.yaml doc 3 Deployment/shelf: spec.pool: unknown pool 'h200' (did you mean 'h100'?)",
    ]


def test_a_pools_memory_headroom_is_kept_free_as_on_a_node() -> None:
    """Two 20Gi replicas on a 48Gi GPU whose pool keeps 10Gi free: one fits, as the node's
    placement would have it, and the other waits with the node's reason."""
    l40 = Device("n/gpu-0", "gpu", "simulated", "L40S", 48 * GI, node="n", index=0)
    workload = Workload("t", "big", 2, "process", 20 * GI, 0.1, memory_headroom=10 * GI)
    plan = plan_fleet([l40], [workload])
    assert [len(g.slices) for g in plan.gpus] == [1]
    (pending,) = plan.pending
    assert any("(10Gi headroom kept)" in r for r in pending.reasons), pending.reasons


def test_no_requested_profile_means_no_fragmentation_to_measure() -> None:
    """A fleet with a MIG layout but only whole-GPU deployments: its free slices fit no
    requested profile because none is requested, which is not fragmentation."""
    devices = [gpu(0, layout=((0, "3g.40gb"),)), gpu(1, mig=False)]
    plan = plan_fleet(devices, [Workload("t", "w", 1, "process", 10 * GI, 0.2)])
    summary = plan_summary(plan)
    assert (summary["unusableMigSlices"], summary["fragmentation"]) == (0, 0.0)
