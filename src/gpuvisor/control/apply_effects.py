"""What an apply did beyond storing its objects, as the node sees it right after reconciling:
what will keep an object from serving (warnings), and what it set moving (notes)."""

from __future__ import annotations

from pathlib import Path

from gpuvisor.control.controller import Controller
from gpuvisor.spec.kinds import Deployment, Model, Profile, Resource
from gpuvisor.spec.loader import find_model

__all__ = ["apply_notes", "apply_warnings"]


def apply_warnings(
    resource: Resource | None,
    controller: Controller | None,
    applied: frozenset[tuple[str, str]] = frozenset(),
) -> list[str]:
    """What will keep an applied object from serving, as far as the node can tell now: a model
    file missing on the node, a deployment's replicas (or, for a profile, those of every
    deployment that uses it, but for those in the same apply, ``applied`` (tenant, name),
    which say it themselves) that fit on no device."""
    if isinstance(resource, Model):
        source = Path(resource.spec.source)
        if not source.is_file():
            return [
                f"model file {source} is not on this node (yet): deployments of this "
                "model stay Failed until it is (they load as soon as it appears)"
            ]
    if controller is None:
        return []
    if isinstance(resource, Deployment):
        pending = _pending(controller, resource)
        return [pending] if pending else []
    if isinstance(resource, Profile):
        name = resource.metadata.name
        users = [
            d
            for d in controller.deployments()
            if d.spec.profile == name and (d.metadata.tenant or "", d.metadata.name) not in applied
        ]
        return [
            f"deployment {d.metadata.tenant}/{d.metadata.name}: {pending}"
            for d in users
            if (pending := _pending(controller, d))
        ]
    return []


def apply_notes(resource: Resource | None, controller: Controller | None) -> list[str]:
    """What an applied object set moving: for a model version, each deployment that now rolls
    to it (one that names the model without a version follows its highest)."""
    if not isinstance(resource, Model) or controller is None:
        return []
    tenant, name = resource.metadata.tenant or "", resource.metadata.name
    version = resource.spec.version
    notes = []
    models = [r for r in controller.resources if isinstance(r, Model)]
    for dep in controller.deployments():
        if dep.metadata.tenant != tenant or dep.spec.model_name != name:
            continue
        target = find_model(models, tenant, name, dep.spec.model_version)
        if target is None or target.spec.version != version:
            continue  # the deployment rolls to another version (or none), not to this one
        serving = {s.model_version for s in controller.deployment_slices(tenant, dep.metadata.name)}
        if version in serving and len(serving) > 1:
            older = ", ".join(f"@{v}" for v in sorted(serving - {version}))
            notes.append(
                f"deployment {dep.metadata.name} rolls from {name}{older} to {name}@{version}, "
                f"replica by replica: follow it with `gpuvisor describe deployment "
                f"{dep.metadata.name} -t {tenant}`"
            )
    return notes


def _pending(controller: Controller, dep: Deployment) -> str:
    """``"1 of 2 replica(s) Pending: <why>"`` for a deployment with a replica that fits on no
    device, else ``""``."""
    slices = controller.deployment_slices(dep.metadata.tenant or "", dep.metadata.name)
    pending = [s for s in slices if s.state == "Pending"]
    if not pending:
        return ""
    replicas = len({s.replica_id for s in slices})
    return f"{len(pending)} of {replicas} replica(s) Pending: {pending[0].reason}"
