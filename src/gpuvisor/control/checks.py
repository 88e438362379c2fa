"""What every apply must pass against what is stored, whoever applies: the admin API, and the
demo on a node's first start."""

from __future__ import annotations

from collections.abc import Sequence

from gpuvisor.control.quotas import check_model_count, check_quotas
from gpuvisor.security.signed_models import check_signed_models
from gpuvisor.spec.documents import Problem, raise_problems
from gpuvisor.spec.kinds import Deployment, Resource, Tenant, resource_key
from gpuvisor.spec.loader import origin_of, validate_references

__all__ = ["check_apply", "check_tenant_pools"]


def check_apply(new: Sequence[Resource], existing: Sequence[Resource]) -> None:
    """Refuse ``new`` unless its references resolve, its models satisfy their pools' signing
    rules and its tenants stay within their quotas, given ``existing``; raises the first
    failure (a SpecError, an integrity error or a quota error, each saying what to fix)."""
    validate_references(list(new), list(existing))
    check_tenant_pools(new, existing)
    check_signed_models(new, existing)
    check_quotas(new, existing)
    check_model_count(new, existing)


def check_tenant_pools(new: Sequence[Resource], existing: Sequence[Resource]) -> None:
    """Refuse a Tenant whose ``spec.pools`` leaves out a pool its deployments use (as they
    stand after the apply): they would go on running there, and could not be applied again
    as they are, nor restored from a saved copy. Raises SpecError, one line per deployment."""
    merged = {resource_key(r): r for r in existing}
    merged.update({resource_key(r): r for r in new})
    problems: list[Problem] = []
    for tenant in (r for r in new if isinstance(r, Tenant) and r.spec.pools):
        name, allowed = tenant.metadata.name, tenant.spec.pools
        for deployment in merged.values():
            if (
                isinstance(deployment, Deployment)
                and deployment.metadata.tenant == name
                and deployment.spec.pool not in allowed
            ):
                problems.append(
                    Problem.at_origin(
                        origin_of(tenant),
                        "Tenant",
                        name,
                        "spec.pools",
                        f"leaves out pool {deployment.spec.pool!r} of its Deployment "
                        f"{deployment.metadata.name!r}: move that deployment to one of "
                        f"{', '.join(allowed)} (or delete it) in this apply or before it",
                    )
                )
    raise_problems(problems)
