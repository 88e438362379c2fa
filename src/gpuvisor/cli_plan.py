"""`gpuvisor plan`: offline capacity planning of a Fleet's GPUs for a set of manifests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from gpuvisor.cli_options import count_option, expand_home, fail, run_bench, stdout_console
from gpuvisor.errors import ConfigError, GpuvisorError, SpecError
from gpuvisor.units import format_size

if TYPE_CHECKING:
    from gpuvisor.inventory.device import Device
    from gpuvisor.partition.fleet import FleetPlan, GpuPlan
    from gpuvisor.spec.kinds import Resource

__all__ = ["bench_placement", "load_fleet", "load_manifests", "plan_command", "write_exports"]

# The planner, the spec and the inventory are imported by the functions that use them, so that
# registering `plan` on the app does not slow down every other command.

console = Console()
err_console = Console(stderr=True)


def _read(path: Path) -> list[Resource]:
    from gpuvisor.spec.loader import load_documents

    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    return load_documents(path.read_text(), source=path.name, base_dir=path.parent)


def load_fleet(path: Path) -> list[Device]:
    """Return the simulated devices of the one Fleet document in ``path``."""
    from gpuvisor.inventory.simulated import devices_from_fleet
    from gpuvisor.spec.kinds import Fleet

    fleets = [r for r in _read(path) if isinstance(r, Fleet)]
    if len(fleets) != 1:
        raise ConfigError(
            f"{path}: expected one Fleet document, found {len(fleets)} "
            "(a Fleet lists nodes and their GPUs; see docs/partitioning.md)"
        )
    return devices_from_fleet(fleets[0])


def load_manifests(paths: list[Path]) -> list[Resource]:
    """Return the documents of every manifest (a folder means its *.yaml and *.yml files).
    An object in several files is taken as the last one says, as ``apply`` of the same files
    would leave it."""
    from gpuvisor.spec.kinds import resource_key

    resources: list[Resource] = []
    problems: list[str] = []
    for path in paths:
        files = sorted([*path.glob("*.yaml"), *path.glob("*.yml")]) if path.is_dir() else [path]
        for file in files:
            try:
                resources.extend(_read(file))
            except SpecError as exc:
                problems.append(exc.message)
    if problems:
        raise SpecError("\n".join(problems))
    last = {resource_key(r): r for r in resources}
    return [r for r in resources if last[resource_key(r)] is r]


def write_exports(plan: FleetPlan, folder: Path, sharing: str) -> tuple[list[Path], list[str]]:
    """Write ``mig-parted.yaml`` and ``device-plugin-<node>.yaml`` into ``folder``.

    Returns the files written and notes for the operator. Each document is checked against its
    tool's format first; a failure there is a bug in gpuvisor (GpuvisorError).
    """
    import yaml

    from gpuvisor.partition.export import (
        check_device_plugin,
        check_mig_parted,
        device_plugin_configs,
        mig_parted_config,
    )

    mig = mig_parted_config(plan)
    if not mig["mig-configs"]:
        raise ConfigError(
            "nothing to export: the fleet has no GPU (mig-parted.yaml and the device "
            "plugin's configuration describe GPUs); plan without --export, or add devices "
            "to the Fleet's nodes"
        )
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    problems = check_mig_parted(mig)
    plugins, notes = device_plugin_configs(plan, sharing)
    for config in plugins.values():
        problems += check_device_plugin(config)
    if problems:
        raise GpuvisorError("exported configuration is invalid: " + "; ".join(problems))
    nodes = ", ".join(name.removeprefix("gpuvisor-") for name in mig["mig-configs"])
    header = (
        "# MIG layouts planned by `gpuvisor plan` for nodes: " + nodes + "\n"
        "# Apply on each node: nvidia-mig-parted apply -f mig-parted.yaml -c gpuvisor-<node>\n"
        "# mig-parted creates instances by count; the driver chooses their offsets.\n"
    )
    path = folder / "mig-parted.yaml"
    path.write_text(header + yaml.safe_dump(mig, sort_keys=False))
    written.append(path)
    for node, config in plugins.items():
        path = folder / f"device-plugin-{node}.yaml"
        path.write_text(
            f"# NVIDIA device plugin config for node {node}, from `gpuvisor plan`\n"
            + yaml.safe_dump(config, sort_keys=False)
        )
        written.append(path)
    return written, notes


def _instances_cell(gpu: GpuPlan) -> str:
    parts = []
    for instance in gpu.instances:
        holder = gpu.holders.get(instance.start)
        who = (
            f"{holder.workload.tenant}/{holder.workload.deployment}#{holder.replica}"
            if holder
            else "free"
        )
        new = " (new)" if instance.start in gpu.added else ""
        parts.append(f"{instance.profile}@{instance.start} {who}{new}")
    return "\n".join(parts) or "(no instances)"


def _slices_cell(gpu: GpuPlan) -> str:
    counts: dict[str, int] = {}
    for h in gpu.slices:
        key = f"{h.workload.tenant}/{h.workload.deployment}"
        counts[key] = counts.get(key, 0) + 1
    return "\n".join(f"{k} ×{n}" if n > 1 else k for k, n in counts.items()) or "-"


def render_plan(plan: FleetPlan, out: Console) -> None:
    """Print the plan as tables: MIG GPUs, whole GPUs, pending replicas, then the totals."""
    from rich.table import Table

    from gpuvisor.partition.report import plan_summary

    mig = [g for g in plan.gpus if g.geometry is not None]
    whole = [g for g in plan.gpus if g.geometry is None and g.device.kind == "gpu"]
    if mig:
        table = Table(title="MIG GPUs", title_justify="left")
        for column in (
            "GPU",
            "MODEL",
            "INSTANCES (profile@start holder)",
            "MEMORY SLICES",
            "UNUSABLE",
        ):
            table.add_column(column)
        for gpu in mig:
            geometry = gpu.geometry
            assert geometry is not None
            used = sum(
                profile.memory_slices
                for i in gpu.instances
                if (profile := geometry.profile(i.profile)) is not None
            )
            unusable = plan.unusable(gpu)
            table.add_row(
                gpu.device.id,
                gpu.device.model,
                _instances_cell(gpu),
                f"{used}/{geometry.memory_slices}",
                ",".join(map(str, unusable)) or "-",
            )
        out.print(table)
    if whole:
        table = Table(title="Whole GPUs (no MIG)", title_justify="left")
        for column in ("GPU", "MODEL", "SLICES", "MEMORY", "SHARE"):
            table.add_column(column)
        for gpu in whole:
            table.add_row(
                gpu.device.id,
                gpu.device.model,
                _slices_cell(gpu),
                f"{format_size(gpu.memory_used)}/{format_size(gpu.device.memory_total)}",
                f"{gpu.share_used:.2f}",
            )
        out.print(table)
    if plan.pending:
        table = Table(title="Pending", title_justify="left")
        for column in ("DEPLOYMENT", "REPLICAS", "WHY", "DEFRAGMENTATION"):
            table.add_column(column)
        for pending in plan.pending:
            table.add_row(
                f"{pending.workload.tenant}/{pending.workload.deployment}",
                str(pending.replicas),
                "\n".join(pending.reasons),
                pending.defrag or "-",
            )
        out.print(table)
    _print_summary(plan_summary(plan), out, bool(plan.requested_profiles))


def _print_summary(s: dict[str, Any], out: Console, profiles_requested: bool) -> None:
    lines = [
        f"GPUs used: {s['gpusUsed']} of {s['gpus']}; slices placed {s['slicesPlaced']}, "
        f"pending {s['slicesPending']}",
    ]
    if s["migGpus"]:
        lines.append(
            f"MIG: {s['migSlicesUsed']}/{s['migSlices']} memory slices in instances "
            f"({100 * (s['migSliceUtilisation'] or 0):.1f}%), {s['instancesHoldingSlices']}"
            f"/{s['instances']} instances hold a slice, {s['instancesAdded']} added by this plan"
        )
        lines.append(
            f"fragmentation: {s['unusableMigSlices']} of {s['freeMigSlices']} free memory slices "
            "fit no requested profile"
            if profiles_requested
            else "fragmentation: not measured (no partition-tier deployment asks for a profile)"
        )
    if s["wholeGpuMemory"]:
        lines.append(
            f"whole GPUs: {format_size(s['wholeGpuMemoryUsed'])} of "
            f"{format_size(s['wholeGpuMemory'])} memory reserved "
            f"({100 * (s['wholeGpuUtilisation'] or 0):.1f}%)"
        )
    for line in lines:
        out.print(line, highlight=False)


def plan_command(
    fleet: Annotated[
        Path,
        typer.Option(
            "--fleet",
            metavar="FILE",
            callback=expand_home,
            help="Fleet YAML: the nodes and (simulated) GPUs to plan for",
        ),
    ],
    filename: Annotated[
        list[Path],
        typer.Option(
            "--filename",
            "-f",
            metavar="FILE",
            help="manifests with Profiles, Pools, Deployments (a folder: all its YAML)",
            callback=expand_home,
        ),
    ],
    output: Annotated[
        str, typer.Option("--output", "-o", metavar="FORMAT", help="table or json")
    ] = "table",
    export: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="folder to write mig-parted.yaml and device-plugin-<node>.yaml into",
            callback=expand_home,
        ),
    ] = None,
    sharing: Annotated[
        str,
        typer.Option(
            metavar="MODE",
            help="how whole GPUs are shared in the device-plugin export: time-slicing or mps",
        ),
    ] = "time-slicing",
    existing_only: Annotated[
        bool,
        typer.Option(
            "--existing-only", help="use only the MIG instances the Fleet declares, as a node does"
        ),
    ] = False,
) -> None:
    """Plan a fleet offline: where each deployment's replicas go (MIG instances, whole GPUs),
    what stays pending and why, utilisation and fragmentation. Nothing is changed anywhere."""
    from gpuvisor.partition.export import SHARING
    from gpuvisor.partition.fleet import plan_fleet
    from gpuvisor.partition.report import plan_to_dict
    from gpuvisor.partition.workloads import workloads_from

    try:
        if output not in ("table", "json"):
            raise ConfigError(f"--output must be table or json, got {output!r}")
        if sharing not in SHARING:
            raise ConfigError(f"--sharing must be time-slicing or mps, got {sharing!r}")
        devices = load_fleet(fleet)
        workloads = workloads_from(load_manifests(filename))
        plan = plan_fleet(devices, workloads, existing_only=existing_only)
        written, notes = write_exports(plan, export, sharing) if export else ([], [])
    except GpuvisorError as exc:
        fail(exc)
    if output == "json":
        print(json.dumps(plan_to_dict(plan), indent=2))
    else:
        render_plan(plan, stdout_console())  # names from the manifests: never markup
    for path in written:
        err_console.print(f"wrote {path}", highlight=False, markup=False)
    for note in notes:
        err_console.print(f"note: {note}", highlight=False, markup=False)
    if not workloads:
        err_console.print(
            "warning: the manifests hold no Deployment: nothing was planned (give -f the "
            "files with your Deployments, Profiles and Pools)",
            highlight=False,
            markup=False,
        )


def bench_placement(
    gpus: Annotated[int, count_option("simulated GPUs in the fleet")] = 1000,
    mig_gpus: Annotated[int, count_option("of which MIG-enabled (no layout yet)", minimum=0)] = 700,
    slices: Annotated[int, count_option("slices (replicas) to place")] = 10_000,
    partition_slices: Annotated[
        int,
        count_option("of which partition-tier (one MIG instance each)", minimum=0),
    ] = 2_000,
    repeat: Annotated[int, count_option("timed runs; medians are reported")] = 3,
    small: Annotated[
        int,
        count_option("small random demands solved exactly for the optimum"),
    ] = 40,
    output: Annotated[Path, typer.Option("--output", "-o", help="JSON results file")] = Path(
        "bench-results/placement.json"
    ),
) -> None:
    """Placement: time to place 10,000 slices on 1,000 simulated GPUs, and MIG GPUs used by the
    planner and by first-fit decreasing against the exact optimum (scipy.optimize.milp)."""
    from gpuvisor.bench.placement import PlacementConfig, placement_command

    config = PlacementConfig(
        gpus=gpus,
        mig_gpus=min(mig_gpus, gpus),
        slices=slices,
        partition_slices=min(partition_slices, slices),
        repeat=repeat,
        small_instances=small,
    )
    run_bench(lambda: placement_command(config, output, console), output)
