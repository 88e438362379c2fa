"""Apply-time enforcement of signed models: refuse manifests that would have a pool with
``requireSignedModels`` load a model that is unsigned, signed by an untrusted key, or whose
signature is malformed. (Whether the file still matches is checked when a slice loads it.)"""

from __future__ import annotations

from collections.abc import Sequence

from gpuvisor.errors import IntegrityError, SpecError
from gpuvisor.security.signing import SignaturePolicy
from gpuvisor.spec.kinds import Deployment, Model, Pool, Resource, resource_key
from gpuvisor.spec.loader import find_model

__all__ = ["check_signed_models"]


def check_signed_models(new: Sequence[Resource], existing: Sequence[Resource]) -> None:
    """Check the deployments that ``new`` adds or affects (through their model or pool).

    ``existing`` is what is stored; ``new`` replaces objects with the same key. Raises
    SpecError naming each malformed ``trustedKeys`` entry of an applied Pool, then
    IntegrityError with one line per refused model (``reason`` is the first one's).
    """
    key_problems = [
        # where, as every other apply problem says it: "pools.yaml doc 2 Pool/regulated: …"
        f"{r._origin} Pool/{r.metadata.name}: {line.removeprefix(f'pool {r.metadata.name!r} ')}".lstrip()
        for r in new
        if isinstance(r, Pool)
        for line in SignaturePolicy(r.metadata.name, tuple(r.spec.trusted_keys)).key_problems()
    ]
    if key_problems:
        raise SpecError("\n".join(key_problems))
    merged = {resource_key(r): r for r in existing}
    merged.update({resource_key(r): r for r in new})
    touched = {resource_key(r) for r in new}
    everything = list(merged.values())
    pools = {r.metadata.name: r for r in everything if isinstance(r, Pool)}
    models = [r for r in everything if isinstance(r, Model)]
    refused: list[IntegrityError] = []
    for dep in (r for r in everything if isinstance(r, Deployment)):
        pool = pools.get(dep.spec.pool)
        policy = SignaturePolicy.of(pool)
        tenant = dep.metadata.tenant or ""
        model = find_model(models, tenant, dep.spec.model_name, dep.spec.model_version)
        if policy is None or pool is None or model is None:
            continue  # no rule to apply, or a dangling reference reported elsewhere
        if not touched & {resource_key(dep), resource_key(model), resource_key(pool)}:
            continue  # unchanged by this apply: the node already judged it
        try:
            policy.check(model)
        except IntegrityError as exc:
            exc.message = f"Deployment {tenant}/{dep.metadata.name}: {exc.message}"
            refused.append(exc)
    if refused:
        first = refused[0]
        raise IntegrityError(
            "\n".join(e.message for e in refused),
            **{**first.fields, "refused": len(refused)},
        )
