"""The observability commands of the CLI: `gpuvisor top` and `gpuvisor bench sampler`
(registered on the app in cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from gpuvisor.cli_options import KeyOpt, StateOpt, UrlOpt, fail, run_bench, stdout_console
from gpuvisor.errors import GpuvisorError

__all__ = ["bench_sampler", "top"]

console = Console()


def top(
    interval: Annotated[
        float, typer.Option(min=0.2, metavar="SECONDS", help="seconds between refreshes")
    ] = 1.0,
    once: Annotated[bool, typer.Option("--once", help="print one frame and exit")] = False,
    iterations: Annotated[
        int | None,
        typer.Option(min=1, metavar="N", help="refreshes before exiting (default: until Ctrl-C)"),
    ] = None,
    url: UrlOpt = None,
    key: KeyOpt = None,
    state: StateOpt = None,
) -> None:
    """Live view of the node: who waits, who uses each device against its guarantee, memory by
    slice, deployments' latency, slices that are not serving. A tenant key sees its own."""
    from gpuvisor.client import NodeClient
    from gpuvisor.top import run_top

    try:
        client = NodeClient(url, key, state, timeout=10.0)
        # names, models and reasons come from the node: shown as they are, never as markup
        code = run_top(client, stdout_console(), interval, 1 if once else iterations)
    except GpuvisorError as exc:
        fail(exc)
    raise typer.Exit(code)


def bench_sampler(
    seconds: Annotated[
        float, typer.Option(min=1.0, metavar="SECONDS", help="wall seconds measured per period")
    ] = 20.0,
    period: Annotated[
        list[float] | None,
        typer.Option(
            metavar="SECONDS",
            min=0.001,
            help="sampling period in seconds (repeatable; default 1.0, the node's default)",
        ),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(min=0, metavar="N", help="idle worker processes whose memory is sampled"),
    ] = 4,
    output: Annotated[
        Path, typer.Option("--output", "-o", metavar="FILE", help="JSON results file")
    ] = Path("bench-results/sampler.json"),
) -> None:
    """Sampler overhead: the node's telemetry sampler run alone in this process against this
    machine's devices and idle worker processes; CPU seconds per wall second, per period."""
    from gpuvisor.bench.sampler import SamplerBenchConfig, sampler_command

    config = SamplerBenchConfig(seconds=seconds, periods=tuple(period or (1.0,)), workers=workers)
    run_bench(lambda: sampler_command(config, output, console), output)
