"""Turn manifests (Deployments with their Profiles and Pools) into what the fleet planner places."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from gpuvisor.errors import SpecError
from gpuvisor.partition.fleet import Workload
from gpuvisor.spec.kinds import DEFAULT_POOL, Deployment, Pool, Profile, Resource
from gpuvisor.spec.loader import origin_of

__all__ = ["workloads_from"]


def _hint(value: str, known: Sequence[str], plural: str) -> str:
    close = difflib.get_close_matches(value, list(known), n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (known {plural}: {', '.join(known)})" if known else f" (no {plural} are defined)"


def workloads_from(resources: Sequence[Resource]) -> list[Workload]:
    """Return one workload per Deployment, resolving its Profile and Pool.

    Tenants and Models are not needed for planning and are ignored. Raises SpecError with one
    line per Deployment naming a Profile or Pool that the manifests do not define.
    """
    profiles = {r.metadata.name: r for r in resources if isinstance(r, Profile)}
    pools = {r.metadata.name: r for r in resources if isinstance(r, Pool)}
    lines: list[str] = []
    out: list[Workload] = []
    for dep in (r for r in resources if isinstance(r, Deployment)):
        where = f"{origin_of(dep)} Deployment/{dep.metadata.name}"
        profile = profiles.get(dep.spec.profile)
        pool = pools.get(dep.spec.pool)
        if profile is None:
            hint = _hint(dep.spec.profile, sorted(profiles), "profiles")
            lines.append(f"{where}: spec.profile: unknown profile {dep.spec.profile!r}{hint}")
        if pool is None and dep.spec.pool != DEFAULT_POOL:
            hint = _hint(dep.spec.pool, sorted(pools), "pools")
            lines.append(f"{where}: spec.pool: unknown pool {dep.spec.pool!r}{hint}")
        if profile is None or (pool is None and dep.spec.pool != DEFAULT_POOL):
            continue
        out.append(
            Workload(
                tenant=dep.metadata.tenant or "",
                deployment=dep.metadata.name,
                replicas=dep.spec.replicas,
                isolation=profile.spec.isolation,
                memory=profile.spec.memory,
                compute_share=profile.spec.compute_share,
                mig_profile=profile.spec.mig_profile,
                pool=dep.spec.pool,
                selector=tuple(sorted(pool.spec.selector.items())) if pool else (),
                tenancy=pool.spec.tenancy if pool else "shared",
                disallow_migration=dep.spec.placement.disallow_migration,
                memory_headroom=pool.spec.memory_headroom if pool else 0,
            )
        )
    if lines:
        raise SpecError("\n".join(lines))
    return out
