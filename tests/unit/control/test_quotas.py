"""Tenant quotas at apply: memory, compute and deployment count over the desired state after
the apply, refused whole with the numbers, never refusing a scale-down."""

from __future__ import annotations

import pytest

from gpuvisor.control.quotas import check_quotas, tenant_usage
from gpuvisor.errors import Forbidden, QuotaExceeded, error_from_code
from gpuvisor.spec.kinds import Resource
from gpuvisor.spec.loader import load_documents

GI = 2**30


def tenant(name: str = "retail", quota: str = "{}") -> str:
    return f"kind: Tenant\nmetadata: {{name: {name}}}\nspec: {{quota: {quota}}}\n"


def profile(name: str = "rt-small", memory: str = "1Gi", share: float = 0.25) -> str:
    return f"kind: Profile\nmetadata: {{name: {name}}}\nspec: {{memory: {memory}, computeShare: {share}}}\n"


def model(tenant_name: str = "retail") -> str:
    return f"kind: Model\nmetadata: {{name: m, tenant: {tenant_name}}}\nspec: {{source: /models/m.onnx}}\n"


def deployment(
    name: str, replicas: int, tenant_name: str = "retail", profile_name: str = "rt-small"
) -> str:
    return (
        f"kind: Deployment\nmetadata: {{name: {name}, tenant: {tenant_name}}}\n"
        f"spec: {{model: m, profile: {profile_name}, replicas: {replicas}}}\n"
    )


def docs(*parts: str) -> list[Resource]:
    return load_documents("---\n".join("apiVersion: gpuvisor/v1\n" + p for p in parts))


def stored(quota: str, *deployments: str) -> list[Resource]:
    return docs(tenant(quota=quota), profile(), model(), *deployments)


def refusal(new: list[Resource], existing: list[Resource]) -> QuotaExceeded:
    with pytest.raises(QuotaExceeded) as info:
        check_quotas(new, existing)
    return info.value


def test_memory_over_quota_is_refused_with_limit_usage_and_the_growth() -> None:
    existing = stored("{memory: 4Gi}", deployment("shelf-scanner", 3))
    exc = refusal(docs(deployment("shelf-detector", 2)), existing)
    assert exc.message == (
        "tenant 'retail' quota.memory is 4Gi: its deployments would use 5Gi (currently 3Gi, "
        "+2Gi from shelf-detector ×2 of profile 'rt-small' 1Gi); scale deployments down or "
        "delete some, or raise the Tenant's spec.quota.memory to at least 5Gi"
    )
    assert exc.http_status == 403 and exc.code == "quota_exceeded"
    assert isinstance(exc, Forbidden)
    body = exc.to_dict()
    assert body["tenant"] == "retail" and body["quota"] == "memory"
    assert (body["limit"], body["usage"], body["current"]) == (4 * GI, 5 * GI, 3 * GI)
    assert all(type(body[k]) is int for k in ("limit", "usage", "current"))
    assert body["exceeded"] == 1


@pytest.mark.parametrize(
    ("quota", "memory", "replicas", "least"),
    [
        ("{memory: 4.2Gi}", "256Mi", 17, "4.3Gi"),  # 4.25Gi: one decimal, rounded up
        ("{memory: 4.26Gi}", "4.27Gi", 1, "4373Mi"),  # 4.3Gi would read as the limit
        ("{compute: 0.0044}", "1Mi", 3, "0.0045"),  # 3 × 0.0015, less its float noise
    ],
)
def test_the_amount_to_raise_a_quota_to_is_enough_and_never_reads_as_the_limit(
    quota: str, memory: str, replicas: int, least: str
) -> None:
    existing = docs(tenant(quota=quota), profile(memory=memory, share=0.0015), model())
    parts = [deployment("big", replicas)]
    exc = refusal(docs(*parts), existing)
    assert exc.message.endswith(f"to at least {least}"), exc.message
    field = "memory" if "memory" in quota else "compute"
    raised = tenant(quota=f"{{{field}: {least}}}")
    check_quotas(docs(raised, *parts), existing)  # what it says is enough


def test_compute_over_quota_names_the_scaled_deployment_and_its_old_replicas() -> None:
    existing = stored("{compute: 1.0}", deployment("shelf-detector", 3))
    exc = refusal(docs(deployment("shelf-detector", 5)), existing)
    assert exc.message.startswith(
        "tenant 'retail' quota.compute is 1: its deployments would use 1.25 (currently 0.75, "
        "+0.5 from shelf-detector ×5 of profile 'rt-small' 0.25 "
        "(was shelf-detector ×3 of profile 'rt-small' 0.25)); "
    )
    assert exc.fields["quota"] == "compute"


def test_deployment_count_over_quota_lists_the_new_ones() -> None:
    existing = stored("{deployments: 2}", deployment("a", 1), deployment("b", 1))
    exc = refusal(docs(deployment("c", 0), deployment("d", 1)), existing)
    assert exc.message.startswith(
        "tenant 'retail' quota.deployments is 2: it would have 4 deployments "
        "(currently 2 deployments, +1 from c, +1 from d); "
    )
    # scaling down does not lower the count (c has 0 replicas and counts): only deleting does
    assert exc.message.endswith(
        "; delete some, or raise the Tenant's spec.quota.deployments to at least 4"
    )
    # Re-applying the existing two changes nothing and passes.
    check_quotas(docs(deployment("a", 1), deployment("b", 1)), existing)


def test_usage_exactly_at_the_limit_passes() -> None:
    existing = stored("{memory: 4Gi, compute: 0.3, deployments: 3}")
    parts = [profile("tenth", "1Gi", 0.1)] + [deployment(n, 1, profile_name="tenth") for n in "abc"]
    check_quotas(docs(*parts), existing)  # 0.1 × 3 is not exactly 0.3 in floating point
    assert tenant_usage(docs(*parts), "retail").memory == 3 * GI


def test_whole_apply_is_refused_when_one_tenant_of_several_is_over() -> None:
    existing = docs(
        tenant("retail", "{memory: 2Gi}"),
        tenant("logistics", "{memory: 8Gi}"),
        profile(),
        model("retail"),
        model("logistics"),
    )
    new = docs(deployment("fine", 4, tenant_name="logistics"), deployment("big", 3))
    exc = refusal(new, existing)
    assert exc.message.startswith("tenant 'retail' quota.memory is 2Gi: ")
    assert "logistics" not in exc.message
    assert exc.fields["exceeded"] == 1


def test_every_violation_gets_its_own_line() -> None:
    existing = stored("{memory: 1Gi, compute: 0.25, deployments: 1}")
    exc = refusal(docs(deployment("a", 2), deployment("b", 1)), existing)
    lines = exc.message.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "tenant 'retail' quota.memory is 1Gi",
        "tenant 'retail' quota.compute is 0.25",
        "tenant 'retail' quota.deployments is 1",
    ]
    assert exc.fields["exceeded"] == 3 and exc.fields["quota"] == "memory"


def test_scaling_down_passes_even_for_a_tenant_already_over_its_quota() -> None:
    # Stored before the quota was enforced: 6Gi against a 4Gi quota.
    existing = stored("{memory: 4Gi, deployments: 1}", deployment("a", 4), deployment("b", 2))
    check_quotas(docs(deployment("a", 3)), existing)  # 5Gi: still over, but lower
    check_quotas(docs(deployment("a", 0)), existing)
    # Re-applying the unchanged tenant does not lower its quota, so it passes too.
    check_quotas(docs(tenant(quota="{memory: 4Gi, deployments: 1}")), existing)
    # Growing the over-quota tenant is refused.
    exc = refusal(docs(deployment("a", 5)), existing)
    assert "would use 7Gi (currently 6Gi, +1Gi from a ×5" in exc.message


def test_multi_document_apply_that_adds_and_removes_counts_the_net_result() -> None:
    existing = stored("{memory: 4Gi}", deployment("a", 3))
    # a: 3 -> 1 frees 2Gi, c takes 2Gi: 3Gi in all.
    check_quotas(docs(deployment("a", 1), deployment("c", 2)), existing)
    # a: 3 -> 2 frees 1Gi, c takes 3Gi: 5Gi.
    exc = refusal(docs(deployment("a", 2), deployment("c", 3)), existing)
    assert exc.message.startswith(
        "tenant 'retail' quota.memory is 4Gi: its deployments would use 5Gi (currently 3Gi, "
        "-1Gi from a ×2 of profile 'rt-small' 1Gi (was a ×3 of profile 'rt-small' 1Gi), "
        "+3Gi from c ×3 of profile 'rt-small' 1Gi); "
    )
    # Raising the quota in the same apply makes it fit.
    check_quotas(
        docs(tenant(quota="{memory: 5Gi}"), deployment("a", 2), deployment("c", 3)), existing
    )


def test_lowering_a_quota_below_current_usage_is_refused() -> None:
    existing = stored("{memory: 8Gi}", deployment("a", 3))
    exc = refusal(docs(tenant(quota="{memory: 2Gi}")), existing)
    assert exc.message == (
        "tenant 'retail' quota.memory is 2Gi (lowered from 8Gi by this apply): its deployments "
        "would use 3Gi (currently 3Gi); scale deployments down or delete some, or raise the "
        "Tenant's spec.quota.memory to at least 3Gi"
    )
    check_quotas(docs(tenant(quota="{memory: 3Gi}")), existing)  # down to the usage is fine
    # Setting a quota for the first time below the usage is refused the same way.
    unlimited = stored("{}", deployment("a", 3))
    exc = refusal(docs(tenant(quota="{deployments: 0}")), unlimited)
    assert exc.message.startswith(
        "tenant 'retail' quota.deployments is 0 (set by this apply): it would have 1 deployment"
    )


def test_a_new_tenant_and_its_deployments_in_one_apply_are_checked() -> None:
    new = docs(tenant(quota="{memory: 1Gi}"), profile(), model(), deployment("a", 2))
    exc = refusal(new, [])
    assert "would use 2Gi (currently 0, +2Gi from a ×2 of profile 'rt-small' 1Gi)" in exc.message


def test_growing_a_profile_counts_against_the_tenants_using_it() -> None:
    existing = stored("{memory: 4Gi}", deployment("a", 2))
    exc = refusal(docs(profile(memory="3Gi")), existing)
    assert exc.message.startswith(
        "tenant 'retail' quota.memory is 4Gi: its deployments would use 6Gi (currently 2Gi, "
        "+4Gi from a ×2 of profile 'rt-small' 3Gi (was a ×2 of profile 'rt-small' 1Gi)); "
    )


def test_tenants_without_quotas_are_never_refused() -> None:
    existing = stored("{requestsPerSecond: 5}")
    check_quotas(docs(*(deployment(f"d{i}", 50) for i in range(5))), existing)


def test_the_error_crosses_process_boundaries_by_its_code() -> None:
    exc = error_from_code("quota_exceeded", "over", tenant="retail")
    assert isinstance(exc, QuotaExceeded) and exc.http_status == 403


def _models(tenant: str, versions: range) -> list[Resource]:
    return load_documents(
        "".join(
            f"---\napiVersion: gpuvisor/v1\nkind: Model\nmetadata: {{name: m, tenant: {tenant}}}\n"
            f"spec: {{version: '{v}', source: /models/m.onnx}}\n"
            for v in versions
        )
    )


def test_a_tenant_stores_at_most_so_many_model_versions() -> None:
    """One tenant key once stored 30,000 Models and slowed every apply for everyone."""
    from gpuvisor.control.quotas import MAX_MODELS_PER_TENANT, check_model_count

    stored = _models("retail", range(MAX_MODELS_PER_TENANT - 1))
    check_model_count(
        _models("retail", range(MAX_MODELS_PER_TENANT - 1, MAX_MODELS_PER_TENANT)), stored
    )
    with pytest.raises(QuotaExceeded) as caught:
        check_model_count(
            _models("retail", range(MAX_MODELS_PER_TENANT - 1, MAX_MODELS_PER_TENANT + 1)), stored
        )
    assert caught.value.message.startswith(
        f"tenant 'retail' would store {MAX_MODELS_PER_TENANT + 1} Model versions, more than the "
        f"{MAX_MODELS_PER_TENANT} a tenant may"
    )
    check_model_count(stored[:5], stored)  # re-applied, nothing added: passes
    check_model_count(_models("support", range(5)), stored)  # another tenant's count
