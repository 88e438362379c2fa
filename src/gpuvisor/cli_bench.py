"""`gpuvisor bench`: the benchmarks, each gpuvisor against a naive baseline side by side
(registered on the app in cli.py; each benchmark's module is imported only when it runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from gpuvisor.cli_observe import bench_sampler
from gpuvisor.cli_options import count_option, fail, run_bench
from gpuvisor.cli_plan import bench_placement
from gpuvisor.errors import ConfigError

__all__ = ["bench_app"]

# the benchmarks' own output, written with markup
console = Console()

bench_app = typer.Typer(
    help="Benchmarks: gpuvisor against a naive baseline, side by side.", no_args_is_help=True
)


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
    run_bench(lambda: overhead_command(config, output, console), output)


RepeatOpt = Annotated[int, count_option("measured runs; medians are reported")]
QuantumOpt = Annotated[
    float | None,
    typer.Option(
        min=0.01,
        metavar="MS",
        help="the nodes' cpu.quantum in milliseconds (default: the node's default)",
    ),
]
LookaheadOpt = Annotated[
    float | None,
    typer.Option(
        min=0.0,
        metavar="MS",
        help="the nodes' cpu.lookahead in milliseconds, 0 for none (default: the node's default)",
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
        int | None,
        count_option(
            "the batch Deployment's maxBatchSize, in rows, at least --batch-rows "
            "[default: --batch-rows, one request per batch]"
        ),
    ] = None,
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

    if batch_max_batch_size is not None and batch_max_batch_size < batch_rows:
        fail(
            ConfigError(
                f"--batch-max-batch-size {batch_max_batch_size} is less than --batch-rows "
                f"{batch_rows}: the node refuses a request with more rows than its deployment's "
                "maxBatchSize; give at least --batch-rows"
            )
        )
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
    run_bench(lambda: isolation_command(config, output, console), output)


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
    run_bench(lambda: fairness_command(config, output, console), output)


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
    from gpuvisor.demo.models import DEMO_MODEL_NAMES

    try:
        parsed = tuple(int(part) for part in sizes.split(",") if part.strip())
    except ValueError:
        fail(ConfigError(f"--sizes must be integers separated by commas, got {sizes!r}"))
    if 1 not in parsed or any(size < 1 for size in parsed):
        fail(ConfigError(f"--sizes must be positive and include 1, got {sizes!r}"))
    unknown = [m for m in model or () if m.removesuffix(".onnx") not in DEMO_MODEL_NAMES]
    if unknown:
        fail(
            ConfigError(
                f"--model {unknown[0]!r} is not a demo model; known: {', '.join(DEMO_MODEL_NAMES)}"
            )
        )
    config = BatchingConfig(sizes=parsed, seconds=seconds, repeat=repeat, threads=threads)
    if model:
        config = replace(config, models=tuple(model))
    run_bench(lambda: batching_command(config, output, console), output)


@bench_app.command("decisions")
def bench_decisions(
    slices: Annotated[int, count_option("backlogged slices on the device")] = 100,
    decisions: Annotated[int, count_option("decisions timed per policy", minimum=100)] = 20000,
    output: Annotated[Path, ResultsOpt] = Path("bench-results/decisions.json"),
) -> None:
    """Decision cost: the dispatcher's own time per decision (p50/p99 in microseconds) with
    many backlogged slices, fair-share policy against FIFO."""
    from gpuvisor.bench.decisions import decisions_command

    run_bench(lambda: decisions_command(slices, decisions, output, console), output)


bench_app.command("placement")(bench_placement)


bench_app.command("sampler")(bench_sampler)
