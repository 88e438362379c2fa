"""`gpuvisor get`, `describe` and `delete`: a node's objects by kind (registered in cli.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from gpuvisor.cli_options import (
    KeyOpt,
    OutputFormat,
    OutputOpt,
    StateOpt,
    TenantOpt,
    UrlOpt,
    check_tenant_exists,
    fail,
    node_client,
    print_data,
    stdout_console,
    tenant_option,
)
from gpuvisor.errors import ConfigError, GpuvisorError, NotFound

if TYPE_CHECKING:
    from gpuvisor.client import NodeClient

__all__ = ["DELETABLE", "KIND_ALIASES", "TENANT_SCOPED", "delete", "describe", "get"]

KIND_ALIASES = {
    "tenant": "tenants",
    "tenants": "tenants",
    "profile": "profiles",
    "profiles": "profiles",
    "pool": "pools",
    "pools": "pools",
    "model": "models",
    "models": "models",
    "deployment": "deployments",
    "deployments": "deployments",
    "deploy": "deployments",
    "device": "devices",
    "devices": "devices",
    "slice": "slices",
    "slices": "slices",
}
# spec.kinds.TENANT_SCOPED in the plural (not imported: pydantic would slow every command)
TENANT_SCOPED = frozenset({"models", "deployments"})
# what `delete` takes: devices and slices are the node's, not objects applied to it
DELETABLE = frozenset({"tenants", "profiles", "pools", "models", "deployments"})


def _plural(kind: str, expected: frozenset[str] | None = None) -> str:
    """Return the plural of ``kind`` (any alias); exit naming the closest kind if there is
    none, among the ``expected`` plurals (what the command takes) when given."""
    plural = KIND_ALIASES.get(kind.lower())
    if plural is None:
        import difflib

        wanted = expected or frozenset(KIND_ALIASES.values())
        aliases = [alias for alias, p in KIND_ALIASES.items() if p in wanted]
        close = difflib.get_close_matches(kind.lower(), aliases, n=1)
        hint = f": did you mean '{close[0]}'?" if close else ""
        known = ", ".join(sorted(wanted))
        fail(GpuvisorError(f"unknown kind '{kind}'{hint} (expected one of {known})"))
    return plural


def _check_tenant(plural: str, tenant: str | None) -> None:
    """Refuse ``--tenant`` for a kind that belongs to no tenant (the node would ignore it)."""
    if tenant and plural not in TENANT_SCOPED and plural != "slices":
        fail(
            ConfigError(
                f"--tenant does not apply to {plural}: they belong to no tenant "
                "(it applies to models, deployments and slices)"
            )
        )


def get(
    kind: Annotated[
        str, typer.Argument(help="tenants, profiles, pools, models, deployments, devices or slices")
    ],
    name: Annotated[
        str | None,
        typer.Argument(help="one object's name (a device's or slice's id); printed as yaml"),
    ] = None,
    tenant: TenantOpt = None,
    output: OutputOpt = OutputFormat.table,
    url: UrlOpt = None,
    key: KeyOpt = None,
    state: StateOpt = None,
) -> None:
    """List objects of a kind, or show one.

    With -o yaml or -o json a list of tenants, profiles, pools, models or deployments prints
    as a List that `apply -f` takes back (the status in it is ignored): `get deployments -o
    yaml > all.yaml` saves them, `apply -f all.yaml` restores them. Devices and slices are
    what the node reports, not objects to apply."""
    plural = _plural(kind)
    _check_tenant(plural, tenant)
    client = node_client(url, key, state)
    # the node keeps slices in memory, not in the store: they are filtered by tenant here
    params = {"tenant": tenant} if tenant and plural != "slices" else {}
    one = OutputFormat.yaml if output == OutputFormat.table else output
    try:
        if name and plural in ("devices", "slices"):
            # no route for one of them (a slice id holds slashes): picked from the list
            items = _items(client, plural, tenant)
            found = next((item for item in items if item.get("id") == name), None)
            if found is None:
                known = ", ".join(str(item.get("id")) for item in items) or "none"
                raise NotFound(f"no {plural[:-1]} '{name}' on this node (there are: {known})")
            print_data(found, one)
            return
        if name:
            print_data(client.request("GET", f"/api/v1/{plural}/{name}", params=params), one)
            return
        if plural == "slices":
            data: dict[str, Any] = {"items": _items(client, plural, tenant)}
        else:
            data = client.request("GET", f"/api/v1/{plural}", params=params)
        if tenant and plural == "slices" and not data["items"]:
            # the node refuses an unknown tenant on the other lists; slices are filtered here
            check_tenant_exists(client, tenant)
    except GpuvisorError as exc:
        fail(exc)
    if output != OutputFormat.table:
        print_data(data, output)
        return
    from gpuvisor.cli_tables import render_table

    stdout_console().print(render_table(plural, data["items"]))


def _items(client: NodeClient, plural: str, tenant: str | None) -> list[dict[str, Any]]:
    """Return the devices or slices on the node; slices only ``tenant``'s when one is given."""
    items: list[dict[str, Any]] = client.request("GET", f"/api/v1/{plural}")["items"]
    return [i for i in items if i.get("tenant") == tenant] if tenant else items


def describe(
    kind: Annotated[str, typer.Argument(help="deployment (others print their spec)")],
    name: Annotated[str, typer.Argument(help="the object's name")],
    tenant: DescribeTenantOpt = None,
    url: UrlOpt = None,
    key: KeyOpt = None,
    state: StateOpt = None,
) -> None:
    """Show one object with its status: for a deployment, each slice's device, state and
    reason, and for a slice that fits nowhere the reason from every device."""
    if _plural(kind) != "deployments":
        get(kind, name, tenant, OutputFormat.yaml, url, key, state)
        return
    from gpuvisor.cli_tables import describe_deployment

    client = node_client(url, key, state)
    try:
        body = client.request(
            "GET", f"/api/v1/deployments/{name}", params={"tenant": tenant} if tenant else {}
        )
    except GpuvisorError as exc:
        fail(exc)
    stdout_console().print(describe_deployment(body), highlight=False)


DescribeTenantOpt = Annotated[
    str | None, tenant_option("the tenant of the model or deployment to show")
]
DeleteTenantOpt = Annotated[
    str | None, tenant_option("the tenant of the model or deployment to delete")
]


def delete(
    kind: Annotated[str, typer.Argument(help="tenant, profile, pool, model or deployment")],
    name: Annotated[str, typer.Argument(help="the object's name")],
    tenant: DeleteTenantOpt = None,
    url: UrlOpt = None,
    key: KeyOpt = None,
    state: StateOpt = None,
) -> None:
    """Delete an object; a deployment's workers are drained and stopped."""
    plural = _plural(kind, DELETABLE)
    if plural == "devices":
        fail(
            ConfigError(
                f"cannot delete a device: the node finds its devices; take one out of service "
                f"with `gpuvisor cordon {name}` (its slices move) or `gpuvisor drain {name}` "
                "(and wait for them)"
            )
        )
    if plural == "slices":
        fail(
            ConfigError(
                "cannot delete a slice: a deployment's replicas are its slices; change its "
                "replicas and apply it, or `gpuvisor delete deployment NAME -t TENANT`"
            )
        )
    _check_tenant(plural, tenant)
    client = node_client(url, key, state)
    try:
        client.request(
            "DELETE", f"/api/v1/{plural}/{name}", params={"tenant": tenant} if tenant else {}
        )
    except GpuvisorError as exc:
        fail(exc)
    stdout_console().print(f"{plural[:-1]}/{name} deleted", highlight=False)
