"""`gpuvisor bench isolation`: a latency-critical tenant next to a batch tenant saturating the
device. Reports the critical tenant's p99 co-located ÷ its p99 alone, under gpuvisor and under
the naive baseline (each model in its own free-running server process, no dispatcher), and how
much of the device time the critical tenant leaves free the batch tenant still gets."""

from __future__ import annotations

import datetime as dt
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from gpuvisor.bench.floor import FloorProcess
from gpuvisor.bench.harness import Reporter, run_and_report, workdir
from gpuvisor.bench.loadgen import LoadResult, machine_info
from gpuvisor.bench.mlp import BenchModel, measure_cost
from gpuvisor.bench.oip_clients import SaturatingLoad, Target, run_open_loop
from gpuvisor.bench.scenario import TenantPlan, cpu_seconds, start_node

__all__ = [
    "BATCH_MODEL",
    "CRITICAL_MODEL",
    "IsolationConfig",
    "IsolationReport",
    "IsolationRun",
    "isolation_command",
    "render_isolation",
    "run_isolation",
]

CRITICAL_MODEL = BenchModel("critical-mlp", (512, 2048, 2048, 16))  # ~0.5 ms a row here
BATCH_MODEL = BenchModel("batch-mlp", (1024, 2048, 2048, 2048, 16))  # ~5 ms per 16 rows
GPUVISOR, NAIVE = "gpuvisor", "naive"
LABELS = {
    GPUVISOR: "gpuvisor (one dispatcher, critical class + share)",
    NAIVE: "naive: two free-running servers",
}
BUSY_SOURCE = {
    GPUVISOR: "gpuvisor_device_busy_seconds_total deltas (/metrics)",
    NAIVE: "server process CPU time deltas (psutil), HTTP handling included",
}
FREE_TIME_TARGET = 0.80


@dataclass
class IsolationConfig:
    """What to measure and how hard; ``rate`` None derives the arrival rate from ``load``."""

    duration: float = 6.0  # seconds of critical traffic per measured window
    repeat: int = 3
    load: float = 0.30  # critical arrivals as a fraction of its solo closed-loop capacity
    rate: float | None = None  # critical arrivals per second (overrides load)
    batch_concurrency: int = 8  # batch requests kept in flight
    batch_rows: int = 16  # rows per batch request
    batch_max_batch_size: int | None = None  # the batch Deployment's maxBatchSize, in rows
    # (None: batch_rows, one request per batch; a request may not have more rows than it)
    critical_share: float = 0.5  # the critical Profile's computeShare
    quantum_ms: float | None = None  # the node's cpu.quantum; None: the node's default
    lookahead_ms: float | None = None  # the node's cpu.lookahead; None: the node's default
    batch_nice: int | None = None  # the node's workers.batchNice; None: the node's default
    client_threads: int = 6  # connections of the open-loop client
    seed: int = 1
    workdir: Path | None = None


@dataclass
class IsolationRun:
    """One round of one system: the critical tenant alone, then next to the batch tenant."""

    system: str
    solo: LoadResult
    colocated: LoadResult
    elapsed: float  # seconds of the co-located window
    critical_busy: float  # device (gpuvisor) or CPU (naive) seconds in that window
    batch_busy: float
    batch_requests: int
    batch_errors: int

    @property
    def p99_ratio(self) -> float:
        return self.colocated.p99_ms / self.solo.p99_ms

    @property
    def free_time_used(self) -> float:
        """batch busy ÷ (elapsed − critical busy): the batch tenant's use of what is left."""
        free = self.elapsed - self.critical_busy
        return self.batch_busy / free if free > 0 else float("nan")

    def summary(self) -> dict[str, Any]:
        return {
            "solo": self.solo.summary(),
            "colocated": self.colocated.summary(),
            "p99_ratio": self.p99_ratio,
            "elapsed_s": self.elapsed,
            "critical_busy_s": self.critical_busy,
            "batch_busy_s": self.batch_busy,
            "batch_free_time_used": self.free_time_used,
            "batch_requests_per_s": self.batch_requests / self.elapsed,
            "batch_errors": self.batch_errors,
        }


@dataclass
class IsolationReport:
    config: IsolationConfig
    machine: dict[str, Any]
    started: str
    rate: float = 0.0
    capacity: dict[str, float] = field(default_factory=dict)
    costs_ms: dict[str, float] = field(default_factory=dict)
    runs: dict[str, list[IsolationRun]] = field(default_factory=dict)
    seconds: float = 0.0

    def median(self, system: str, figure: Callable[[IsolationRun], float]) -> float:
        runs = self.runs.get(system, [])
        return statistics.median(figure(r) for r in runs) if runs else float("nan")

    def medians(self, system: str) -> dict[str, float]:
        return {
            "solo_p50_ms": self.median(system, lambda r: r.solo.p50_ms),
            "solo_p99_ms": self.median(system, lambda r: r.solo.p99_ms),
            "colocated_p50_ms": self.median(system, lambda r: r.colocated.p50_ms),
            "colocated_p99_ms": self.median(system, lambda r: r.colocated.p99_ms),
            "p99_ratio": self.median(system, lambda r: r.p99_ratio),
            "batch_free_time_used": self.median(system, lambda r: r.free_time_used),
            "batch_requests_per_s": self.median(system, lambda r: r.batch_requests / r.elapsed),
            "critical_busy_fraction": self.median(system, lambda r: r.critical_busy / r.elapsed),
        }

    def to_json(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "benchmark": "isolation",
            "started": self.started,
            "seconds": self.seconds,
            "machine": self.machine,
            "config": {
                "duration_s": cfg.duration,
                "repeat": cfg.repeat,
                "load": cfg.load,
                "rate_per_s": self.rate,
                "batch_concurrency": cfg.batch_concurrency,
                "batch_rows": cfg.batch_rows,
                "batch_max_batch_size": cfg.batch_max_batch_size or cfg.batch_rows,
                "critical_share": cfg.critical_share,
                "quantum_ms": cfg.quantum_ms,
                "lookahead_ms": cfg.lookahead_ms,
                "batch_nice": cfg.batch_nice,
                "client_threads": cfg.client_threads,
                "seed": cfg.seed,
                "client": "http.client keep-alive, binary OIP bodies; open loop (Poisson), "
                "latency from the scheduled arrival",
            },
            "models": {m.name: {"widths": list(m.widths)} for m in (CRITICAL_MODEL, BATCH_MODEL)},
            "model_cost_ms": self.costs_ms,
            "solo_capacity_per_s": self.capacity,
            "systems": {
                name: {
                    "label": LABELS[name],
                    "busy_source": BUSY_SOURCE[name],
                    "median": self.medians(name),
                    "runs": [r.summary() for r in runs],
                }
                for name, runs in self.runs.items()
            },
            "targets": {"batch_free_time_used": FREE_TIME_TARGET},
        }


Busy = Callable[[], dict[str, float]]


def _round(
    system: str,
    critical: Target,
    batch: Target,
    busy: Busy,
    config: IsolationConfig,
    rate: float,
    seed: int,
    out: Reporter,
) -> IsolationRun:
    """Measure the critical tenant alone, then next to the saturating batch tenant."""
    inputs = CRITICAL_MODEL.inputs(1)
    threads = config.client_threads
    out.phase(f"{system}: critical tenant alone, {rate:.0f}/s")
    solo = run_open_loop(f"{system}-solo", critical, inputs, rate, config.duration, seed, threads)
    out.phase(f"{system}: critical tenant next to the batch tenant")
    load = SaturatingLoad(config.duration + 1.0)
    load.add(batch, BATCH_MODEL.inputs(config.batch_rows), config.batch_concurrency)
    load.start()
    try:
        before, began = busy(), time.perf_counter()
        colocated = run_open_loop(
            f"{system}-colocated", critical, inputs, rate, config.duration, seed, threads
        )
        after, elapsed = busy(), time.perf_counter() - began
        counts = load.finish()
    finally:
        load.kill()
    return IsolationRun(
        system,
        solo,
        colocated,
        elapsed,
        after["critical"] - before["critical"],
        after["batch"] - before["batch"],
        counts[0][0],
        counts[0][1],
    )


def _capacity(target: Target, seconds: float = 2.0) -> float:
    """Closed-loop requests/s of the critical model alone (4 connections)."""
    load = SaturatingLoad(seconds)
    load.add(target, CRITICAL_MODEL.inputs(1), 4)
    load.start()
    return load.finish()[0][0] / seconds


def run_isolation(config: IsolationConfig, out: Reporter | None = None) -> IsolationReport:
    """Run ``config.repeat`` rounds of gpuvisor and of the naive baseline (interleaved) and
    return every round. Every child process is stopped by PID before this returns or raises.
    Raises RuntimeError when a server does not start."""
    out = out or Reporter()
    began = time.perf_counter()
    report = IsolationReport(
        config,
        machine_info(),
        dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        runs={GPUVISOR: [], NAIVE: []},
    )
    with ExitStack() as stack:
        root = stack.enter_context(workdir(config.workdir))
        out.phase("starting the gpuvisor node (critical + batch tenants)")
        plans = [
            TenantPlan(
                "critical",
                CRITICAL_MODEL,
                share=config.critical_share,
                latency_class="critical",
                max_batch_size=8,
            ),
            TenantPlan(
                "batch",
                BATCH_MODEL,
                latency_class="batch",
                max_batch_size=config.batch_max_batch_size or config.batch_rows,
            ),
        ]
        node = stack.enter_context(
            start_node(
                plans,
                root / "gpuvisor",
                quantum_ms=config.quantum_ms,
                lookahead_ms=config.lookahead_ms,
                batch_nice=config.batch_nice,
            )
        )
        paths = {
            m.name: root / "gpuvisor" / "models" / f"{m.name}.onnx"
            for m in (CRITICAL_MODEL, BATCH_MODEL)
        }
        out.phase("measuring the models")
        report.costs_ms = {
            f"{CRITICAL_MODEL.name} x1": measure_cost(
                paths[CRITICAL_MODEL.name], CRITICAL_MODEL.inputs(1)
            )
            * 1e3,
            f"{BATCH_MODEL.name} x{config.batch_rows}": measure_cost(
                paths[BATCH_MODEL.name], BATCH_MODEL.inputs(config.batch_rows)
            )
            * 1e3,
        }
        out.phase("starting the naive servers")
        floors = {}
        for m in (CRITICAL_MODEL, BATCH_MODEL):
            floor = FloorProcess(paths[m.name], m.name, log_path=root / f"{m.name}.floor.log")
            floors[m.name] = stack.enter_context(floor)
        targets = {
            GPUVISOR: (node.target("critical"), node.target("batch")),
            NAIVE: (
                Target(floors[CRITICAL_MODEL.name].address, CRITICAL_MODEL.name),
                Target(floors[BATCH_MODEL.name].address, BATCH_MODEL.name),
            ),
        }
        pids = {
            "critical": floors[CRITICAL_MODEL.name].process.pid,  # type: ignore[union-attr]
            "batch": floors[BATCH_MODEL.name].process.pid,  # type: ignore[union-attr]
        }
        busy: dict[str, Busy] = {
            GPUVISOR: node.busy,
            NAIVE: lambda: {tenant: cpu_seconds(pid) for tenant, pid in pids.items()},
        }
        if config.rate is None:
            out.phase("measuring the critical tenant's solo capacity")
            report.capacity = {name: _capacity(t[0]) for name, t in targets.items()}
            report.rate = config.load * min(report.capacity.values())
        else:
            report.rate = config.rate
        for name, (critical, _) in targets.items():  # warm-up: connections, arenas, caches
            out.phase(f"warm-up: {name}")
            run_open_loop(f"{name}-warmup", critical, CRITICAL_MODEL.inputs(1), report.rate, 1.0, 0)
        for round_ in range(config.repeat):
            for name, (critical, batch) in targets.items():
                out.phase(f"round {round_ + 1}/{config.repeat}: {name}")
                report.runs[name].append(
                    _round(
                        name,
                        critical,
                        batch,
                        busy[name],
                        config,
                        report.rate,
                        config.seed + round_,
                        out,
                    )
                )
    report.seconds = time.perf_counter() - began
    return report


def render_isolation(report: IsolationReport, console: Console) -> None:
    """Print the medians table and the verdicts."""
    cfg = report.config
    table = Table(
        title=f"Isolation: critical tenant at {report.rate:.0f} req/s (Poisson) next to a batch "
        f"tenant with {cfg.batch_concurrency} × {cfg.batch_rows}-row requests in flight; "
        f"medians of {cfg.repeat} runs of {cfg.duration:g}s",
        title_justify="left",
    )
    for column in ("system", "alone p50", "alone p99", "co-located p50", "co-located p99"):
        table.add_column(column, justify="left" if column == "system" else "right")
    table.add_column("p99 ratio", justify="right")
    table.add_column("batch req/s", justify="right")
    table.add_column("batch use of free time", justify="right")
    for name in report.runs:
        m = report.medians(name)
        table.add_row(
            LABELS[name],
            f"{m['solo_p50_ms']:.2f} ms",
            f"{m['solo_p99_ms']:.2f} ms",
            f"{m['colocated_p50_ms']:.2f} ms",
            f"{m['colocated_p99_ms']:.2f} ms",
            f"{m['p99_ratio']:.2f}×",
            f"{m['batch_requests_per_s']:.0f}",
            f"{m['batch_free_time_used']:.0%}",
        )
    console.print(table)
    for name, runs in report.runs.items():
        ratios = ", ".join(f"{r.p99_ratio:.2f}×" for r in runs)
        console.print(
            f"  {name}: p99 ratio per run {ratios}; busy from {BUSY_SOURCE[name]}", highlight=False
        )
    costs = ", ".join(f"{k} {v:.2f} ms" for k, v in report.costs_ms.items())
    capacity = ", ".join(f"{k} {v:.0f}/s" for k, v in report.capacity.items())
    capacity = capacity or "not measured (--rate given)"
    console.print(
        f"  model cost (1 thread): {costs}; critical solo capacity: {capacity}", highlight=False
    )
    used = report.medians(GPUVISOR)["batch_free_time_used"]
    verdict = "[green]meets[/green]" if used >= FREE_TIME_TARGET else "[red]misses[/red]"
    console.print(
        f"gpuvisor: the batch tenant used {used:.0%} of the device time the critical tenant "
        f"left free ({verdict} the {FREE_TIME_TARGET:.0%} target)"
    )


def isolation_command(config: IsolationConfig, output: Path, console: Console) -> int:
    """Run the benchmark with a progress bar, print the report, write its JSON to ``output``.
    Returns 0 when every request was answered, 1 otherwise."""
    report = run_and_report(
        console, output, lambda reporter: run_isolation(config, reporter), render_isolation
    )
    failed = any(
        r.solo.errors or r.colocated.errors or r.batch_errors
        for runs in report.runs.values()
        for r in runs
    )
    return 1 if failed else 0
