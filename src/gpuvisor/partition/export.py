"""Configuration for NVIDIA's own tools from a plan: mig-parted layouts, device-plugin sharing.

gpuvisor never changes a GPU's MIG layout; the operator applies these files:

- ``nvidia-mig-parted apply -f mig-parted.yaml -c gpuvisor-<node>`` on each node. The format
  is mig-parted's ``version: v1`` spec (``api/spec/v1/spec.go``): ``mig-configs`` maps a
  config name to entries ``{devices: all | [indices], mig-enabled, mig-devices: {profile:
  count}}``. mig-parted creates instances by count and the driver picks their offsets.
- the NVIDIA device plugin's config file (``api/config/v1``): ``flags.migStrategy`` and
  ``sharing.timeSlicing`` or ``sharing.mps`` with ``resources: [{name, replicas}]``, one file
  per node (the plugin applies one sharing method to every GPU of a node).

``check_mig_parted`` and ``check_device_plugin`` check a document against those formats'
documented rules; the exporters' output passes them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from gpuvisor.partition.fleet import FleetPlan, GpuPlan
from gpuvisor.partition.mig import layout_counts

__all__ = [
    "check_device_plugin",
    "check_mig_parted",
    "device_plugin_configs",
    "mig_parted_config",
]

_PROFILE_RE = re.compile(r"^(\d+c\.)?\d+g\.\d+gb(\+[A-Za-z][A-Za-z0-9]*(,[A-Za-z][A-Za-z0-9]*)*)?$")
_MIG_RESOURCE_RE = re.compile(r"^nvidia\.com/mig-(\d+c\.)?\d+g\.\d+gb(\.[a-z0-9]+)*$")
_MIG_INDEX_RE = re.compile(r"^\d+:\d+$")
_UUID_RE = re.compile(
    r"^(GPU|MIG)-[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
SHARING = ("time-slicing", "mps")


def _nodes(plan: FleetPlan) -> dict[str, list[GpuPlan]]:
    nodes: dict[str, list[GpuPlan]] = {}
    for gpu in plan.gpus:
        if gpu.device.kind == "gpu":
            nodes.setdefault(gpu.device.node, []).append(gpu)
    return nodes


def _index(gpu: GpuPlan, position: int) -> int:
    return gpu.device.index if gpu.device.index is not None else position


def mig_parted_config(plan: FleetPlan) -> dict[str, Any]:
    """Return one mig-parted document with a config per node, ``gpuvisor-<node>``: GPUs with
    the same planned profile counts share an entry; GPUs without MIG get ``mig-enabled: false``."""
    configs: dict[str, list[dict[str, Any]]] = {}
    for node, gpus in sorted(_nodes(plan).items()):
        groups: dict[tuple[bool, tuple[tuple[str, int], ...]], list[int]] = {}
        for position, gpu in enumerate(gpus):
            counts = tuple(sorted(layout_counts(gpu.instances).items()))
            groups.setdefault((gpu.device.mig_mode, counts), []).append(_index(gpu, position))
        entries: list[dict[str, Any]] = []
        for (enabled, counts), indices in sorted(groups.items(), key=lambda g: min(g[1])):
            entry: dict[str, Any] = {"devices": sorted(indices), "mig-enabled": enabled}
            if enabled:
                entry["mig-devices"] = dict(counts)
            entries.append(entry)
        configs[f"gpuvisor-{node}"] = entries
    return {"version": "v1", "mig-configs": configs}


def device_plugin_configs(
    plan: FleetPlan, sharing: str = "time-slicing"
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Return the device plugin's config for each node, and notes for the operator.

    Whole GPUs holding several slices are shared (``replicas`` = the most slices on one GPU
    of the node) by time-slicing or, where the node has no MIG GPU, MPS if asked. MIG
    instances hold one slice each and are advertised by the ``mixed`` strategy
    (``nvidia.com/mig-<profile>``). Raises ValueError for an unknown ``sharing``.
    """
    if sharing not in SHARING:
        raise ValueError(f"unknown sharing {sharing!r}: use time-slicing or mps")
    configs: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    for node, gpus in sorted(_nodes(plan).items()):
        has_mig = any(g.device.mig_mode for g in gpus)
        config: dict[str, Any] = {
            "version": "v1",
            "flags": {"migStrategy": "mixed" if has_mig else "none"},
        }
        replicas = max((len(g.slices) for g in gpus if not g.device.mig_mode), default=0)
        if replicas > 1:
            method = sharing
            if sharing == "mps" and has_mig:
                method = "time-slicing"
                notes.append(
                    f"{node}: the device plugin does not share MIG-enabled nodes with MPS; "
                    "its config uses time-slicing"
                )
            resource = {"name": "nvidia.com/gpu", "replicas": replicas}
            if method == "mps":
                config["sharing"] = {"mps": {"resources": [resource]}}
            else:
                config["sharing"] = {
                    "timeSlicing": {"failRequestsGreaterThanOne": True, "resources": [resource]}
                }
        configs[node] = config
    return configs, notes


def _mapping(value: Any, where: str, problems: list[str]) -> Mapping[str, Any] | None:
    if not isinstance(value, Mapping):
        problems.append(f"{where}: expected a mapping, got {type(value).__name__}")
        return None
    return value


def _unexpected(
    value: Mapping[str, Any], allowed: set[str], where: str, problems: list[str]
) -> None:
    for key in value:
        if key not in allowed:
            problems.append(f"{where}: unexpected field {key!r}")


def check_mig_parted(document: Any) -> list[str]:
    """Return what makes ``document`` an invalid mig-parted ``v1`` config (empty: valid)."""
    problems: list[str] = []
    doc = _mapping(document, "document", problems)
    if doc is None:
        return problems
    _unexpected(doc, {"version", "mig-configs"}, "document", problems)
    if doc.get("version") != "v1":
        problems.append(f"version: must be 'v1', got {doc.get('version')!r}")
    configs = _mapping(doc.get("mig-configs"), "mig-configs", problems)
    if configs is None:
        return problems
    if not configs:
        problems.append("mig-configs: at least one entry is required")
    for name, entries in configs.items():
        if not isinstance(entries, list) or not entries:
            problems.append(f"mig-configs.{name}: at least one entry is required")
            continue
        for i, raw in enumerate(entries):
            _check_mig_entry(raw, f"mig-configs.{name}[{i}]", problems)
    return problems


def _check_mig_entry(raw: Any, where: str, problems: list[str]) -> None:
    entry = _mapping(raw, where, problems)
    if entry is None:
        return
    _unexpected(entry, {"device-filter", "devices", "mig-enabled", "mig-devices"}, where, problems)
    for required in ("devices", "mig-enabled"):
        if required not in entry:
            problems.append(f"{where}: missing required field {required!r}")
    devices = entry.get("devices")
    if (
        "devices" in entry
        and devices != "all"
        and not (
            isinstance(devices, list)
            and all(isinstance(d, int) and not isinstance(d, bool) for d in devices)
        )
    ):
        problems.append(f"{where}.devices: must be 'all' or a list of GPU indices, got {devices!r}")
    device_filter = entry.get("device-filter")
    if "device-filter" in entry and not (
        isinstance(device_filter, str)
        or (isinstance(device_filter, list) and all(isinstance(f, str) for f in device_filter))
    ):
        problems.append(f"{where}.device-filter: must be a string or a list of strings")
    enabled = entry.get("mig-enabled")
    if "mig-enabled" in entry and not isinstance(enabled, bool):
        problems.append(f"{where}.mig-enabled: must be true or false, got {enabled!r}")
    mig_devices = entry.get("mig-devices")
    if enabled is True and mig_devices is None:
        problems.append(f"{where}: 'mig-devices' is required when 'mig-enabled' is true")
    if mig_devices is None:
        return
    counts = _mapping(mig_devices, f"{where}.mig-devices", problems)
    if counts is None:
        return
    if enabled is False and counts:
        problems.append(f"{where}: MIG devices included when 'mig-enabled' is false")
    for profile, count in counts.items():
        if not isinstance(profile, str) or not _PROFILE_RE.match(profile):
            problems.append(f"{where}.mig-devices: invalid MIG profile {profile!r}")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            problems.append(f"{where}.mig-devices.{profile}: count must be an integer ≥ 0")


def _valid_device_ref(value: Any) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return value >= 0
    return isinstance(value, str) and (
        value.isdigit() or bool(_MIG_INDEX_RE.match(value)) or bool(_UUID_RE.match(value))
    )


def check_device_plugin(document: Any) -> list[str]:
    """Return what makes ``document`` an invalid NVIDIA device-plugin ``v1`` config."""
    problems: list[str] = []
    doc = _mapping(document, "document", problems)
    if doc is None:
        return problems
    _unexpected(doc, {"version", "flags", "resources", "sharing", "imex"}, "document", problems)
    if doc.get("version", "v1") != "v1":
        problems.append(f"version: must be 'v1', got {doc.get('version')!r}")
    flags = _mapping(doc.get("flags", {}), "flags", problems) or {}
    strategy = flags.get("migStrategy", "none")
    if strategy not in ("none", "single", "mixed"):
        problems.append(f"flags.migStrategy: must be none, single or mixed, got {strategy!r}")
    sharing = _mapping(doc.get("sharing", {}), "sharing", problems) or {}
    _unexpected(sharing, {"timeSlicing", "mps"}, "sharing", problems)
    if sharing.get("timeSlicing") and sharing.get("mps"):
        problems.append("sharing: time-slicing and MPS are mutually exclusive")
    for key in ("timeSlicing", "mps"):
        if key in sharing:
            _check_sharing(sharing[key], key, strategy, problems)
    return problems


def _check_sharing(raw: Any, key: str, strategy: str, problems: list[str]) -> None:
    where = f"sharing.{key}"
    replicated = _mapping(raw, where, problems)
    if replicated is None:
        return
    allowed = {"strategy", "renameByDefault", "failRequestsGreaterThanOne", "resources"}
    _unexpected(replicated, allowed, where, problems)
    if replicated.get("strategy", "") != "":
        problems.append(
            f"{where}.strategy: unknown time-slicing strategy {replicated['strategy']!r}"
        )
    for flag in ("renameByDefault", "failRequestsGreaterThanOne"):
        if flag in replicated and not isinstance(replicated[flag], bool):
            problems.append(f"{where}.{flag}: must be true or false")
    resources = replicated.get("resources")
    if not isinstance(resources, list) or not resources:
        problems.append(f"{where}.resources: no resources specified")
        return
    if key == "mps" and strategy != "none":
        problems.append(f"{where}: sharing with MPS is not supported on devices with MIG enabled")
    for i, raw_resource in enumerate(resources):
        at = f"{where}.resources[{i}]"
        resource = _mapping(raw_resource, at, problems)
        if resource is None:
            continue
        _unexpected(resource, {"name", "rename", "devices", "replicas"}, at, problems)
        name = resource.get("name")
        if name is None:
            problems.append(f"{at}: no resource name specified")
        elif key == "mps" and name != "nvidia.com/gpu":
            problems.append(f"{at}.name: MPS shares only nvidia.com/gpu, got {name!r}")
        elif name != "nvidia.com/gpu" and not (
            isinstance(name, str) and _MIG_RESOURCE_RE.match(name)
        ):
            problems.append(f"{at}.name: not a shareable resource: {name!r}")
        replicas = resource.get("replicas")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas <= 0:
            problems.append(f"{at}.replicas: must be an integer > 0, got {replicas!r}")
        devices = resource.get("devices", "all")
        if not (
            devices == "all"
            or (isinstance(devices, int) and not isinstance(devices, bool) and devices > 0)
            or (isinstance(devices, list) and all(_valid_device_ref(d) for d in devices))
        ):
            problems.append(f"{at}.devices: must be 'all', a count > 0 or a list of devices")
