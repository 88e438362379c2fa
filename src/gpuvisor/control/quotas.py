"""Apply-time enforcement of tenant quotas: ``quota.memory``, ``quota.compute`` and
``quota.deployments``.

A tenant's usage is counted over the desired state, not over what happens to be running:
memory is the sum over its Deployments of replicas × the Profile's ``memory``, compute the sum
of replicas × the Profile's ``computeShare``, and deployments the number of its Deployment
objects. An apply is refused whole when, once applied, a tenant would be over a limit that the
apply itself moved closer: it raises the usage, or it lowers (or sets) the limit. An apply that
neither raises a tenant's usage nor lowers its limit always passes, so scaling down, deleting,
and re-applying an unchanged manifest are never refused, even for a tenant that is already over.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from gpuvisor.errors import QuotaExceeded
from gpuvisor.spec.kinds import Deployment, Model, Profile, Resource, Tenant, resource_key
from gpuvisor.units import format_size

__all__ = [
    "MAX_MODELS_PER_TENANT",
    "QUOTA_FIELDS",
    "TenantUsage",
    "check_model_count",
    "check_quotas",
    "tenant_usage",
]

MAX_MODELS_PER_TENANT = 1000
"""Model objects (versions) one tenant may store: every apply and delete reads them all, so an
unbounded number would let one tenant's key slow the node's API for everyone."""

QUOTA_FIELDS = ("memory", "compute", "deployments")
"""The quota fields checked at apply, in the order they are reported."""

_EPSILON = 1e-9
"""Slack for sums of compute shares (0.1 + 0.2 is not exactly 0.3)."""


@dataclass(frozen=True)
class TenantUsage:
    """What a tenant's Deployments reserve: bytes, summed compute shares, Deployment count."""

    memory: int = 0
    compute: float = 0.0
    deployments: int = 0


def _tenant_deployments(everything: Sequence[Resource], tenant: str) -> dict[str, Deployment]:
    return {
        r.metadata.name: r
        for r in everything
        if isinstance(r, Deployment) and r.metadata.tenant == tenant
    }


def _profiles(everything: Sequence[Resource]) -> dict[str, Profile]:
    return {r.metadata.name: r for r in everything if isinstance(r, Profile)}


def tenant_usage(everything: Sequence[Resource], tenant: str) -> TenantUsage:
    """Return what ``tenant``'s Deployments in ``everything`` reserve.

    A Deployment whose Profile is missing counts as a deployment but reserves nothing (the
    dangling reference is reported by ``validate_references``).
    """
    profiles = _profiles(everything)
    memory, compute, count = 0, 0.0, 0
    for dep in _tenant_deployments(everything, tenant).values():
        count += 1
        profile = profiles.get(dep.spec.profile)
        if profile is not None:
            memory += dep.spec.replicas * profile.spec.memory
            compute += dep.spec.replicas * profile.spec.compute_share
    return TenantUsage(memory=memory, compute=compute, deployments=count)


def _format(field: str, value: float) -> str:
    if field == "memory":
        return format_size(value)
    if field == "compute":
        return f"{value:.4g}"
    return str(int(value))


def _at_least(field: str, usage: float, limit: float) -> str:
    """``usage`` as text no smaller than it (a limit raised to what it says lets the apply
    through), and never the same text as ``limit``'s."""
    if field == "memory":
        text = format_size(usage, rounding="up")
        if text == _format(field, limit):
            text = f"{math.ceil(usage / 2**20)}Mi"
        return text
    if field == "compute":
        text = f"{math.ceil(round(usage * 1e4, 6)) / 1e4:g}"  # 3 × 0.0015 is 0.0045, not …46
        return text if text != _format(field, limit) else repr(usage)
    return str(math.ceil(usage))


def _number(field: str, value: float) -> int | float:
    """``value`` as the JSON number an error body carries: bytes and counts are integers."""
    return value if field == "compute" else round(value)


def _limit(tenant: Tenant | None, field: str) -> float | None:
    if tenant is None:
        return None
    value = getattr(tenant.spec.quota, field)
    return None if value is None else float(value)


def _replica_share(profile: Profile | None, field: str) -> float:
    if profile is None:
        return 0.0
    return float(profile.spec.memory if field == "memory" else profile.spec.compute_share)


def _describe(dep: Deployment, profile: Profile | None, field: str) -> str:
    share = _format(field, _replica_share(profile, field))
    return f"{dep.metadata.name} ×{dep.spec.replicas} of profile '{dep.spec.profile}' {share}"


def _changes(
    field: str,
    tenant: str,
    before: Sequence[Resource],
    after: Sequence[Resource],
) -> list[str]:
    """One phrase per Deployment of ``tenant`` whose share of ``field`` the apply changes."""
    old_deps, new_deps = _tenant_deployments(before, tenant), _tenant_deployments(after, tenant)
    old_profiles, new_profiles = _profiles(before), _profiles(after)
    phrases: list[str] = []
    for name in sorted(set(old_deps) | set(new_deps)):
        old, new = old_deps.get(name), new_deps.get(name)
        if field == "deployments":
            if old is None:
                phrases.append(f"+1 from {name}")
            elif new is None:
                phrases.append(f"-1 from {name}")
            continue
        old_profile = old_profiles.get(old.spec.profile) if old is not None else None
        new_profile = new_profiles.get(new.spec.profile) if new is not None else None
        old_share = old.spec.replicas * _replica_share(old_profile, field) if old else 0.0
        new_share = new.spec.replicas * _replica_share(new_profile, field) if new else 0.0
        delta = new_share - old_share
        if abs(delta) <= _EPSILON:
            continue
        sign = "+" if delta > 0 else "-"
        if new is None:
            assert old is not None
            phrases.append(f"{sign}{_format(field, abs(delta))} from deleting {name}")
            continue
        phrase = f"{sign}{_format(field, abs(delta))} from {_describe(new, new_profile, field)}"
        if old is not None:
            phrase += f" (was {_describe(old, old_profile, field)})"
        phrases.append(phrase)
    return phrases


@dataclass(frozen=True)
class _Violation:
    tenant: str
    field: str
    limit: float
    old_limit: float | None
    usage: float
    current: float
    changes: list[str]

    def message(self) -> str:
        def fmt(value: float) -> str:
            return _format(self.field, value)

        head = f"tenant '{self.tenant}' quota.{self.field} is {fmt(self.limit)}"
        if self.old_limit is not None and self.limit < self.old_limit:
            head += f" (lowered from {fmt(self.old_limit)} by this apply)"
        elif self.old_limit is None and self.current > 0:
            head += " (set by this apply)"

        def amount(value: float) -> str:
            if self.field != "deployments":
                return fmt(value)
            return f"{int(value)} deployment" + ("" if value == 1 else "s")

        needed = _at_least(self.field, self.usage, self.limit)

        what = "would have" if self.field == "deployments" else "would use"
        detail = ", ".join([f"currently {amount(self.current)}", *self.changes])
        # every deployment counts, whatever its replicas: only deleting one makes room
        shrink = (
            "delete some"
            if self.field == "deployments"
            else "scale deployments down or delete some"
        )
        fix = f"{shrink}, or raise the Tenant's spec.quota.{self.field} to at least {needed}"
        noun = "it" if self.field == "deployments" else "its deployments"
        used = amount(self.usage) if self.field == "deployments" else needed
        return f"{head}: {noun} {what} {used} ({detail}); {fix}"


def check_model_count(new: Sequence[Resource], existing: Sequence[Resource]) -> None:
    """Refuse ``new`` if it takes a tenant's Models (each version one) past
    ``MAX_MODELS_PER_TENANT``; an apply that adds none always passes."""
    known = {resource_key(r) for r in existing if isinstance(r, Model)}
    added: dict[str, int] = {}
    for r in new:
        if isinstance(r, Model) and resource_key(r) not in known:
            tenant = r.metadata.tenant or ""
            added[tenant] = added.get(tenant, 0) + 1
    for tenant, count in sorted(added.items()):
        stored = sum(1 for r in existing if isinstance(r, Model) and r.metadata.tenant == tenant)
        if stored + count > MAX_MODELS_PER_TENANT:
            raise QuotaExceeded(
                f"tenant '{tenant}' would store {stored + count} Model versions, more than the "
                f"{MAX_MODELS_PER_TENANT} a tenant may: delete versions no deployment uses "
                "(gpuvisor delete model NAME@VERSION)",
                tenant=tenant,
                limit=MAX_MODELS_PER_TENANT,
            )


def check_quotas(new: Sequence[Resource], existing: Sequence[Resource]) -> None:
    """Refuse ``new`` if, once applied over ``existing``, a tenant would exceed its quota.

    ``existing`` is what is stored; objects in ``new`` replace those with the same key. A
    tenant is refused on a field when its usage after the apply is over its limit after the
    apply, and the apply raised that usage or lowered (or newly set) that limit. Raises
    QuotaExceeded with one line per tenant and field; its ``fields`` describe the first one.
    """
    merged = {resource_key(r): r for r in existing}
    merged.update({resource_key(r): r for r in new})
    before, after = list(existing), list(merged.values())
    old_tenants = {r.metadata.name: r for r in before if isinstance(r, Tenant)}
    violations: list[_Violation] = []
    for tenant in (r for r in after if isinstance(r, Tenant)):
        name = tenant.metadata.name
        old_tenant = old_tenants.get(name)
        used_before, used_after = tenant_usage(before, name), tenant_usage(after, name)
        for field in QUOTA_FIELDS:
            limit = _limit(tenant, field)
            if limit is None:
                continue
            usage = float(getattr(used_after, field))
            current = float(getattr(used_before, field))
            if usage <= limit + _EPSILON:
                continue
            old_limit = _limit(old_tenant, field)
            lowered = old_limit is None or limit < old_limit
            if usage <= current + _EPSILON and not lowered:
                continue  # the apply neither raised the usage nor lowered the limit
            violations.append(
                _Violation(
                    name,
                    field,
                    limit,
                    old_limit,
                    usage,
                    current,
                    _changes(field, name, before, after),
                )
            )
    if violations:
        first = violations[0]
        raise QuotaExceeded(
            "\n".join(v.message() for v in violations),
            tenant=first.tenant,
            quota=first.field,
            limit=_number(first.field, first.limit),
            usage=_number(first.field, first.usage),
            current=_number(first.field, first.current),
            exceeded=len(violations),
        )
