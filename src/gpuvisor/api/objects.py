"""What the admin API knows about stored objects: their kinds by plural, who may change
which, the implicit ``default`` pool, and what refers to an object."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gpuvisor.control.slices import SliceState
from gpuvisor.errors import Forbidden, NotFound
from gpuvisor.security.keys import Principal
from gpuvisor.spec.kinds import (
    DEFAULT_POOL,
    TENANT_SCOPED,
    Deployment,
    Metadata,
    Model,
    Pool,
    Resource,
    Tenant,
)
from gpuvisor.spec.loader import find_model, resource_to_dict
from gpuvisor.store.repo import StoredObject

__all__ = [
    "IMPLICIT_DEFAULT_POOL",
    "PLURALS",
    "implicit_default_pool",
    "instances_serving",
    "kind_of_plural",
    "may_write",
    "users_of",
]

PLURALS = {  # the URL's plural of each kind the admin API reads and deletes
    "tenants": "Tenant",
    "profiles": "Profile",
    "pools": "Pool",
    "models": "Model",
    "deployments": "Deployment",
}


def may_write(principal: Principal, resource: Resource) -> None:
    """Return if ``principal`` may change ``resource``; raise Forbidden, or NotFound for a
    tenant key naming another tenant (whose objects it does not see)."""
    if principal.role == "admin":
        return
    if (
        principal.role == "tenant"
        and resource.kind in TENANT_SCOPED
        and resource.metadata.tenant == principal.tenant
    ):
        return
    if principal.role == "tenant" and resource.kind in TENANT_SCOPED:
        raise NotFound(f"tenant '{resource.metadata.tenant}' not found")
    raise Forbidden(f"{principal.kind_of_key} may not change {resource.kind} objects")


IMPLICIT_DEFAULT_POOL = Pool(metadata=Metadata(name=DEFAULT_POOL))
"""The pool deployments that name none use while no Pool ``default`` is applied: an empty
selector (every device) and Pool's defaults for the rest, as the controller places them."""


def implicit_default_pool() -> dict[str, Any]:
    """Return the implicit ``default`` pool as a stored Pool reads (keys sorted, as the store
    keeps them), with a status saying what it is."""

    def sorted_keys(value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        return {key: sorted_keys(value[key]) for key in sorted(value)}

    return {
        **sorted_keys(resource_to_dict(IMPLICIT_DEFAULT_POOL)),
        "status": {
            "implicit": True,
            "note": "implicit: not applied; the pool of deployments that name none "
            f"(apply a Pool named {DEFAULT_POOL!r} to change it)",
        },
    }


def kind_of_plural(plural: str) -> str:
    """Return the kind named by ``plural`` (``deployments``: Deployment); raise NotFound."""
    kind = PLURALS.get(plural.lower())
    if kind is None:
        raise NotFound(f"unknown kind '{plural}' (expected one of {', '.join(PLURALS)})")
    return kind


def users_of(resources: list[Resource], kind: str, obj: StoredObject) -> list[str]:
    """Return the objects that refer to ``obj`` (which must not be deleted under them)."""
    users = []
    for r in resources:
        refers = False
        if isinstance(r, Deployment):
            refers = (
                (kind == "Profile" and r.spec.profile == obj.name)
                or (kind == "Pool" and r.spec.pool == obj.name)
                or (kind == "Model" and _uses_model_version(r, obj, resources))
            )
        if kind == "Tenant" and r.kind in TENANT_SCOPED and r.metadata.tenant == obj.name:
            refers = True
        if kind == "Pool" and isinstance(r, Tenant) and obj.name in r.spec.pools:
            refers = True
        if refers:
            owner = f"{r.metadata.tenant}/" if r.metadata.tenant else ""
            users.append(f"{r.kind} {owner}{r.metadata.name}")
    return users


def instances_serving(slices: Iterable[SliceState], model: StoredObject) -> list[str]:
    """The instances that load or serve the stored model version ``model``: during a rolling
    update (or one stalled on a broken version) the old version serves though no deployment
    names it any more, and a restart would bring it back."""
    name, version = model.body["metadata"]["name"], str(model.body["spec"].get("version"))
    return sorted(
        s.id
        for s in slices
        if s.tenant == model.tenant
        and s.model_name == name
        and s.model_version == version
        and s.state in ("Ready", "Restarting", "Loading")
    )


def _uses_model_version(dep: Deployment, model: StoredObject, resources: list[Resource]) -> bool:
    """Whether ``dep`` serves the stored model version ``model``: the version it pins, or,
    when it pins none, the model's highest version (other versions it does not use)."""
    name, version = model.body["metadata"]["name"], str(model.body["spec"].get("version"))
    if dep.metadata.tenant != model.tenant or dep.spec.model_name != name:
        return False
    if dep.spec.model_version is not None:
        return dep.spec.model_version == version
    models = [r for r in resources if isinstance(r, Model)]
    highest = find_model(models, model.tenant, name)
    return highest is None or highest.spec.version == version
