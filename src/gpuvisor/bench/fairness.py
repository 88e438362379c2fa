"""`gpuvisor bench fairness`: how device time is shared. (a) Three saturating tenants with
weights 1:2:5 whose models differ several-fold in per-batch cost (best-effort pool): measured
shares against 12.5/25/62.5%, beside three free-running servers (the naive baseline).
(b) A lone tenant with computeShare 0.25 in a fixed-share pool: its share should be 25%.
(c) A lone saturating tenant in a best-effort pool: the device should stay busy."""

from __future__ import annotations

import datetime as dt
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from gpuvisor.bench.floor import FloorProcess
from gpuvisor.bench.harness import Reporter, hold, run_and_report, workdir
from gpuvisor.bench.loadgen import machine_info
from gpuvisor.bench.mlp import BenchModel, measure_cost
from gpuvisor.bench.oip_clients import SaturatingLoad, Target
from gpuvisor.bench.scenario import TenantPlan, cpu_seconds, start_node

__all__ = [
    "TENANTS",
    "FairTenant",
    "FairnessConfig",
    "FairnessReport",
    "ShareWindow",
    "fairness_command",
    "jain_index",
    "render_fairness",
    "run_fairness",
]


@dataclass(frozen=True)
class FairTenant:
    """A saturating tenant: its weight, its model and the rows of each of its requests."""

    weight: float
    model: BenchModel
    rows: int


# The highest weight gets the cheapest batches, so that serving requests in arrival order
# (which shares time by cost) is as far from the weights as it gets. Requests are large
# (tens of rows, several ms each) because on a 2-core machine the HTTP path, not the device,
# would otherwise limit how fast the cheapest tenant can ask for its share. Deployments use
# maxBatchSize 1, so that one grant is one request: the node counts a request as one row
# until its worker has decoded it, so a larger maxBatchSize would merge up to that many
# multi-row requests into one grant and the batch costs compared would not be these.
TENANTS: dict[str, FairTenant] = {
    "heavy": FairTenant(1.0, BenchModel("heavy-mlp", (1024, 4096, 4096, 16)), 48),
    "medium": FairTenant(2.0, BenchModel("medium-mlp", (1024, 2048, 2048, 2048, 16)), 32),
    "light": FairTenant(5.0, BenchModel("light-mlp", (512, 2048, 2048, 16)), 32),
}
WEIGHTED, NAIVE, FIXED, ALONE = "gpuvisor", "naive", "fixed-share", "work-conserving"
LABELS = {
    WEIGHTED: "(a) gpuvisor, best-effort pool, weights 1:2:5",
    NAIVE: "(a) naive: three free-running servers",
    FIXED: "(b) gpuvisor, fixed-share pool, lone tenant",
    ALONE: "(c) gpuvisor, best-effort pool, lone tenant",
}
FIXED_TOLERANCE_PP = 5.0
BUSY_TARGET = 0.95


def jain_index(values: Sequence[float]) -> float:
    """Jain's fairness index (Σx)² / (n·Σx²): 1 when all values are equal, 1/n at worst.
    Raises ValueError for no values or all zeros."""
    total, squares = sum(values), sum(v * v for v in values)
    if not values or squares == 0:
        raise ValueError("Jain's index needs at least one non-zero value")
    return total * total / (len(values) * squares)


@dataclass
class FairnessConfig:
    """What to measure and how hard."""

    duration: float = 8.0  # seconds per measured window of (a)
    short_duration: float = 5.0  # seconds per measured window of (b) and (c)
    repeat: int = 3
    concurrency: int = 8  # requests in flight per tenant
    fixed_share: float = 0.25
    quantum_ms: float | None = None  # the nodes' cpu.quantum; None: the node's default
    lookahead_ms: float | None = None  # the node's cpu.lookahead; None: the node's default
    workdir: Path | None = None


@dataclass
class ShareWindow:
    """Busy seconds per tenant over one measured window, and what they mean."""

    busy: dict[str, float]
    elapsed: float
    expected: dict[str, float] = field(default_factory=dict)  # tenant → expected share
    answered: int = 0
    errors: int = 0

    @property
    def shares(self) -> dict[str, float]:
        total = sum(self.busy.values())
        return {t: b / total if total else 0.0 for t, b in self.busy.items()}

    @property
    def max_deviation_pp(self) -> float:
        shares = self.shares
        return max(abs(shares.get(t, 0.0) - e) * 100 for t, e in self.expected.items())

    @property
    def jain(self) -> float:
        shares = self.shares
        return jain_index([shares.get(t, 0.0) / e for t, e in self.expected.items()])

    @property
    def busy_fraction(self) -> float:
        """Busy seconds of all tenants ÷ wall seconds."""
        return sum(self.busy.values()) / self.elapsed

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "busy_s": self.busy,
            "elapsed_s": self.elapsed,
            "shares": self.shares,
            "busy_fraction": self.busy_fraction,
            "requests_answered": self.answered,
            "errors": self.errors,
        }
        if len(self.expected) > 1:
            out |= {
                "expected": self.expected,
                "max_deviation_pp": self.max_deviation_pp,
                "jain": self.jain,
            }
        return out


@dataclass
class FairnessReport:
    config: FairnessConfig
    machine: dict[str, Any]
    started: str
    costs_ms: dict[str, float] = field(default_factory=dict)
    windows: dict[str, list[ShareWindow]] = field(default_factory=dict)
    seconds: float = 0.0

    def median(self, scenario: str, figure: Callable[[ShareWindow], float]) -> float:
        runs = self.windows.get(scenario, [])
        return statistics.median(figure(w) for w in runs) if runs else float("nan")

    def median_shares(self, scenario: str) -> dict[str, float]:
        runs = self.windows.get(scenario, [])
        tenants = runs[0].busy if runs else {}
        return {t: statistics.median(w.shares.get(t, 0.0) for w in runs) for t in tenants}

    @property
    def cost_ratio(self) -> float:
        return max(self.costs_ms.values()) / min(self.costs_ms.values())

    def to_json(self) -> dict[str, Any]:
        cfg = self.config
        scenarios: dict[str, Any] = {}
        for name, runs in self.windows.items():
            median: dict[str, Any] = {
                "shares": self.median_shares(name),
                "busy_fraction": self.median(name, lambda w: w.busy_fraction),
            }
            if name in (WEIGHTED, NAIVE):
                median["max_deviation_pp"] = self.median(name, lambda w: w.max_deviation_pp)
                median["jain"] = self.median(name, lambda w: w.jain)
            scenarios[name] = {
                "label": LABELS[name],
                "busy_source": "process CPU time deltas (psutil), HTTP handling included"
                if name == NAIVE
                else "gpuvisor_device_busy_seconds_total deltas (/metrics)",
                "median": median,
                "runs": [w.summary() for w in runs],
            }
        return {
            "benchmark": "fairness",
            "started": self.started,
            "seconds": self.seconds,
            "machine": self.machine,
            "config": {
                "duration_s": cfg.duration,
                "short_duration_s": cfg.short_duration,
                "repeat": cfg.repeat,
                "concurrency": cfg.concurrency,
                "fixed_share": cfg.fixed_share,
                "quantum_ms": cfg.quantum_ms,
                "lookahead_ms": cfg.lookahead_ms,
                "client": "http.client keep-alive, binary OIP bodies, closed loop",
            },
            "tenants": {
                t: {
                    "weight": f.weight,
                    "model": f.model.name,
                    "widths": list(f.model.widths),
                    "rows": f.rows,
                }
                for t, f in TENANTS.items()
            },
            "batch_cost_ms": self.costs_ms,
            "batch_cost_ratio": self.cost_ratio,
            "scenarios": scenarios,
            "targets": {
                "fixed_share": cfg.fixed_share,
                "fixed_share_tolerance_pp": FIXED_TOLERANCE_PP,
                "work_conserving_busy_fraction": BUSY_TARGET,
            },
        }


Busy = Callable[[], dict[str, float]]


def _window(
    targets: Mapping[str, Target], busy: Busy, config: FairnessConfig, seconds: float, out: Reporter
) -> ShareWindow:
    """Saturate every target, let the queues fill, then measure busy seconds for ``seconds``."""
    settle = 0.5
    load = SaturatingLoad(settle + seconds + 0.5)
    for tenant, target in targets.items():
        spec = TENANTS[tenant]
        load.add(target, spec.model.inputs(spec.rows), config.concurrency)
    load.start()
    try:
        time.sleep(settle)
        before, began = busy(), time.perf_counter()
        hold(seconds, out)
        after, elapsed = busy(), time.perf_counter() - began
        counts = load.finish()
    finally:
        load.kill()
    deltas = {t: after.get(t, 0.0) - before.get(t, 0.0) for t in targets}
    answered = sum(ok for ok, _ in counts)
    return ShareWindow(deltas, elapsed, {}, answered, sum(failed for _, failed in counts))


def run_fairness(config: FairnessConfig, out: Reporter | None = None) -> FairnessReport:
    """Run ``config.repeat`` rounds of (a) gpuvisor, (a) naive, (b) and (c), interleaved, and
    return every window. Every child process is stopped by PID before this returns or raises.
    Raises RuntimeError when a server does not start."""
    out = out or Reporter()
    began = time.perf_counter()
    report = FairnessReport(
        config,
        machine_info(),
        dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        windows={WEIGHTED: [], NAIVE: [], FIXED: [], ALONE: []},
    )
    weights = {t: f.weight for t, f in TENANTS.items()}
    expected = {t: w / sum(weights.values()) for t, w in weights.items()}
    with ExitStack() as stack:
        root = stack.enter_context(workdir(config.workdir))
        out.phase("starting the gpuvisor nodes")
        plans = [
            TenantPlan(t, f.model, weight=f.weight, latency_class="batch", max_batch_size=f.rows)
            for t, f in TENANTS.items()
        ]
        shared = stack.enter_context(
            start_node(
                plans,
                root / "shared",
                quantum_ms=config.quantum_ms,
                lookahead_ms=config.lookahead_ms,
            )
        )
        capped_plan = TenantPlan(
            "capped",
            TENANTS["medium"].model,
            share=config.fixed_share,
            latency_class="batch",
            max_batch_size=TENANTS["medium"].rows,
            pool="fixed",
        )
        capped = stack.enter_context(
            start_node(
                [capped_plan],
                root / "fixed",
                {"fixed": "fixed-share"},
                config.quantum_ms,
                lookahead_ms=config.lookahead_ms,
            )
        )
        paths = {
            f.model.name: root / "shared" / "models" / f"{f.model.name}.onnx"
            for f in TENANTS.values()
        }
        out.phase("measuring the models")
        report.costs_ms = {
            f.model.name: measure_cost(paths[f.model.name], f.model.inputs(f.rows)) * 1e3
            for f in TENANTS.values()
        }
        out.phase("starting the naive servers")
        floors = {
            t: stack.enter_context(
                FloorProcess(paths[f.model.name], f.model.name, log_path=root / f"{t}.log")
            )
            for t, f in TENANTS.items()
        }
        pids = {t: f.process.pid for t, f in floors.items() if f.process is not None}
        naive_targets = {t: Target(f.address, TENANTS[t].model.name) for t, f in floors.items()}
        weighted_targets = {t: shared.target(t) for t in TENANTS}
        naive_busy: Busy = lambda: {t: cpu_seconds(pid) for t, pid in pids.items()}  # noqa: E731
        capped_busy: Busy = lambda: {"medium": capped.busy().get("capped", 0.0)}  # noqa: E731
        for round_ in range(1, config.repeat + 1):
            steps: list[tuple[str, Mapping[str, Target], Busy, float]] = [
                (WEIGHTED, weighted_targets, shared.busy, config.duration),
                (NAIVE, naive_targets, naive_busy, config.duration),
                (FIXED, {"medium": capped.target("capped")}, capped_busy, config.short_duration),
                (ALONE, {"heavy": shared.target("heavy")}, shared.busy, config.short_duration),
            ]
            for name, targets, busy, seconds in steps:
                out.phase(f"round {round_}/{config.repeat}: {LABELS[name]}", seconds)
                window = _window(targets, busy, config, seconds, out)
                if len(targets) > 1:
                    window.expected = expected
                report.windows[name].append(window)
    report.seconds = time.perf_counter() - began
    return report


def render_fairness(report: FairnessReport, console: Console) -> None:
    """Print the shares table, the fixed-share and work-conservation lines and verdicts."""
    cfg = report.config
    table = Table(
        title=f"Fairness (a): three saturating tenants, {cfg.concurrency} requests in flight "
        f"each; medians of {cfg.repeat} runs of {cfg.duration:g}s",
        title_justify="left",
    )
    table.add_column("system")
    for tenant, spec in TENANTS.items():
        cost = report.costs_ms.get(spec.model.name, float("nan"))
        table.add_column(f"{tenant} (w {spec.weight:g}, {cost:.1f} ms/batch)", justify="right")
    table.add_column("max deviation", justify="right")
    table.add_column("Jain", justify="right")
    total = sum(f.weight for f in TENANTS.values())
    expected = [f.weight / total for f in TENANTS.values()]
    table.add_row("expected (weights)", *(f"{e:.1%}" for e in expected), "", "")
    for name in (WEIGHTED, NAIVE):
        shares = report.median_shares(name)
        table.add_row(
            LABELS[name],
            *(f"{shares.get(t, 0.0):.1%}" for t in TENANTS),
            f"{report.median(name, lambda w: w.max_deviation_pp):.1f} pp",
            f"{report.median(name, lambda w: w.jain):.3f}",
        )
    console.print(table)
    console.print(
        f"  per-batch cost ratio {report.cost_ratio:.1f}× (1 thread); naive shares are server "
        "CPU time, HTTP handling included",
        highlight=False,
    )
    fixed = report.median(FIXED, lambda w: w.busy_fraction)
    ok = abs(fixed - cfg.fixed_share) * 100 <= FIXED_TOLERANCE_PP
    verdict = "[green]within[/green]" if ok else "[red]outside[/red]"
    console.print(
        f"(b) fixed-share, computeShare {cfg.fixed_share:g}, alone: device share {fixed:.1%} "
        f"({verdict} {cfg.fixed_share:.0%} ± {FIXED_TOLERANCE_PP:g} pp)"
    )
    alone = report.median(ALONE, lambda w: w.busy_fraction)
    verdict = "[green]meets[/green]" if alone >= BUSY_TARGET else "[red]misses[/red]"
    console.print(
        f"(c) best-effort, lone saturating tenant (weight 1): device busy {alone:.1%} "
        f"({verdict} the {BUSY_TARGET:.0%} target)"
    )


def fairness_command(config: FairnessConfig, output: Path, console: Console) -> int:
    """Run the benchmark with a progress bar, print the report, write its JSON to ``output``.
    Returns 0 when every request was answered, 1 otherwise."""
    report = run_and_report(
        console, output, lambda reporter: run_fairness(config, reporter), render_fairness
    )
    return 1 if any(w.errors for runs in report.windows.values() for w in runs) else 0
