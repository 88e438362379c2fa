"""The `gpuvisor` command line: run a node, and manage one like kubectl manages a cluster."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from gpuvisor import __version__
from gpuvisor.cli_audit import audit_app
from gpuvisor.cli_models import models_app
from gpuvisor.cli_observe import bench_sampler, top
from gpuvisor.cli_options import (
    KeyOpt,
    OutputFormat,
    OutputOpt,
    StateOpt,
    TenantOpt,
    UrlOpt,
    count_option,
    fail,
    print_data,
    stdout_console,
)
from gpuvisor.cli_plan import bench_placement, plan_command
from gpuvisor.errors import ConfigError, GpuvisorError, NotFound

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
keys_app = typer.Typer(
    help="Create, list and revoke API keys (needs the admin key).", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")
bench_app = typer.Typer(
    help="Benchmarks: gpuvisor against a naive baseline, side by side.", no_args_is_help=True
)
app.add_typer(bench_app, name="bench")
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


def _plural(kind: str) -> str:
    """Return the plural of ``kind`` (any alias); exit naming the closest kind if there is none."""
    plural = KIND_ALIASES.get(kind.lower())
    if plural is None:
        import difflib

        close = difflib.get_close_matches(kind.lower(), KIND_ALIASES, n=1)
        hint = f": did you mean '{close[0]}'?" if close else ""
        known = ", ".join(sorted(set(KIND_ALIASES.values())))
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


def _client(url: str | None, key: str | None, state: str | None) -> NodeClient:
    from gpuvisor.client import NodeClient

    try:
        return NodeClient(url, key, state)
    except GpuvisorError as exc:
        fail(exc)


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


@app.command()
def apply(
    file: Annotated[
        list[str],
        typer.Option("--filename", "-f", metavar="FILE", help="YAML manifest(s); '-' reads stdin"),
    ],
    url: UrlOpt = None,
    key: KeyOpt = None,
    state: StateOpt = None,
) -> None:
    """Apply manifests (Tenant, Profile, Pool, Model, Deployment): all documents or none.

    A List document (what `get KIND -o yaml` or `-o json` prints) applies its items, in
    order."""
    client, out = _client(url, key, state), stdout_console()
    for name in file:
        if name == "-":
            text, base = sys.stdin.read(), Path.cwd()
        else:
            path = Path(name)
            if not path.is_file():
                fail(GpuvisorError(f"{name}: no such file"))
            text, base = path.read_text(), path.parent
        try:
            result = client.apply(
                text, source=Path(name).name if name != "-" else "stdin", base_dir=base
            )
        except GpuvisorError as exc:
            fail(exc)
        for item in result["results"]:
            owner = f" (tenant {item['tenant']})" if item.get("tenant") else ""
            out.print(
                f"{item['kind'].lower()}/{item['name']}{owner} {item['outcome']}", highlight=False
            )
            for warning in item.get("warnings", ()):
                out.print(f"  warning: {warning}", highlight=False)


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
    client = _client(url, key, state)
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
    tenant: TenantOpt = None,
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

    client = _client(url, key, state)
    try:
        body = client.request(
            "GET", f"/api/v1/deployments/{name}", params={"tenant": tenant} if tenant else {}
        )
    except GpuvisorError as exc:
        fail(exc)
    stdout_console().print(describe_deployment(body), highlight=False)


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
    client = _client(url, key, state)
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
    timeout: Annotated[float, typer.Option(help="seconds to wait for the slices to settle")] = 60.0,
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
    tenant: TenantOpt = None,
    url: UrlOpt = None,
    key: KeyOpt = None,
    state: StateOpt = None,
) -> None:
    """Delete an object; a deployment's workers are drained and stopped."""
    plural = _plural(kind)
    if plural in ("devices", "slices"):
        fail(GpuvisorError(f"cannot delete '{kind}'"))
    _check_tenant(plural, tenant)
    client = _client(url, key, state)
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
    client = _client(url, key, state)
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


@keys_app.command("create")
def keys_create(
    tenant: Annotated[
        str | None,
        typer.Option("--tenant", "-t", metavar="TENANT", help="the tenant a tenant key belongs to"),
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
        fail(exc)
    err_console.print(
        f"created {created['id']} ({role}{' of ' + tenant if tenant else ''}); "
        "store the key now, it is not shown again:",
        highlight=False,
        markup=False,
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
    client = _client(url, key, state)
    try:
        data = client.request("GET", "/api/v1/keys", params={"tenant": tenant} if tenant else {})
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
    client = _client(url, key, state)
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


@bench_app.command("overhead")
def bench_overhead(
    requests: Annotated[int, count_option("requests per measured run")] = 4000,
    threads: Annotated[int, count_option("client threads (closed loop)")] = 8,
    repeat: Annotated[int, count_option("measured runs per system; medians are reported")] = 3,
    warmup: Annotated[int, count_option("warm-up requests per system", minimum=0)] = 400,
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
        fail(exc)
    raise typer.Exit(code)


RepeatOpt = Annotated[int, count_option("measured runs; medians are reported")]
QuantumOpt = Annotated[
    float | None,
    typer.Option(help="the nodes' cpu.quantum in milliseconds (default: the node's default)"),
]
LookaheadOpt = Annotated[
    float | None,
    typer.Option(
        help="the nodes' cpu.lookahead in milliseconds, 0 for none (default: the node's default)"
    ),
]
ResultsOpt = typer.Option("--output", "-o", help="JSON results file")


@bench_app.command("isolation")
def bench_isolation(
    duration: Annotated[
        float,
        typer.Option(
            metavar="SECONDS", min=0.5, help="seconds of critical traffic per measured window"
        ),
    ] = 6.0,
    repeat: RepeatOpt = 3,
    load: Annotated[
        float,
        typer.Option(
            metavar="FRACTION",
            min=0.01,
            max=1.0,
            help="critical arrivals as a fraction of its solo capacity",
        ),
    ] = 0.30,
    rate: Annotated[
        float | None,
        typer.Option(help="critical arrivals per second; overrides --load, skips calibration"),
    ] = None,
    batch_concurrency: Annotated[int, count_option("batch-tenant requests kept in flight")] = 8,
    batch_rows: Annotated[int, count_option("rows per batch-tenant request")] = 16,
    batch_max_batch_size: Annotated[
        int, count_option("the batch Deployment's maxBatchSize (rows)")
    ] = 1,
    critical_share: Annotated[
        float,
        typer.Option(
            metavar="FRACTION", min=0.0, max=1.0, help="the critical Profile's computeShare"
        ),
    ] = 0.5,
    quantum_ms: QuantumOpt = None,
    lookahead_ms: LookaheadOpt = None,
    batch_nice: Annotated[
        int | None,
        count_option(
            "the node's workers.batchNice, 0 for none (default: the node's default)", 0, 19
        ),
    ] = None,
    client_threads: Annotated[int, count_option("connections of the open-loop client")] = 6,
    seed: Annotated[int, typer.Option(help="seed of the arrival schedule")] = 1,
    output: Annotated[Path, ResultsOpt] = Path("bench-results/isolation.json"),
) -> None:
    """Latency isolation: a critical tenant (Poisson arrivals at a fraction of its solo
    capacity) next to a saturating batch tenant, under gpuvisor and under naive co-location
    (independent servers, no dispatcher); p99 co-located / p99 alone for each."""
    from gpuvisor.bench.isolation import IsolationConfig, isolation_command

    config = IsolationConfig(
        duration=duration,
        repeat=repeat,
        load=load,
        rate=rate,
        batch_concurrency=batch_concurrency,
        batch_rows=batch_rows,
        batch_max_batch_size=batch_max_batch_size,
        critical_share=critical_share,
        quantum_ms=quantum_ms,
        lookahead_ms=lookahead_ms,
        batch_nice=batch_nice,
        client_threads=client_threads,
        seed=seed,
    )
    _run_bench(lambda: isolation_command(config, output, console))


@bench_app.command("fairness")
def bench_fairness(
    duration: Annotated[
        float,
        typer.Option(
            metavar="SECONDS", min=0.5, help="seconds per measured window of the weighted test"
        ),
    ] = 8.0,
    short_duration: Annotated[
        float,
        typer.Option(
            metavar="SECONDS",
            min=0.5,
            help="seconds per window of the fixed-share and lone-tenant tests",
        ),
    ] = 5.0,
    repeat: RepeatOpt = 3,
    concurrency: Annotated[int, count_option("requests in flight per tenant")] = 8,
    fixed_share: Annotated[
        float,
        typer.Option(
            metavar="FRACTION",
            min=0.01,
            max=1.0,
            help="computeShare of the lone tenant in the fixed-share pool",
        ),
    ] = 0.25,
    quantum_ms: QuantumOpt = None,
    lookahead_ms: LookaheadOpt = None,
    output: Annotated[Path, ResultsOpt] = Path("bench-results/fairness.json"),
) -> None:
    """Fair share: three saturating tenants weighted 1:2:5 (device-time shares, Jain's index)
    beside naive co-location; a lone fixed-share tenant's cap; a lone best-effort tenant's use
    of an otherwise idle device."""
    from gpuvisor.bench.fairness import FairnessConfig, fairness_command

    config = FairnessConfig(
        duration=duration,
        short_duration=short_duration,
        repeat=repeat,
        concurrency=concurrency,
        fixed_share=fixed_share,
        quantum_ms=quantum_ms,
        lookahead_ms=lookahead_ms,
    )
    _run_bench(lambda: fairness_command(config, output, console))


@bench_app.command("batching")
def bench_batching(
    model: Annotated[
        list[str] | None,
        typer.Option(metavar="MODEL", help="demo model to measure (repeatable; default all)"),
    ] = None,
    sizes: Annotated[str, typer.Option(help="batch sizes, comma-separated; must include 1")] = (
        "1,2,4,8,16"
    ),
    seconds: Annotated[
        float,
        typer.Option(metavar="SECONDS", min=0.05, help="timed seconds per model, size and run"),
    ] = 0.3,
    repeat: RepeatOpt = 3,
    threads: Annotated[int, count_option("intra-op threads of the executor")] = 1,
    output: Annotated[Path, ResultsOpt] = Path("bench-results/batching.json"),
) -> None:
    """Batching: rows/s of each demo model at batch sizes up to 16, against batch 1."""
    from dataclasses import replace

    from gpuvisor.bench.batching import BatchingConfig, batching_command

    try:
        parsed = tuple(int(part) for part in sizes.split(",") if part.strip())
    except ValueError:
        fail(ConfigError(f"--sizes must be integers separated by commas, got {sizes!r}"))
    if 1 not in parsed or any(size < 1 for size in parsed):
        fail(ConfigError(f"--sizes must be positive and include 1, got {sizes!r}"))
    config = BatchingConfig(sizes=parsed, seconds=seconds, repeat=repeat, threads=threads)
    if model:
        config = replace(config, models=tuple(model))
    _run_bench(lambda: batching_command(config, output, console))


@bench_app.command("decisions")
def bench_decisions(
    slices: Annotated[int, count_option("backlogged slices on the device")] = 100,
    decisions: Annotated[int, count_option("decisions timed per policy", minimum=100)] = 20000,
    output: Annotated[Path, ResultsOpt] = Path("bench-results/decisions.json"),
) -> None:
    """Decision cost: the dispatcher's own time per decision (p50/p99 in microseconds) with
    many backlogged slices, fair-share policy against FIFO."""
    from gpuvisor.bench.decisions import decisions_command

    _run_bench(lambda: decisions_command(slices, decisions, output, console))


bench_app.command("placement")(bench_placement)


def _run_bench(command: Callable[[], int]) -> None:
    try:
        code = command()
    except GpuvisorError as exc:
        fail(exc)
    raise typer.Exit(code)


app.command()(top)  # observability commands live in cli_observe.py
bench_app.command("sampler")(bench_sampler)


def main() -> None:
    app()
