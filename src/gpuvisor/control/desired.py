"""Desired state: every replica the store's resources ask for, resolved, with a reason when it
cannot be."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from gpuvisor.spec.kinds import (
    DEFAULT_POOL,
    Deployment,
    Model,
    Pool,
    PoolSpec,
    Profile,
    Resource,
    Tenant,
)
from gpuvisor.spec.loader import find_model

__all__ = ["DesiredSlice", "desired_slices", "find_pool", "find_tenant"]

_DEFAULTS = PoolSpec()  # the implicit pool's settings


@dataclass(frozen=True)
class DesiredSlice:
    """One replica the store asks for, fully resolved (or with the reason it cannot be)."""

    slice_id: str
    tenant: str
    deployment: Deployment
    replica: int
    spec_hash: str
    model: Model | None
    profile: Profile | None
    pool: Pool | None
    problem: str = ""


def _hash(*parts: object) -> str:
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def find_tenant(resources: Sequence[Resource], name: str) -> Tenant | None:
    """Return the tenant called ``name`` among ``resources``, or None."""
    return next(
        (r for r in resources if isinstance(r, Tenant) and r.metadata.name == name),
        None,
    )


def find_pool(resources: Sequence[Resource], name: str) -> Pool | None:
    """Return the pool called ``name`` among ``resources``, or None."""
    return next(
        (r for r in resources if isinstance(r, Pool) and r.metadata.name == name),
        None,
    )


def desired_slices(
    resources: Sequence[Resource], unloaded: set[tuple[str, str]]
) -> list[DesiredSlice]:
    """Return every replica the resources ask for, resolving model, profile and pool."""
    models = [r for r in resources if isinstance(r, Model)]
    profiles = {r.metadata.name: r for r in resources if isinstance(r, Profile)}
    pools = {r.metadata.name: r for r in resources if isinstance(r, Pool)}
    tenants = {r.metadata.name for r in resources if isinstance(r, Tenant)}
    out: list[DesiredSlice] = []
    for dep in (r for r in resources if isinstance(r, Deployment)):
        tenant = dep.metadata.tenant or ""
        if (tenant, dep.metadata.name) in unloaded:
            continue
        model = find_model(models, tenant, dep.spec.model_name, dep.spec.model_version)
        profile = profiles.get(dep.spec.profile)
        pool = pools.get(dep.spec.pool)
        problem = ""
        if tenant not in tenants:
            problem = f"tenant '{tenant}' does not exist"
        elif model is None:
            problem = f"model '{dep.spec.model}' not found in tenant '{tenant}'"
        elif profile is None:
            problem = f"profile '{dep.spec.profile}' not found"
        elif pool is None and dep.spec.pool != DEFAULT_POOL:
            problem = f"pool '{dep.spec.pool}' not found"
        # the replica count and the rollout pace are not part of a replica's spec: scaling or
        # changing the pace leaves the running replicas as they are; nor is a pool's spec that
        # holds only the defaults (a saved listing applied again makes the implicit pool
        # `default` an applied one, with the same settings: nothing restarts)
        # The model counts as resolved (its spec, version included, below): `model: m` and
        # `model: m@2` that resolve to the same version are the same spec.
        dep_part = dep.spec.model_dump(mode="json", exclude={"replicas", "rollout"})
        dep_part["model"] = dep.spec.model_name
        spec_hash = _hash(
            dep_part,
            model.spec.model_dump(mode="json") if model else None,
            profile.spec.model_dump(mode="json") if profile else None,
            pool.spec.model_dump(mode="json") if pool and pool.spec != _DEFAULTS else None,
        )
        for replica in range(dep.spec.replicas):
            out.append(
                DesiredSlice(
                    f"{tenant}/{dep.metadata.name}/{replica}",
                    tenant,
                    dep,
                    replica,
                    spec_hash,
                    model,
                    profile,
                    pool,
                    problem,
                )
            )
    return out
