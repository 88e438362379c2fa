"""`gpuvisor bench placement`: fleet-scale placement time, and GPUs used against the optimum.

Two parts:

- **scale**: a simulated fleet (by default 1,000 GPUs: 700 H100-80GB with MIG enabled and no
  layout yet, 300 without MIG) and deployments totalling 10,000 slices (2,000 partition-tier
  replicas over the MIG profiles, 8,000 process-tier replicas). ``plan_fleet`` lays out the MIG
  GPUs and places every slice; then, with those layouts declared, it places the same slices on
  the existing instances only (what a node does). Both are timed; medians of ``repeat`` runs.
- **optimality**: MIG instance demands on one H100-80GB model. For small random demands the
  exact optimum comes from an integer program over every (GPU, profile, offset) placement,
  solved with ``scipy.optimize.milp`` (HiGHS); for the scale demand, from the pattern integer
  program (one integer per valid profile-count pattern). The planner and first-fit decreasing
  are compared with it.
"""

from __future__ import annotations

import datetime as dt
import random
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from gpuvisor.bench.loadgen import machine_info, write_json
from gpuvisor.errors import ConfigError
from gpuvisor.inventory.device import Device
from gpuvisor.partition.fleet import Workload, plan_fleet
from gpuvisor.partition.mig import GEOMETRIES, MigGeometry, enumerate_layouts, layout_counts
from gpuvisor.partition.planner import first_fit_decreasing, plan_layouts

__all__ = [
    "PlacementConfig",
    "build_fleet",
    "optimal_by_patterns",
    "optimal_by_placements",
    "placement_command",
    "run_placement",
]

GIB = 2**30
MODEL = "H100-80GB"
# Share of partition-tier replicas per profile in the scale scenario.
PROFILE_MIX = {
    "1g.10gb": 0.40,
    "1g.20gb": 0.10,
    "2g.20gb": 0.20,
    "3g.40gb": 0.20,
    "4g.40gb": 0.05,
    "7g.80gb": 0.05,
}


@dataclass(frozen=True)
class PlacementConfig:
    gpus: int = 1000
    mig_gpus: int = 700
    slices: int = 10_000
    partition_slices: int = 2_000
    replicas_per_deployment: int = 20
    repeat: int = 3
    small_instances: int = 40
    seed: int = 1


def _scipy() -> Any:
    try:
        import numpy as np
        from scipy import optimize, sparse
    except ImportError as exc:
        raise ConfigError(
            "gpuvisor bench placement needs scipy for the exact optimum: "
            "pip install 'gpuvisor[bench]' (or pip install scipy)"
        ) from exc
    return np, optimize, sparse


def build_fleet(config: PlacementConfig) -> tuple[list[Device], list[Workload]]:
    """Return the scale scenario: devices (MIG GPUs first) and deployments (seeded)."""
    if not 0 <= config.mig_gpus <= config.gpus or not 0 <= config.partition_slices <= config.slices:
        raise ValueError("need 0 ≤ mig_gpus ≤ gpus and 0 ≤ partition_slices ≤ slices")
    rng = random.Random(config.seed)
    devices = [
        Device(
            id=f"node-{i // 8}/gpu-{i % 8}",
            kind="gpu",
            backend="simulated",
            model=MODEL,
            memory_total=80 * GIB,
            node=f"node-{i // 8}",
            index=i % 8,
            mig_mode=i < config.mig_gpus,
        )
        for i in range(config.gpus)
    ]
    workloads: list[Workload] = []
    per = config.replicas_per_deployment

    def add(count: int, make: Any) -> None:
        n = 0
        while count > 0:
            replicas = min(count, rng.randint(max(1, per // 2), per * 3 // 2))
            workloads.append(make(n, replicas))
            count -= replicas
            n += 1

    # the mix's shares, rounded so that they sum to exactly ``partition_slices``
    counts = {p: int(config.partition_slices * share) for p, share in PROFILE_MIX.items()}
    by_remainder = sorted(
        PROFILE_MIX,
        key=lambda p: config.partition_slices * PROFILE_MIX[p] - counts[p],
        reverse=True,
    )
    for profile in by_remainder[: config.partition_slices - sum(counts.values())]:
        counts[profile] += 1
    for profile in PROFILE_MIX:
        add(
            counts[profile],
            lambda n, r, p=profile: Workload(
                f"tenant-{rng.randrange(20)}",
                f"mig-{p.replace('.', '-')}-{n}",
                r,
                "partition",
                10 * GIB,
                mig_profile=p,
            ),
        )
    add(
        config.slices - sum(w.replicas for w in workloads),
        lambda n, r: Workload(
            f"tenant-{rng.randrange(20)}",
            f"svc-{n}",
            r,
            "process",
            rng.choice([2, 2, 3, 3]) * GIB,
            compute_share=rng.choice([0.02, 0.025, 0.03, 0.035]),
        ),
    )
    return devices, workloads


def _time_scale(config: PlacementConfig) -> dict[str, Any]:
    devices, workloads = build_fleet(config)
    plan_times, place_times = [], []
    plan = existing = None
    for _ in range(config.repeat):
        started = time.perf_counter()
        plan = plan_fleet(devices, workloads)
        plan_times.append(time.perf_counter() - started)
    assert plan is not None
    laid_out = [replace(g.device, mig_instances=tuple(g.instances)) for g in plan.gpus]
    for _ in range(config.repeat):
        started = time.perf_counter()
        existing = plan_fleet(laid_out, workloads, existing_only=True)
        place_times.append(time.perf_counter() - started)
    assert existing is not None

    def outcome(p: Any) -> dict[str, Any]:
        return {
            "placed": sum(len(g.holders) + len(g.slices) for g in p.gpus),
            "pending": sum(x.replicas for x in p.pending),
            "gpus_used": sum(1 for g in p.gpus if g.holders or g.slices),
            "mig_gpus_used": sum(1 for g in p.gpus if g.holders),
        }

    return {
        "gpus": config.gpus,
        "mig_gpus": config.mig_gpus,
        "slices": sum(w.replicas for w in workloads),
        "partition_slices": sum(w.replicas for w in workloads if w.isolation == "partition"),
        "deployments": len(workloads),
        "plan_and_place_s": statistics.median(plan_times),
        "place_on_existing_s": statistics.median(place_times),
        "runs_s": {"plan_and_place": plan_times, "place_on_existing": place_times},
        "plan": outcome(plan),
        "existing_only": outcome(existing),
        "partition_demand": {
            p: sum(w.replicas for w in workloads if w.mig_profile == p) for p in PROFILE_MIX
        },
    }


def optimal_by_placements(geometry: MigGeometry, demand: dict[str, int], upper: int) -> int:
    """Return the fewest GPUs for ``demand``: an integer program over every (GPU, profile,
    start) placement with the geometry's rules as constraints (no slice shared, count
    limits, compute slices), at most ``upper`` GPUs, solved exactly by scipy's HiGHS."""
    np, optimize, sparse = _scipy()
    placements = [(p, s) for p in geometry.profiles for s in p.starts]
    k, bins = len(placements), upper
    n = bins * k + bins  # x[b, j], then y[b]
    rows: list[tuple[dict[int, float], float, float]] = []
    for b in range(bins):
        y = bins * k + b
        for m in range(geometry.memory_slices):
            row = {
                b * k + j: 1.0
                for j, (p, s) in enumerate(placements)
                if s <= m < s + p.memory_slices
            }
            rows.append(({**row, y: -1.0}, -np.inf, 0.0))
        for profile in geometry.profiles:
            row = {b * k + j: 1.0 for j, (p, _) in enumerate(placements) if p is profile}
            rows.append((row, -np.inf, float(profile.max_count)))
        compute = {b * k + j: float(p.compute_slices) for j, (p, _) in enumerate(placements)}
        rows.append(({**compute, y: -float(geometry.compute_slices)}, -np.inf, 0.0))
        if b + 1 < bins:
            rows.append(({y: 1.0, y + 1: -1.0}, 0.0, np.inf))
    for profile in geometry.profiles:
        wanted = float(demand.get(profile.name, 0))
        row = {
            b * k + j: 1.0
            for b in range(bins)
            for j, (p, _) in enumerate(placements)
            if p is profile
        }
        rows.append((row, wanted, wanted))
    matrix = sparse.lil_matrix((len(rows), n))
    for r, (row, _, _) in enumerate(rows):
        for column, value in row.items():
            matrix[r, column] = value
    cost = np.zeros(n)
    cost[bins * k :] = 1.0
    result = optimize.milp(
        cost,
        constraints=optimize.LinearConstraint(
            matrix.tocsr(), [r[1] for r in rows], [r[2] for r in rows]
        ),
        integrality=np.ones(n),
        bounds=optimize.Bounds(0, 1),
        options={"time_limit": 60},
    )
    if not result.success:
        raise RuntimeError(f"the placement integer program was not solved: {result.message}")
    return int(result.fun + 0.5)


def optimal_by_patterns(geometry: MigGeometry, demand: dict[str, int]) -> int:
    """Return the fewest GPUs for ``demand``: an integer program with one integer per distinct
    profile-count pattern a valid layout holds (all layouts enumerated), solved by HiGHS."""
    np, optimize, _ = _scipy()
    names = [p.name for p in geometry.profiles if demand.get(p.name, 0) > 0]
    patterns = sorted(
        {
            tuple(layout_counts(layout).get(name, 0) for name in names)
            for layout in enumerate_layouts(geometry, names)
        }
        - {tuple(0 for _ in names)}
    )
    matrix = np.array(patterns, dtype=float).T
    wanted = np.array([demand[name] for name in names], dtype=float)
    result = optimize.milp(
        np.ones(len(patterns)),
        constraints=optimize.LinearConstraint(matrix, wanted, np.inf),
        integrality=np.ones(len(patterns)),
        bounds=optimize.Bounds(0, np.inf),
        options={"time_limit": 60},
    )
    if not result.success:
        raise RuntimeError(f"the pattern integer program was not solved: {result.message}")
    return int(result.fun + 0.5)


def _optimality(config: PlacementConfig, scale_demand: dict[str, int]) -> dict[str, Any]:
    geometry = GEOMETRIES[MODEL]
    rng = random.Random(config.seed)
    names = [p.name for p in geometry.profiles]
    small = []
    for _ in range(config.small_instances):
        size = rng.randint(4, 24)
        demand: dict[str, int] = {}
        for _ in range(size):
            name = rng.choice(names)
            demand[name] = demand.get(name, 0) + 1
        ffd = len(first_fit_decreasing(geometry, demand))
        planned = len(plan_layouts(geometry, demand))
        started = time.perf_counter()
        optimum = optimal_by_placements(geometry, demand, ffd)
        small.append(
            {
                "demand": demand,
                "optimum": optimum,
                "planner": planned,
                "ffd": ffd,
                "milp_s": round(time.perf_counter() - started, 3),
            }
        )
    started = time.perf_counter()
    planned_scale = len(plan_layouts(geometry, scale_demand))
    planner_s = time.perf_counter() - started
    scale = {
        "demand": scale_demand,
        "optimum": optimal_by_patterns(geometry, scale_demand),
        "planner": planned_scale,
        "ffd": len(first_fit_decreasing(geometry, scale_demand)),
        "planner_s": round(planner_s, 4),
    }

    def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
        opt = sum(r["optimum"] for r in rows)
        return {
            "instances": len(rows),
            "optimum_gpus": opt,
            "planner_gpus": sum(r["planner"] for r in rows),
            "ffd_gpus": sum(r["ffd"] for r in rows),
            "planner_optimal": sum(1 for r in rows if r["planner"] == r["optimum"]),
            "ffd_optimal": sum(1 for r in rows if r["ffd"] == r["optimum"]),
            "planner_gap_pct": round(100 * (sum(r["planner"] for r in rows) / opt - 1), 2),
            "ffd_gap_pct": round(100 * (sum(r["ffd"] for r in rows) / opt - 1), 2),
            "worst_planner_gap_pct": round(
                max(100 * (r["planner"] / r["optimum"] - 1) for r in rows), 2
            ),
        }

    return {"small": totals(small), "small_instances": small, "scale": {**scale, **totals([scale])}}


def run_placement(config: PlacementConfig, console: Console | None = None) -> dict[str, Any]:
    """Run both parts; returns ``{"config", "scale", "optimality"}``."""
    if config.repeat < 1 or config.small_instances < 1:
        raise ValueError("repeat and small_instances must be at least 1")
    _scipy()
    status = console.status if console else None
    if status:
        with status(f"placing {config.slices:,} slices on {config.gpus:,} GPUs ×{config.repeat}"):
            scale = _time_scale(config)
        with status(f"solving {config.small_instances} integer programs for the optimum"):
            optimality = _optimality(config, scale["partition_demand"])
    else:
        scale = _time_scale(config)
        optimality = _optimality(config, scale["partition_demand"])
    return {"config": config.__dict__, "scale": scale, "optimality": optimality}


def render_placement(result: dict[str, Any], console: Console) -> None:
    """Print the timing table and the GPUs-used table."""
    s = result["scale"]
    table = Table(
        title=f"Placement at scale: {s['slices']:,} slices ({s['partition_slices']:,} on MIG "
        f"instances) on {s['gpus']:,} simulated GPUs ({s['mig_gpus']} with MIG)",
        title_justify="left",
    )
    for column in ("run", "median s", "placed", "pending", "GPUs used"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for label, key, outcome in (
        ("plan layouts + place", "plan_and_place_s", s["plan"]),
        ("place on existing instances", "place_on_existing_s", s["existing_only"]),
    ):
        table.add_row(
            label,
            f"{s[key]:.3f}",
            f"{outcome['placed']:,}",
            f"{outcome['pending']:,}",
            f"{outcome['gpus_used']:,}",
        )
    console.print(table)
    o = result["optimality"]
    table = Table(title="MIG GPUs used against the exact optimum (H100-80GB)", title_justify="left")
    for column in (
        "demands",
        "optimum",
        "planner",
        "FFD",
        "planner gap",
        "FFD gap",
        "planner optimal",
    ):
        table.add_column(column, justify="left" if column == "demands" else "right")
    for label, row in (
        (f"{o['small']['instances']} small (4–24 instances)", o["small"]),
        (f"scale ({sum(o['scale']['demand'].values()):,} instances)", o["scale"]),
    ):
        table.add_row(
            label,
            str(row["optimum_gpus"]),
            str(row["planner_gpus"]),
            str(row["ffd_gpus"]),
            f"{row['planner_gap_pct']:+.2f}%",
            f"{row['ffd_gap_pct']:+.2f}%",
            f"{row['planner_optimal']}/{row['instances']}",
        )
    console.print(table)


def placement_command(config: PlacementConfig, output: Path, console: Console) -> int:
    """Run the benchmark, print its tables and write its JSON to ``output``; return 0."""
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    result = run_placement(config, console)
    render_placement(result, console)
    payload = {"benchmark": "placement", "started": started, "machine": machine_info(), **result}
    write_json(output, payload)
    console.print(f"results written to {output}", highlight=False)
    return 0
