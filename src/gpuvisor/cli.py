"""The `gpuvisor` command line: run a node, and manage one like kubectl manages a cluster."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from gpuvisor import __version__
from gpuvisor.cli_apply import apply_command
from gpuvisor.cli_audit import audit_app
from gpuvisor.cli_bench import bench_app
from gpuvisor.cli_devices import cordon, drain, uncordon
from gpuvisor.cli_keys import keys_app
from gpuvisor.cli_models import models_app
from gpuvisor.cli_objects import delete, describe, get
from gpuvisor.cli_observe import top
from gpuvisor.cli_options import (
    KeyOpt,
    OutputFormat,
    OutputOpt,
    StateOpt,
    UrlOpt,
    choice_parser,
    expand_home,
    fail,
    node_client,
    print_data,
    stdout_console,
)
from gpuvisor.cli_plan import plan_command
from gpuvisor.errors import GpuvisorError
from gpuvisor.logs import LOG_FORMATS, LOG_LEVELS

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
        Path | None,
        typer.Option(
            "--config", "-c", help="node configuration (kind: Node)", callback=expand_home
        ),
    ] = None,
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            metavar="URL",
            help="database URL: sqlite:///RELATIVE/PATH or sqlite:////ABSOLUTE/PATH (its "
            "directory must exist), or postgresql://USER@HOST/DATABASE; default sqlite in the "
            "state dir",
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
app.command()(get)  # get, describe and delete live in cli_objects.py
app.command()(describe)
app.command()(cordon)  # cordon, drain and uncordon live in cli_devices.py
app.command()(drain)
app.command()(uncordon)
app.command()(delete)


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
