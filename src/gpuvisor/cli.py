"""The `gpuvisor` command line: run a node, and manage one like kubectl manages a cluster."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from gpuvisor import __version__
from gpuvisor.cli_apply import apply_command
from gpuvisor.cli_audit import audit_app
from gpuvisor.cli_bench import bench_app
from gpuvisor.cli_keys import keys_app
from gpuvisor.cli_models import models_app
from gpuvisor.cli_observe import top
from gpuvisor.cli_options import (
    KeyOpt,
    OutputFormat,
    OutputOpt,
    StateOpt,
    TenantOpt,
    UrlOpt,
    check_tenant_exists,
    choice_parser,
    fail,
    node_client,
    print_data,
    stdout_console,
    tenant_option,
)
from gpuvisor.cli_plan import plan_command
from gpuvisor.errors import ConfigError, GpuvisorError, NotFound
from gpuvisor.logs import LOG_FORMATS, LOG_LEVELS

if TYPE_CHECKING:
    from gpuvisor.client import NodeClient

__all__ = ["app", "main"]

# for the node's and the benchmarks' own output, which is written with markup
console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    name="gpuvisor",
    help="Virtual GPUs for multi-tenant inference: run a node (`up`) and manage it.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(keys_app, name="keys")  # keys live in cli_keys.py
app.add_typer(bench_app, name="bench")  # benchmarks live in cli_bench.py
app.command("plan")(plan_command)
app.add_typer(audit_app, name="audit")  # the audit log lives in cli_audit.py
app.add_typer(models_app, name="models")  # model signing lives in cli_models.py


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


def _print_version(value: bool) -> None:
    if value:
        print(f"gpuvisor {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_version, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """The root: its help is the app's; it only takes --version."""


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


@app.command()
def up(
    host: Annotated[
        str, typer.Option(help="address to listen on (loopback by default)")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(metavar="PORT", min=1, max=65535, help="port to listen on")
    ] = 8700,
    state: StateOpt = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="node configuration (kind: Node)")
    ] = None,
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            metavar="URL",
            help="database URL: sqlite:///PATH (its directory must exist) or "
            "postgresql://USER@HOST/DATABASE; default sqlite in the state dir",
        ),
    ] = None,
    demo: Annotated[
        bool | None,
        typer.Option(
            "--demo/--no-demo", help="set up the demo (default: only when there is no --config)"
        ),
    ] = None,
    log_level: Annotated[
        str,
        typer.Option(
            metavar="LEVEL",
            parser=choice_parser("--log-level", LOG_LEVELS, case_sensitive=False),
            help=f"{', '.join(LOG_LEVELS[:-1])} or {LOG_LEVELS[-1]} (any case)",
        ),
    ] = "INFO",
    log_format: Annotated[
        str,
        typer.Option(
            metavar="[text|json]",
            parser=choice_parser("--log-format", LOG_FORMATS),
            help="text (key=value lines) or json (one object per line)",
        ),
    ] = "text",
) -> None:
    """Run a node in the foreground. With no --config it serves a demo: sample models for three
    tenants, their keys and copy-paste examples are printed once it is ready. Stop it with Ctrl-C."""
    import asyncio

    from gpuvisor.serve import event_loop_factory, serve_node

    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            code = runner.run(
                serve_node(host, port, state, config, db, demo, log_level, log_format, console)
            )
    except GpuvisorError as exc:
        fail(exc)
    except KeyboardInterrupt:
        code = 0
    raise typer.Exit(code)


app.command("apply")(apply_command)  # lives in cli_apply.py


@app.command()
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
        if tenant and not data["items"]:
            check_tenant_exists(client, tenant)  # none of an unknown tenant's is not "none"
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


@app.command()
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
DeviceArg = Annotated[str, typer.Argument(help="the device id, as `gpuvisor get devices` shows it")]
ReasonOpt = Annotated[str, typer.Option("--reason", "-r", help="why (kept in the audit log)")]


def _device_action(
    action: str,
    device: str,
    body: dict[str, str] | None,
    url: str | None,
    key: str | None,
    state: str | None,
    wait: float = 0.0,
) -> None:
    """POST a device action and print where the device's slices are now; ``wait``: the
    seconds a drain may wait for them to settle."""
    client = node_client(url, key, state)
    try:
        result = client.request(
            "POST",
            f"/api/v1/devices/{device}/{action}",
            json=body,
            params={"timeout": wait} if wait else {},
            timeout=wait + 30,
        )
    except GpuvisorError as exc:
        fail(exc)
    verb = {"cordon": "cordoned", "drain": "drained", "uncordon": "uncordoned"}[action]
    note = (
        ""
        if result["changed"]
        else f" (it already was {'cordoned' if result['cordoned'] else 'uncordoned'})"
    )
    out = stdout_console()
    out.print(f"device/{device} {verb}{note}", highlight=False)
    for sl in result["slices"]:
        where = f"on {sl['device']}" if sl.get("device") else "on no device"
        out.print(f"  {sl['id']}: {sl['state']} {where}  {sl.get('reason', '')}", highlight=False)
    stranded = [sl for sl in result["slices"] if sl["state"] == "Pending"]
    if stranded and action != "uncordon":
        out.print(
            f"warning: {len(stranded)} slice(s) found no other device with room and serve "
            f"nothing until one has room or `gpuvisor uncordon {device}`",
            highlight=False,
        )


@app.command()
def cordon(
    device: DeviceArg,
    reason: ReasonOpt = "",
    url: UrlOpt = None,
    key: KeyOpt = None,
    state: StateOpt = None,
) -> None:
    """Take a device out of placement: its slices move to other devices of their pools now
    (or wait Pending with reasons); disallowMigration slices stay. Kept across restarts."""
    _device_action("cordon", device, {"reason": reason}, url, key, state)


@app.command()
def drain(
    device: DeviceArg,
    reason: ReasonOpt = "",
    timeout: Annotated[
        float,
        typer.Option(
            metavar="SECONDS",
            min=1,
            max=600,
            help="seconds to wait for the slices to settle, at most 600",
        ),
    ] = 60.0,
    url: UrlOpt = None,
    key: KeyOpt = None,
    state: StateOpt = None,
) -> None:
    """Cordon a device and wait until its slices are Ready elsewhere (or Pending with reasons)."""
    _device_action("drain", device, {"reason": reason}, url, key, state, timeout)


@app.command()
def uncordon(
    device: DeviceArg, url: UrlOpt = None, key: KeyOpt = None, state: StateOpt = None
) -> None:
    """Return a cordoned device to placement; Pending slices may then be placed on it."""
    _device_action("uncordon", device, None, url, key, state)


@app.command()
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


@app.command()
def status(
    url: UrlOpt = None,
    key: KeyOpt = None,
    state: StateOpt = None,
    output: OutputOpt = OutputFormat.table,
) -> None:
    """Show whether the node is ready, since when, and how many slices are in each state
    (`-o yaml` or `-o json`: the API's answer as it is)."""
    client = node_client(url, key, state)
    try:
        data = client.request("GET", "/api/v1/status")
    except GpuvisorError as exc:
        fail(exc)
    if output != OutputFormat.table:
        print_data(data, output)
        return
    from gpuvisor.cli_tables import render_status

    stdout_console().print(render_status(data, client.url, time.time()), highlight=False)


@app.command()
def version() -> None:
    """Print gpuvisor's version."""
    print(f"gpuvisor {__version__}")


app.command()(top)  # observability commands live in cli_observe.py


def main() -> None:
    app()
