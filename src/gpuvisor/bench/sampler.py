"""`gpuvisor bench sampler`: what the telemetry sampler costs, in CPU time per second of wall
time, at the node's default period (and any other asked for).

The node's own ``TelemetrySampler`` runs alone in this process, on an asyncio loop as in the
node, against this machine's real devices (NVML GPUs when present, the CPU device) and
``workers`` idle child processes whose memory it reads like slices' workers. Two figures per
period: the process's CPU time over the run (all threads, less an idle loop's baseline), and
the sampler's own account of its passes (``gpuvisor_sampler_cpu_seconds_total``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from gpuvisor.bench.loadgen import machine_info, write_json
from gpuvisor.errors import ConfigError
from gpuvisor.inventory.discovery import discover
from gpuvisor.spec.kinds import NodeSpec
from gpuvisor.telemetry.metrics import Metrics
from gpuvisor.telemetry.sampler import DEFAULT_SAMPLE_PERIOD, TelemetrySampler, WorkerTarget

__all__ = ["SamplerBenchConfig", "SamplerCost", "run_sampler_bench", "sampler_command"]


@dataclass(frozen=True)
class SamplerBenchConfig:
    seconds: float = 20.0
    periods: tuple[float, ...] = (DEFAULT_SAMPLE_PERIOD,)
    workers: int = 4


@dataclass(frozen=True)
class SamplerCost:
    """One period's measurement."""

    period: float
    wall_seconds: float
    samples: int
    process_cpu_ms_per_s: float  # all threads of this process, less the idle baseline
    sampler_cpu_ms_per_s: float  # the sampler's own measure of its passes
    cpu_ms_per_sample: float


async def _measure(
    devices: list[Any], targets: list[WorkerTarget], period: float | None, seconds: float
) -> tuple[float, float, int, float]:
    """Run the sampler (or, with no period, an idle loop) for ``seconds``; return wall seconds,
    process CPU seconds, samples taken and the sampler's own CPU seconds."""
    sampler = (
        TelemetrySampler(Metrics(), devices, lambda: targets, period)
        if period is not None
        else None
    )
    if sampler is not None:
        await asyncio.to_thread(sampler.open)  # NVML initialisation is set-up, not sampling
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if sampler is not None:
        sampler.start()
    await asyncio.sleep(seconds)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    if sampler is None:
        return wall, cpu, 0, 0.0
    await sampler.stop()
    return wall, cpu, sampler.samples, sampler.cpu_seconds


def run_sampler_bench(config: SamplerBenchConfig) -> dict[str, Any]:
    """Measure every period in ``config``; return the results as plain data."""
    if any(p <= 0 for p in config.periods):
        bad = next(p for p in config.periods if p <= 0)
        raise ConfigError(f"--period must be > 0 seconds, got {bad:g}")
    topology = discover(NodeSpec())
    devices = [d for d in topology.devices if d.backend != "simulated"]
    children = [
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(86400)"])
        for _ in range(config.workers)
    ]
    try:
        targets = [
            WorkerTarget(f"bench/w{i}/0", "bench", f"w{i}", devices[i % len(devices)].id, c.pid)
            for i, c in enumerate(children)
        ]
        base_wall, base_cpu, _, _ = asyncio.run(_measure(devices, targets, None, config.seconds))
        baseline = base_cpu / base_wall
        costs = []
        for period in config.periods:
            wall, cpu, samples, own = asyncio.run(
                _measure(devices, targets, period, config.seconds)
            )
            costs.append(
                SamplerCost(
                    period=period,
                    wall_seconds=wall,
                    samples=samples,
                    process_cpu_ms_per_s=max(0.0, cpu / wall - baseline) * 1000,
                    sampler_cpu_ms_per_s=own / wall * 1000,
                    cpu_ms_per_sample=own / max(1, samples) * 1000,
                )
            )
    finally:
        for child in children:
            child.terminate()
        for child in children:
            child.wait(10)
    return {
        "config": asdict(config),
        "devices": [f"{d.id} ({d.model}, {d.backend})" for d in devices],
        "idle_baseline_cpu_ms_per_s": baseline * 1000,
        "periods": [asdict(c) for c in costs],
    }


def render_sampler(result: dict[str, Any], console: Console) -> None:
    """Print the per-period cost table."""
    config = result["config"]
    table = Table(
        title=f"Telemetry sampler cost: {config['seconds']:g} s per period, "
        f"{config['workers']} worker processes, devices {', '.join(result['devices'])}",
        title_justify="left",
    )
    for column in (
        "period s",
        "samples",
        "process CPU ms/s",
        "sampler CPU ms/s",
        "ms/sample",
        "% of a core",
    ):
        table.add_column(column, justify="right")
    for c in result["periods"]:
        table.add_row(
            f"{c['period']:g}",
            str(c["samples"]),
            f"{c['process_cpu_ms_per_s']:.3f}",
            f"{c['sampler_cpu_ms_per_s']:.3f}",
            f"{c['cpu_ms_per_sample']:.3f}",
            f"{c['process_cpu_ms_per_s'] / 10:.3f}%",
        )
    console.print(table)
    console.print(
        f"  idle loop baseline (subtracted): {result['idle_baseline_cpu_ms_per_s']:.3f} ms/s",
        highlight=False,
    )


def sampler_command(config: SamplerBenchConfig, output: Path, console: Console) -> int:
    """Run the benchmark, print its table and write its JSON to ``output``; return 0."""
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    total = config.seconds * (len(config.periods) + 1)
    # no spinner: its refresh thread would be measured along with the sampler
    console.print(f"measuring the sampler for about {total:.0f} s", highlight=False)
    result = run_sampler_bench(config)
    render_sampler(result, console)
    payload = {"benchmark": "sampler", "started": started, "machine": machine_info(), **result}
    write_json(output, payload)
    console.print(f"results written to {output}", highlight=False)
    return 0
