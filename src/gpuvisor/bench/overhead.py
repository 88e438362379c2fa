"""`gpuvisor bench overhead`: what gpuvisor's serving path costs, measured with one client
against (a) the model called directly in onnxruntime, (b) the serving floor (the smallest
OIP endpoint on the same HTTP stack, model in-process) and (c) gpuvisor end to end."""

from __future__ import annotations

import datetime as dt
import tempfile
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from gpuvisor.bench.floor import FloorProcess
from gpuvisor.bench.loadgen import (
    CallFactory,
    LoadResult,
    machine_info,
    median_result,
    results_table,
    run_closed_loop,
    triton_call_factory,
    write_json,
)
from gpuvisor.bench.overhead_systems import (
    build_model,
    direct_call_factory,
    direct_session,
    fetch_outputs,
    start_gpuvisor,
)
from gpuvisor.demo.models import sample_inputs

__all__ = [
    "SYSTEMS",
    "OverheadConfig",
    "OverheadReport",
    "overhead_command",
    "render_report",
    "run_overhead",
]

Array = np.ndarray[Any, Any]

DIRECT, FLOOR, GPUVISOR = "direct", "floor", "gpuvisor"
SYSTEMS: dict[str, str] = {
    DIRECT: "(a) onnxruntime, direct",
    FLOOR: "(b) floor: minimal OIP server",
    GPUVISOR: "(c) gpuvisor, end to end",
}
TARGET = 0.70  # gpuvisor's throughput as a fraction of the floor's (the acceptance bar)


@dataclass
class OverheadConfig:
    """What to measure and how hard."""

    requests: int = 4000
    threads: int = 8
    repeat: int = 3
    warmup: int = 400
    model: str = "basket-scorer"
    batch: int = 1  # rows per request
    max_batch_size: int = 8
    workdir: Path | None = None  # default: a temporary directory, removed afterwards


@dataclass
class OverheadReport:
    """The runs of every system, their medians, and gpuvisor's figures relative to the floor."""

    config: OverheadConfig
    machine: dict[str, Any]
    started: str
    runs: dict[str, list[LoadResult]] = field(default_factory=dict)
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # vs direct onnxruntime

    @property
    def medians(self) -> dict[str, LoadResult]:
        return {name: median_result(runs) for name, runs in self.runs.items() if runs}

    @property
    def ratios(self) -> dict[str, float]:
        """gpuvisor ÷ floor: throughput (higher is better), p50 and p99 (lower is better)."""
        medians = self.medians
        c, b = medians.get(GPUVISOR), medians.get(FLOOR)
        if c is None or b is None or not b.rps:
            return {}
        return {"throughput": c.rps / b.rps, "p50": c.p50_ms / b.p50_ms, "p99": c.p99_ms / b.p99_ms}

    def to_json(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "benchmark": "overhead",
            "started": self.started,
            "machine": self.machine,
            "config": {
                "model": cfg.model,
                "batch": cfg.batch,
                "requests": cfg.requests,
                "threads": cfg.threads,
                "repeat": cfg.repeat,
                "warmup": cfg.warmup,
                "maxBatchSize": cfg.max_batch_size,
                "client": "tritonclient.http, binary tensors",
            },
            "systems": {
                name: {
                    "label": SYSTEMS[name],
                    "median": r.summary(),
                    "runs": [run.summary() for run in self.runs[name]],
                }
                for name, r in self.medians.items()
            },
            "software": serving_stack(),
            "ratios": {"gpuvisor_over_floor": self.ratios, "target_throughput": TARGET},
            "outputs_max_abs_diff_vs_direct": self.max_abs_diff,
        }


def serving_stack() -> dict[str, str]:
    """Return the versions of what serves (b) and (c), and which HTTP parser and event loop
    uvicorn's "auto" settings pick here (httptools and uvloop only when installed)."""
    from importlib import metadata
    from importlib.util import find_spec

    versions = {}
    for package in ("fastapi", "starlette", "uvicorn", "onnxruntime", "pyzmq", "tritonclient"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    versions["http"] = "httptools" if find_spec("httptools") else "h11"
    versions["loop"] = "uvloop" if find_spec("uvloop") else "asyncio"
    return versions


class Reporter(Protocol):
    """Where run_overhead says what it is doing (a progress bar in the CLI)."""

    def phase(self, description: str, total: int | None = None) -> None: ...

    def advance(self, done: int) -> None: ...


class _Silent:
    def phase(self, description: str, total: int | None = None) -> None:
        pass

    def advance(self, done: int) -> None:
        pass


# ---- the benchmark ------------------------------------------------------------------------


def _max_abs_diff(expected: Mapping[str, Array], got: Mapping[str, Array], system: str) -> float:
    """Return the largest absolute difference; raise AssertionError when outputs disagree."""
    if set(expected) != set(got):
        raise AssertionError(
            f"{system} returned outputs {sorted(got)}, expected {sorted(expected)}"
        )
    worst = 0.0
    for name, want in expected.items():
        have = got[name]
        if have.shape != want.shape or have.dtype != want.dtype:
            raise AssertionError(
                f"{system} output '{name}' is {have.dtype}{list(have.shape)}, "
                f"expected {want.dtype}{list(want.shape)}"
            )
        if not np.allclose(have, want, rtol=1e-5, atol=1e-6):
            raise AssertionError(
                f"{system} output '{name}' differs from onnxruntime's: {have} vs {want}"
            )
        if have.size:
            worst = max(
                worst, float(np.max(np.abs(have.astype(np.float64) - want.astype(np.float64))))
            )
    return worst


def run_overhead(config: OverheadConfig, reporter: Reporter | None = None) -> OverheadReport:
    """Measure (a) direct onnxruntime, (b) the floor and (c) gpuvisor, ``config.repeat``
    rounds each (interleaved, so drift hits all three alike), after one warm-up each.

    Before measuring, one answer of (b) and of (c) is checked against onnxruntime's own output.
    Every child process is stopped by PID before this returns or raises. Raises
    AssertionError when a server answers wrongly, RuntimeError when one does not start.
    """
    out = reporter or _Silent()
    report = OverheadReport(
        config,
        machine_info(),
        dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        runs={DIRECT: [], FLOOR: [], GPUVISOR: []},
    )
    inputs = sample_inputs(config.model, config.batch)
    with ExitStack() as stack:
        workdir = config.workdir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="gpuvisor-bench-"))
        )
        out.phase("building the model and starting onnxruntime")
        model_path = build_model(config.model, workdir / "models")
        session = direct_session(model_path)
        names = [o.name for o in session.get_outputs()]
        expected = dict(zip(names, session.run(None, inputs), strict=True))

        out.phase("starting the floor server")
        floor = stack.enter_context(
            FloorProcess(model_path, config.model, log_path=workdir / "floor.log")
        )
        report.max_abs_diff[FLOOR] = _max_abs_diff(
            expected, fetch_outputs(floor.address, config.model, inputs), SYSTEMS[FLOOR]
        )

        out.phase("starting the gpuvisor node and deploying the model")
        target = stack.enter_context(
            start_gpuvisor(config.model, model_path, workdir / "node", config.max_batch_size)
        )
        report.max_abs_diff[GPUVISOR] = _max_abs_diff(
            expected,
            fetch_outputs(target.node.address, config.model, inputs, target.headers),
            SYSTEMS[GPUVISOR],
        )

        factories: dict[str, CallFactory] = {
            DIRECT: direct_call_factory(session, inputs),
            FLOOR: triton_call_factory(floor.address, config.model, inputs),
            GPUVISOR: triton_call_factory(
                target.node.address, config.model, inputs, target.headers
            ),
        }
        if config.warmup > 0:
            for name, factory in factories.items():
                out.phase(f"warm-up: {SYSTEMS[name]}", config.warmup)
                run_closed_loop(
                    f"{name}-warmup", factory, config.warmup, config.threads, out.advance
                )
        for round_ in range(1, config.repeat + 1):
            for name, factory in factories.items():
                out.phase(f"round {round_}/{config.repeat}: {SYSTEMS[name]}", config.requests)
                report.runs[name].append(
                    run_closed_loop(name, factory, config.requests, config.threads, out.advance)
                )
    return report


def _spread(runs: list[LoadResult]) -> str:
    values = [f"{r.rps:,.0f}" for r in runs]
    return ", ".join(values)


class _ProgressReporter:
    """Shows run_overhead's phases on a rich progress bar."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = progress.add_task("starting", total=None)

    def phase(self, description: str, total: int | None = None) -> None:
        self.progress.reset(self.task, description=description, total=total, completed=0)

    def advance(self, done: int) -> None:
        self.progress.advance(self.task, done)


def render_report(report: OverheadReport, console: Console) -> None:
    """Print the medians table, each run's throughput and gpuvisor's ratios to the floor."""
    cfg = report.config
    medians = report.medians
    console.print(
        results_table(
            list(medians.values()),
            title=f"Serving overhead: {cfg.model}, batch {cfg.batch}, {cfg.threads} client threads, "
            f"{cfg.requests} requests × {cfg.repeat} (medians)",
            labels=SYSTEMS,
        )
    )
    for name, runs in report.runs.items():
        console.print(f"  {SYSTEMS[name]}: req/s per run {_spread(runs)}", highlight=False)
    machine, stack = report.machine, serving_stack()
    console.print(
        f"  machine: {machine['cpus']} CPUs ({machine['cpu_model']}); (b) and (c) serve with "
        f"uvicorn {stack['uvicorn']} ({stack['http']}, {stack['loop']}), FastAPI {stack['fastapi']}",
        highlight=False,
    )
    ratios = report.ratios
    if ratios:
        verdict = "[green]meets[/green]" if ratios["throughput"] >= TARGET else "[red]misses[/red]"
        console.print(
            f"\n(c)/(b): throughput {ratios['throughput']:.1%} of the floor ({verdict} the "
            f"{TARGET:.0%} target), p50 {ratios['p50']:.2f}×, p99 {ratios['p99']:.2f}×",
            highlight=False,
        )


def overhead_command(config: OverheadConfig, output: Path, console: Console) -> int:
    """Run the benchmark with a progress bar, print the report, write its JSON to ``output``.

    Returns the exit code: 0 when every request was answered, 1 otherwise.
    """
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        report = run_overhead(config, _ProgressReporter(progress))
    render_report(report, console)
    write_json(output, report.to_json())
    console.print(f"results written to {output}", highlight=False)
    return 1 if any(r.errors for r in report.medians.values()) else 0
