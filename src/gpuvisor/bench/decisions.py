"""`gpuvisor bench decisions`: what one dispatch decision costs, fair share against FIFO.

A decision is what the dispatcher asks of its policy each time the device frees up:
``choose`` over every ready slice, ``batch_rows`` for the chosen one, and, when the batch
ends, ``charge``. The benchmark keeps ``slices`` slices backlogged (varied tenants, weights,
latency classes, shares and batch costs), runs the decisions on a virtual clock that
advances by each batch's cost (so the fair-share window fills and slides as on a busy
device), and times only the policy's three calls.
"""

from __future__ import annotations

import datetime as dt
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from gpuvisor.bench.loadgen import machine_info, write_json
from gpuvisor.dispatch.batching import take_batch
from gpuvisor.dispatch.fairshare import FairSharePolicy
from gpuvisor.dispatch.policy import DispatchPolicy, FifoPolicy
from gpuvisor.dispatch.profiles import ExecutionProfile
from gpuvisor.dispatch.queues import PendingRequest, SliceQueue

__all__ = [
    "POLICIES",
    "DecisionCost",
    "build_backlog",
    "decisions_command",
    "render_decisions",
    "run_decisions",
]

QUANTUM = 0.002  # seconds: the design's default quantum on a GPU
WINDOW = 1.0
TENANT_SIZE = 4  # slices per tenant, on average

POLICIES: dict[str, Callable[[], DispatchPolicy]] = {
    "fair-share": lambda: FairSharePolicy(QUANTUM, WINDOW),
    "fifo": FifoPolicy,
}


@dataclass(frozen=True)
class DecisionCost:
    """The wall time of one policy's decisions, in microseconds."""

    policy: str
    decisions: int
    p50_us: float
    p99_us: float
    mean_us: float
    max_us: float

    def summary(self) -> dict[str, Any]:
        return {
            "decisions": self.decisions,
            "p50_us": round(self.p50_us, 3),
            "p99_us": round(self.p99_us, 3),
            "mean_us": round(self.mean_us, 3),
            "max_us": round(self.max_us, 3),
        }


def build_backlog(slices: int, seed: int = 0) -> list[SliceQueue]:
    """Return ``slices`` backlogged slice queues with varied tenants, weights, classes,
    shares (a fifth of the slices hold one; they add up to at most half the device) and
    measured batch costs of 0.2-2 ms per row."""
    if slices < 1:
        raise ValueError(f"the benchmark needs at least one slice, got {slices}")
    rng = random.Random(seed)
    tenants = max(1, slices // TENANT_SIZE)
    weights = [float(rng.randint(1, 8)) for _ in range(tenants)]
    shared = max(1, slices // 5)
    queues = []
    for i in range(slices):
        tenant = rng.randrange(tenants)
        max_batch = rng.choice([1, 4, 8, 16, 32])
        per_row = rng.uniform(0.0002, 0.002)
        fixed = rng.uniform(0.0001, 0.001)
        queue = SliceQueue(
            slice_id=f"tenant{tenant}/deployment{i}/0",
            tenant=f"tenant{tenant}",
            deployment=f"deployment{i}",
            pool="bench",
            profile_name="bench",
            latency_class=rng.choice(["critical", "standard", "standard", "batch"]),
            max_batch_size=max_batch,
            weight=weights[tenant],
            share=0.5 / shared if i % 5 == 0 else 0.0,
            profile=ExecutionProfile({1: fixed + per_row, max_batch: fixed + per_row * max_batch}),
        )
        _refill(queue, 0.0, i * 1000)
        queues.append(queue)
    return queues


def run_decisions(slices: int = 100, decisions: int = 20000, seed: int = 0) -> dict[str, Any]:
    """Time ``decisions`` decisions of each policy over ``slices`` backlogged slices.

    Returns ``{"config": ..., "policies": {name: {"p50_us", "p99_us", ...}}}``.
    """
    if decisions < 1:
        raise ValueError(f"the benchmark needs at least one decision, got {decisions}")
    costs = {name: _time_policy(name, slices, decisions, seed) for name in POLICIES}
    return {
        "config": {
            "slices": slices,
            "decisions": decisions,
            "seed": seed,
            "quantum_s": QUANTUM,
            "window_s": WINDOW,
            "timed": "choose over every ready slice + batch_rows + charge",
        },
        "policies": {name: cost.summary() for name, cost in costs.items()},
    }


def _time_policy(name: str, slices: int, decisions: int, seed: int) -> DecisionCost:
    policy = POLICIES[name]()
    queues = build_backlog(slices, seed)
    warmup = min(2000, decisions // 10)
    samples: list[float] = []
    now = 0.0
    clock = time.perf_counter_ns
    next_id = slices * 1000
    for index in range(warmup + decisions):
        started = clock()
        chosen = policy.choose(queues, now)
        if chosen is None:
            raise RuntimeError(f"{name} left a device with {slices} backlogged slices idle")
        rows = policy.batch_rows(chosen)
        decided = clock()
        # The batch runs for its predicted time (exactly what the profile says).
        seconds = chosen.profile.predict(sum(r.rows for r in take_batch(chosen, rows)))
        now += seconds
        next_id = _refill(chosen, now, next_id)
        charge_started = clock()
        policy.charge(chosen, seconds, now)
        ended = clock()
        if index >= warmup:
            samples.append((decided - started + ended - charge_started) / 1000)
    samples.sort()
    return DecisionCost(
        policy=name,
        decisions=decisions,
        p50_us=_percentile(samples, 0.50),
        p99_us=_percentile(samples, 0.99),
        mean_us=sum(samples) / len(samples),
        max_us=samples[-1],
    )


def _refill(queue: SliceQueue, now: float, next_id: int) -> int:
    while queue.queued_rows < queue.max_batch_size:
        next_id += 1
        queue.push(PendingRequest(next_id, queue.tenant, b"", -1, arrival=now))
    return next_id


def _percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def render_decisions(result: dict[str, Any], console: Console) -> None:
    """Print the per-policy decision cost table."""
    config = result["config"]
    table = Table(
        title=f"Dispatch decision cost: {config['slices']} backlogged slices, "
        f"{config['decisions']} decisions per policy",
        title_justify="left",
    )
    for column in ("policy", "p50 µs", "p99 µs", "mean µs", "max µs"):
        table.add_column(column, justify="left" if column == "policy" else "right")
    for name, cost in result["policies"].items():
        table.add_row(
            name,
            f"{cost['p50_us']:.1f}",
            f"{cost['p99_us']:.1f}",
            f"{cost['mean_us']:.1f}",
            f"{cost['max_us']:.1f}",
        )
    console.print(table)
    console.print(f"  timed: {config['timed']}", highlight=False)


def decisions_command(slices: int, decisions: int, output: Path, console: Console) -> int:
    """Run the benchmark, print its table and write its JSON to ``output``; return 0."""
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    with console.status(f"timing {decisions} decisions per policy over {slices} slices"):
        result = run_decisions(slices, decisions)
    render_decisions(result, console)
    payload = {"benchmark": "decisions", "started": started, "machine": machine_info(), **result}
    write_json(output, payload)
    console.print(f"results written to {output}", highlight=False)
    return 0
