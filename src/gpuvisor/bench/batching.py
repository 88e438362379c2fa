"""`gpuvisor bench batching`: what batching buys on this device. For each demo model, rows per
second at batch sizes 1, 2, 4, 8, 16 in gpuvisor's executor (the worker's ONNX executor, one
intra-op thread as on the CPU device), and each size's throughput relative to batch 1."""

from __future__ import annotations

import datetime as dt
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from gpuvisor.bench.harness import Reporter, run_and_report, workdir
from gpuvisor.bench.loadgen import machine_info
from gpuvisor.bench.overhead_systems import build_model
from gpuvisor.demo.models import DEMO_MODEL_NAMES, sample_inputs
from gpuvisor.runtime.executors.base import ExecutorDevice
from gpuvisor.runtime.executors.onnx import OnnxExecutor

__all__ = [
    "BatchingConfig",
    "BatchingReport",
    "batching_command",
    "measure_model",
    "render_batching",
    "run_batching",
]


@dataclass
class BatchingConfig:
    """Which models and batch sizes, and how long to time each."""

    models: tuple[str, ...] = DEMO_MODEL_NAMES
    sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
    seconds: float = 0.3  # timed per (model, size, run)
    repeat: int = 3
    threads: int = 1  # intra-op threads, as a worker on the CPU device of a 2-core machine
    workdir: Path | None = None


@dataclass
class BatchingReport:
    config: BatchingConfig
    machine: dict[str, Any]
    started: str
    # model → size → rows/s of each run
    runs: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    seconds: float = 0.0

    def rows_per_s(self, model: str, size: int) -> float:
        return statistics.median(self.runs[model][size])

    def speedup(self, model: str, size: int) -> float:
        """Rows/s at ``size`` ÷ rows/s at batch 1 (medians)."""
        return self.rows_per_s(model, size) / self.rows_per_s(model, 1)

    def to_json(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "benchmark": "batching",
            "started": self.started,
            "seconds": self.seconds,
            "machine": self.machine,
            "config": {
                "models": list(cfg.models),
                "sizes": list(cfg.sizes),
                "seconds_per_run": cfg.seconds,
                "repeat": cfg.repeat,
                "threads": cfg.threads,
                "path": "gpuvisor.runtime.executors.onnx.OnnxExecutor, called directly",
            },
            "models": {
                model: {
                    str(size): {
                        "rows_per_s": self.rows_per_s(model, size),
                        "ms_per_batch": size / self.rows_per_s(model, size) * 1e3,
                        "speedup_vs_batch_1": self.speedup(model, size),
                        "runs_rows_per_s": runs,
                    }
                    for size, runs in sizes.items()
                }
                for model, sizes in self.runs.items()
            },
        }


def measure_model(
    executor: OnnxExecutor, model: str, size: int, seconds: float, warmup: int = 5
) -> float:
    """Return rows per second of ``executor`` running the demo inputs of ``model`` at batch
    ``size`` back to back for about ``seconds`` (at least 3 runs)."""
    inputs = sample_inputs(model, size)
    for _ in range(warmup):
        executor.run(inputs)
    runs, began = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - began < seconds:
        executor.run(inputs)
        runs += 1
    return runs * size / (time.perf_counter() - began)


def run_batching(config: BatchingConfig, out: Reporter | None = None) -> BatchingReport:
    """Time every (model, size) ``config.repeat`` times, rounds interleaved across sizes so
    that drift hits every size alike. Raises ValueError for a size below 1 or without 1."""
    if 1 not in config.sizes or min(config.sizes) < 1:
        raise ValueError(f"batch sizes must be >= 1 and include 1, got {list(config.sizes)}")
    out = out or Reporter()
    began = time.perf_counter()
    report = BatchingReport(
        config, machine_info(), dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )
    with workdir(config.workdir) as root:
        for model in config.models:
            path = build_model(model, root)
            executor = OnnxExecutor(path, ExecutorDevice(kind="cpu", threads=config.threads))
            try:
                report.runs[model] = {size: [] for size in config.sizes}
                out.phase(f"batching: {model}", len(config.sizes) * config.repeat)
                for _ in range(config.repeat):
                    for size in config.sizes:
                        rate = measure_model(executor, model, size, config.seconds)
                        report.runs[model][size].append(rate)
                        out.advance(1)
            finally:
                executor.close()
    report.seconds = time.perf_counter() - began
    return report


def render_batching(report: BatchingReport, console: Console) -> None:
    """Print rows/s and the ratio to batch 1, one row per model."""
    cfg = report.config
    table = Table(
        title=f"Batching in the executor ({cfg.threads} intra-op thread): rows/s and × batch 1, "
        f"medians of {cfg.repeat} runs of {cfg.seconds:g}s",
        title_justify="left",
    )
    table.add_column("model")
    for size in cfg.sizes:
        table.add_column(f"batch {size}", justify="right")
    for model in report.runs:
        cells = [
            f"{report.rows_per_s(model, size):,.0f} ({report.speedup(model, size):.1f}×)"
            for size in cfg.sizes
        ]
        table.add_row(model, *cells)
    console.print(table)


def batching_command(config: BatchingConfig, output: Path, console: Console) -> int:
    """Run the benchmark with a progress bar, print the table, write its JSON to ``output``.
    Returns 0."""
    run_and_report(
        console, output, lambda reporter: run_batching(config, reporter), render_batching
    )
    return 0
