"""The `gpuvisor` command line: run a node, and manage one like kubectl manages a cluster."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import yaml
from rich.console import Console
from rich.table import Table

from gpuvisor import __version__
from gpuvisor.client import NodeClient
from gpuvisor.errors import GpuvisorError

__all__ = ["app", "main"]

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    name="gpuvisor",
    help="Virtual GPUs for multi-tenant inference: run a node (`up`) and manage it.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)
keys_app = typer.Typer(
    help="Create, list and revoke API keys (needs the admin key).", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")
bench_app = typer.Typer(
    help="Benchmarks: gpuvisor against a naive baseline, side by side.", no_args_is_help=True
)
app.add_typer(bench_app, name="bench")

UrlOpt = Annotated[
    str | None,
    typer.Option("--url", help="node URL [env GPUVISOR_URL; default http://127.0.0.1:8700]"),
]
KeyOpt = Annotated[
    str | None,
    typer.Option("--key", help="API key [env GPUVISOR_KEY; default the state dir's admin key]"),
]
StateOpt = Annotated[
    str | None,
    typer.Option("--state", help="state directory [env GPUVISOR_STATE; default ~/.gpuvisor]"),
]
OutputOpt = Annotated[str, typer.Option("--output", "-o", help="table, yaml or json")]
TenantOpt = Annotated[
    str | None, typer.Option("--tenant", "-t", help="tenant of tenant-scoped objects")
]

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


def _fail(exc: GpuvisorError) -> NoReturn:
    err_console.print(f"[red]error:[/red] {exc.message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _client(url: str | None, key: str | None, state: str | None) -> NodeClient:
    try:
        return NodeClient(url, key, state)
    except GpuvisorError as exc:
        _fail(exc)


def _print(data: Any, output: str) -> None:
    if output == "json":
        console.print_json(json.dumps(data, default=str))
    else:
        console.print(
            yaml.safe_dump(data, sort_keys=False, default_flow_style=False), end="", highlight=False
        )


@app.command()
def up(
    host: Annotated[
        str, typer.Option(help="address to listen on (loopback by default)")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8700,
    state: StateOpt = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="node configuration (kind: Node)")
    ] = None,
    db: Annotated[
        str | None, typer.Option("--db", help="database URL; default sqlite in the state dir")
    ] = None,
    demo: Annotated[
        bool | None,
        typer.Option(
            "--demo/--no-demo", help="set up the demo (default: only when there is no --config)"
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR")] = "INFO",
    log_format: Annotated[str, typer.Option(help="text or json")] = "text",
) -> None:
    """Run a node in the foreground. With no --config it serves a demo: sample models for three
    tenants, their keys and copy-paste examples are printed once it is ready. Stop it with Ctrl-C."""
    from gpuvisor.serve import event_loop_factory, serve_node

    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            code = runner.run(
                serve_node(host, port, state, config, db, demo, log_level, log_format, console)
            )
    except GpuvisorError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        code = 0
    raise typer.Exit(code)


@app.command()
def apply(
    file: Annotated[
        list[str], typer.Option("--filename", "-f", help="YAML manifest(s); '-' reads stdin")
    ],
    url: UrlOpt = None,
    key: KeyOpt = None,
    state: StateOpt = None,
) -> None:
    """Apply manifests (Tenant, Profile, Pool, Model, Deployment): all documents or none."""
    client = _client(url, key, state)
    for name in file:
        if name == "-":
            text, base = sys.stdin.read(), Path.cwd()
        else:
            path = Path(name)
            if not path.is_file():
                _fail(GpuvisorError(f"{name}: no such file"))
            text, base = path.read_text(), path.parent
        try:
            result = client.apply(
                text, source=Path(name).name if name != "-" else "stdin", base_dir=base
            )
        except GpuvisorError as exc:
            _fail(exc)
        for item in result["results"]:
            owner = f" (tenant {item['tenant']})" if item.get("tenant") else ""
            console.print(
                f"{item['kind'].lower()}/{item['name']}{owner} {item['outcome']}", highlight=False
            )


@app.command()
def get(
    kind: Annotated[
        str, typer.Argument(help="tenants, profiles, pools, models, deployments, devices or slices")
    ],
    name: Annotated[str | None, typer.Argument(help="one object's name")] = None,
    tenant: TenantOpt = None,
    output: OutputOpt = "table",
    url: UrlOpt = None,
    key: KeyOpt = None,
    state: StateOpt = None,
) -> None:
    """List objects of a kind, or show one."""
    plural = KIND_ALIASES.get(kind.lower())
    if plural is None:
        _fail(
            GpuvisorError(
                f"unknown kind '{kind}' (expected one of {', '.join(sorted(set(KIND_ALIASES.values())))})"
            )
        )
    client = _client(url, key, state)
    params = {"tenant": tenant} if tenant else {}
    try:
        if name:
            data = client.request("GET", f"/api/v1/{plural}/{name}", params=params)
            _print(data, "yaml" if output == "table" else output)
            return
        data = client.request("GET", f"/api/v1/{plural}", params=params)
    except GpuvisorError as exc:
        _fail(exc)
    if output != "table":
        _print(data, output)
        return
    from gpuvisor.cli_tables import render_table

    table: Table = render_table(plural, data["items"])
    console.print(table)


@app.command()
def describe(
    kind: Annotated[str, typer.Argument(help="deployment (others print their spec)")],
    name: Annotated[str, typer.Argument(help="the object's name")],
    tenant: TenantOpt = None,
    url: UrlOpt = None,
    key: KeyOpt = None,
    state: StateOpt = None,
) -> None:
    """Show one object with its status: for a deployment, each slice's device, state and reason."""
    get(kind, name, tenant, "yaml", url, key, state)


@app.command()
def delete(
    kind: Annotated[str, typer.Argument(help="tenant, profile, pool, model or deployment")],
    name: Annotated[str, typer.Argument(help="the object's name")],
    tenant: TenantOpt = None,
    url: UrlOpt = None,
    key: KeyOpt = None,
    state: StateOpt = None,
) -> None:
    """Delete an object; a deployment's workers are drained and stopped."""
    plural = KIND_ALIASES.get(kind.lower())
    if plural is None or plural in ("devices", "slices"):
        _fail(GpuvisorError(f"cannot delete '{kind}'"))
    client = _client(url, key, state)
    try:
        client.request(
            "DELETE", f"/api/v1/{plural}/{name}", params={"tenant": tenant} if tenant else {}
        )
    except GpuvisorError as exc:
        _fail(exc)
    console.print(f"{plural[:-1]}/{name} deleted", highlight=False)


@app.command()
def status(
    url: UrlOpt = None, key: KeyOpt = None, state: StateOpt = None, output: OutputOpt = "yaml"
) -> None:
    """Show whether the node is ready and how many slices are in each state."""
    client = _client(url, key, state)
    try:
        _print(client.request("GET", "/api/v1/status"), output)
    except GpuvisorError as exc:
        _fail(exc)


@app.command()
def version() -> None:
    """Print gpuvisor's version."""
    console.print(f"gpuvisor {__version__}", highlight=False)


@keys_app.command("create")
def keys_create(
    tenant: Annotated[
        str | None, typer.Option("--tenant", "-t", help="the tenant a tenant key belongs to")
    ] = None,
    role: Annotated[str, typer.Option(help="tenant, operator or admin")] = "tenant",
    description: Annotated[str, typer.Option(help="what the key is for")] = "",
    expires_in: Annotated[str | None, typer.Option(help="lifetime, e.g. 720h")] = None,
    url: UrlOpt = None,
    key: KeyOpt = None,
    state: StateOpt = None,
) -> None:
    """Create a key; the secret is printed once and only its hash is stored."""
    client = _client(url, key, state)
    body: dict[str, Any] = {"role": role, "tenant": tenant, "description": description}
    if expires_in:
        body["expiresIn"] = expires_in
    try:
        created = client.request("POST", "/api/v1/keys", json=body)
    except GpuvisorError as exc:
        _fail(exc)
    err_console.print(
        f"created {created['id']} ({role}{' of ' + tenant if tenant else ''}); "
        "store the key now, it is not shown again:",
        highlight=False,
    )
    console.print(created["key"], highlight=False)


@keys_app.command("list")
def keys_list(
    tenant: TenantOpt = None,
    url: UrlOpt = None,
    key: KeyOpt = None,
    state: StateOpt = None,
    output: OutputOpt = "table",
) -> None:
    """List keys (ids, roles, tenants, expiry) — never the secrets."""
    client = _client(url, key, state)
    try:
        data = client.request("GET", "/api/v1/keys", params={"tenant": tenant} if tenant else {})
    except GpuvisorError as exc:
        _fail(exc)
    if output != "table":
        _print(data, output)
        return
    from gpuvisor.cli_tables import render_table

    console.print(render_table("keys", data["items"]))


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="the key id, e.g. gvk_ab12cd34")],
    url: UrlOpt = None,
    key: KeyOpt = None,
    state: StateOpt = None,
) -> None:
    """Revoke a key: effective on its next request."""
    client = _client(url, key, state)
    try:
        client.request("DELETE", f"/api/v1/keys/{key_id}")
    except GpuvisorError as exc:
        _fail(exc)
    console.print(f"{key_id} revoked", highlight=False)


@bench_app.command("overhead")
def bench_overhead(
    requests: Annotated[int, typer.Option(min=1, help="requests per measured run")] = 4000,
    threads: Annotated[int, typer.Option(min=1, help="client threads (closed loop)")] = 8,
    repeat: Annotated[
        int, typer.Option(min=1, help="measured runs per system; medians are reported")
    ] = 3,
    warmup: Annotated[int, typer.Option(min=0, help="warm-up requests per system")] = 400,
    output: Annotated[Path, typer.Option("--output", "-o", help="JSON results file")] = Path(
        "bench-results/overhead.json"
    ),
) -> None:
    """Serving overhead: one tritonclient load against onnxruntime called directly, a minimal
    OIP server running the model in-process (the floor), and gpuvisor end to end."""
    from gpuvisor.bench.overhead import OverheadConfig, overhead_command

    config = OverheadConfig(requests=requests, threads=threads, repeat=repeat, warmup=warmup)
    try:
        code = overhead_command(config, output, console)
    except GpuvisorError as exc:
        _fail(exc)
    raise typer.Exit(code)


def main() -> None:
    app()
