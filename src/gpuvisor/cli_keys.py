"""`gpuvisor keys`: create, list and revoke a node's API keys (registered on the app in
cli.py)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console

from gpuvisor.cli_options import (
    KeyOpt,
    OutputFormat,
    OutputOpt,
    StateOpt,
    UrlOpt,
    check_tenant_exists,
    choice_parser,
    fail,
    node_client,
    print_data,
    stdout_console,
)
from gpuvisor.errors import GpuvisorError

__all__ = ["keys_app"]

err_console = Console(stderr=True)

keys_app = typer.Typer(
    help="Create, list and revoke API keys (needs the admin key).", no_args_is_help=True
)


@keys_app.command("create")
def keys_create(
    tenant: Annotated[
        str | None,
        typer.Option("--tenant", "-t", metavar="TENANT", help="the tenant a tenant key belongs to"),
    ] = None,
    role: Annotated[
        str,
        typer.Option(
            help="tenant, operator or admin",
            parser=choice_parser("--role", ("tenant", "operator", "admin")),
        ),
    ] = "tenant",
    description: Annotated[str, typer.Option(help="what the key is for")] = "",
    expires_in: Annotated[str | None, typer.Option(help="lifetime, e.g. 720h")] = None,
    url: UrlOpt = None,
    key: KeyOpt = None,
    state: StateOpt = None,
) -> None:
    """Create a key; the secret is printed once and only its hash is stored."""
    client = node_client(url, key, state)
    body: dict[str, Any] = {"role": role, "tenant": tenant, "description": description}
    if expires_in:
        body["expiresIn"] = expires_in
    try:
        created = client.request("POST", "/api/v1/keys", json=body)
    except GpuvisorError as exc:
        fail(exc)
    err_console.print(
        f"created {created['id']} ({role}{' of ' + tenant if tenant else ''}); "
        "store the key now, it is not shown again:",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    print(created["key"])


@keys_app.command("list")
def keys_list(
    tenant: Annotated[
        str | None,
        typer.Option("--tenant", "-t", metavar="TENANT", help="only the keys of this tenant"),
    ] = None,
    url: UrlOpt = None,
    key: KeyOpt = None,
    state: StateOpt = None,
    output: OutputOpt = OutputFormat.table,
) -> None:
    """List keys (ids, roles, tenants, expiry) — never the secrets."""
    client = node_client(url, key, state)
    try:
        data = client.request("GET", "/api/v1/keys", params={"tenant": tenant} if tenant else {})
        if tenant and not data["items"]:
            check_tenant_exists(client, tenant)  # the node lists an unknown tenant's as none
    except GpuvisorError as exc:
        fail(exc)
    if output != OutputFormat.table:
        print_data(data, output)
        return
    from gpuvisor.cli_tables import render_table

    stdout_console().print(render_table("keys", data["items"]))


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="the key id, e.g. gvk_ab12cd34")],
    url: UrlOpt = None,
    key: KeyOpt = None,
    state: StateOpt = None,
) -> None:
    """Revoke a key: effective on its next request. A revoked key stays as it is (and this
    says since when)."""
    client = node_client(url, key, state)
    try:
        answer = client.request("DELETE", f"/api/v1/keys/{key_id}")
    except GpuvisorError as exc:
        fail(exc)
    # the node's id, never what was typed: a whole key pasted in place of its id is a secret
    revoked, since = answer["revoked"], answer.get("already_revoked_at")
    if since:
        message = f"key {revoked} was already revoked at {str(since)[:19]}Z"
    else:
        message = f"{revoked} revoked"
    stdout_console().print(message, highlight=False)
