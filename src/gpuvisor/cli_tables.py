"""Tables the CLI prints for `gpuvisor get` and `gpuvisor keys list`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rich.table import Table
from rich.text import Text

from gpuvisor.quoting import printable
from gpuvisor.units import format_duration, format_size

__all__ = ["describe_deployment", "render_status", "render_table"]


def _spec(item: dict[str, Any], *path: str) -> Any:
    value: Any = item.get("spec", {})
    for part in path:
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _size(value: Any) -> str:
    return format_size(value) if isinstance(value, (int, float)) else "-"


def _selector(selector: Any) -> str:
    """A Pool's device selector as ``kind=gpu,model=H100*``; ``all`` when it selects every
    device (an empty one does)."""
    if not isinstance(selector, dict) or not selector:
        return "all"
    return ",".join(f"{label}={glob}" for label, glob in selector.items())


_COLUMNS: dict[str, list[tuple[str, Any]]] = {
    "tenants": [
        ("NAME", lambda i: i["metadata"]["name"]),
        ("WEIGHT", lambda i: _spec(i, "weight")),
        ("MEMORY QUOTA", lambda i: _size(_spec(i, "quota", "memory"))),
    ],
    "profiles": [
        ("NAME", lambda i: i["metadata"]["name"]),
        ("MEMORY", lambda i: _size(_spec(i, "memory"))),
        ("SHARE", lambda i: _spec(i, "computeShare")),
        ("ISOLATION", lambda i: _spec(i, "isolation")),
        ("CLASS", lambda i: _spec(i, "latencyClass")),
    ],
    "pools": [
        ("NAME", lambda i: i["metadata"]["name"]),
        ("TENANCY", lambda i: _spec(i, "tenancy")),
        ("SCHEDULER", lambda i: _spec(i, "scheduler")),
        ("SELECTOR", lambda i: _selector(_spec(i, "selector"))),
        ("NOTE", lambda i: "implicit (not applied)" if i.get("status", {}).get("implicit") else ""),
    ],
    "models": [
        ("TENANT", lambda i: i["metadata"].get("tenant")),
        ("NAME", lambda i: i["metadata"]["name"]),
        ("VERSION", lambda i: _spec(i, "version")),
        ("FORMAT", lambda i: _spec(i, "format")),
        ("SOURCE", lambda i: _spec(i, "source")),
    ],
    "deployments": [
        ("TENANT", lambda i: i["metadata"].get("tenant")),
        ("NAME", lambda i: i["metadata"]["name"]),
        ("MODEL", lambda i: _spec(i, "model")),
        ("PROFILE", lambda i: _spec(i, "profile")),
        (
            "READY",
            lambda i: f"{i.get('status', {}).get('readyReplicas', 0)}/{_spec(i, 'replicas')}",
        ),
        (
            "UPDATED",
            lambda i: f"{i.get('status', {}).get('updatedReplicas', 0)}/{_spec(i, 'replicas')}",
        ),
        ("REASON", lambda i: _deployment_reason(i.get("status", {}))),
    ],
    "devices": [
        ("ID", lambda i: i["id"]),
        ("KIND", lambda i: i["kind"]),
        ("MODEL", lambda i: i["model"]),
        ("MEMORY", lambda i: _size(i.get("memoryTotal"))),
        ("RESERVED", lambda i: _size(i.get("memoryReserved"))),
        ("THREADS/SMS", lambda i: i.get("threads") or i.get("smCount") or "-"),
        ("NUMA", lambda i: i.get("numaNode")),
        ("MIG", lambda i: "on" if i.get("migMode") else "off"),
        ("NODE", lambda i: i.get("node")),
        ("STATUS", lambda i: _device_status(i)),
        ("SLICES", lambda i: len(i.get("slices", []))),
    ],
    "slices": [
        ("ID", lambda i: i["id"]),
        ("DEVICE", lambda i: i.get("device") or "-"),
        ("STATE", lambda i: i["state"]),
        ("PID", lambda i: i.get("pid") or "-"),
        ("RESTARTS", lambda i: i.get("restarts")),
        ("QUEUED", lambda i: i.get("queued")),
        ("REASON", lambda i: i.get("reason")),
    ],
    "keys": [
        ("ID", lambda i: i["id"]),
        ("ROLE", lambda i: i["role"]),
        ("TENANT", lambda i: i.get("tenant") or "-"),
        ("CREATED", lambda i: str(i.get("created_at", ""))[:19]),
        ("EXPIRES", lambda i: str(i.get("expires_at") or "-")[:19]),
        ("REVOKED", lambda i: str(i.get("revoked_at") or "-")[:19]),
        ("DESCRIPTION", lambda i: i.get("description")),
    ],
}


def _device_status(item: dict[str, Any]) -> str:
    if item.get("cordoned"):
        return "cordoned"
    if not item.get("healthy", True):
        return "unhealthy" + (f": {item['healthReason']}" if item.get("healthReason") else "")
    return "ok"


def _seconds(value: Any) -> str:
    """A duration from the API (seconds) as the manifests write it, to 3 significant digits:
    ``0.1`` → ``100ms``, ``2.7952e-05`` → ``28us``."""
    if not isinstance(value, (int, float)):
        return "-"
    return "0" if value == 0 else format_duration(float(f"{value:.3g}"))


def _utc(epoch: Any) -> str:
    if not isinstance(epoch, (int, float)) or epoch <= 0:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _slice_lines(sl: dict[str, Any]) -> list[str]:
    """A slice of a described deployment: where it runs, then what it is given and how it
    does, then why it is not Ready (or, for one that fits nowhere, why on every device)."""
    where = sl.get("device") or "-"
    if sl.get("migInstance"):
        where += f" (MIG {sl['migInstance']})"
    lines = [f"  {sl['id']}  {sl['state']}  on {where}  pid {sl.get('pid') or '-'}"]
    if sl.get("model"):  # during a rolling update, which version each replica serves
        lines[0] += f"  serves {sl['model']}"
    unplaced = sl.get("unplacedReasons") or {}
    if unplaced:
        lines.append("    cannot be placed:")
        lines.extend(f"      {device}: {why}" for device, why in sorted(unplaced.items()))
    elif sl.get("reason"):
        lines.append(f"    {sl['reason']}")
    lines.append(
        f"    given: {sl.get('latencyClass', '-')} class, computeShare "
        f"{sl.get('computeShare', '-')}, memory {_size(sl.get('memory'))}, "
        f"{sl.get('isolation', '-')} isolation"
    )
    lines.append(
        f"    since {_utc(sl.get('since'))}: {sl.get('restarts', 0)} restart(s), "
        f"{sl.get('queued', 0)} queued"
        + (
            f", memory used {_size(sl['memoryUsed'])} (of {_size(sl.get('memory'))})"
            if sl.get("memoryUsed")
            else f", worker RSS {_size(sl['rssBytes'])} at load"
            if sl.get("rssBytes")
            else ""
        )
    )
    measured = sl.get("profileSeconds") or {}
    if measured:
        per_batch = ", ".join(
            f"{size} → {_seconds(seconds)}"
            for size, seconds in sorted(measured.items(), key=lambda kv: int(kv[0]))
        )
        lines.append(f"    time per batch: {per_batch}")
    if sl.get("batchingNote"):
        lines.append(f"    {sl['batchingNote']}")
    return lines


def _deployment_reason(status: dict[str, Any]) -> str:
    """What keeps a deployment from serving fully, each reason once: unloaded, or its slices'
    reasons (replicas that fit nowhere share one)."""
    if status.get("unloaded"):
        return "unloaded (load it again through the model repository API)"
    reasons = (s["reason"] for s in status.get("slices", []) if s["reason"])
    return "; ".join(dict.fromkeys(reasons))


def describe_deployment(body: dict[str, Any]) -> str:
    """Return a deployment as an operator reads it: what it asks for, how far an update has
    come, then each slice's device, state and why, what it is given and what its batches
    cost, with one line per device for a slice that fits nowhere."""
    meta, spec, status = body["metadata"], body.get("spec", {}), body.get("status", {})
    placement = spec.get("placement", {})
    batching = spec.get("batching", {})
    latency = (spec.get("slo") or {}).get("latency")
    replicas = spec.get("replicas")
    updated = status.get("updatedReplicas")
    rollout = f"maxSurge {(spec.get('rollout') or {}).get('maxSurge', 1)}"
    if status.get("rollout"):
        rollout += f"; {status['rollout']}"
    lines = [
        f"Name:        {meta['name']}",
        f"Tenant:      {meta.get('tenant') or '-'}",
        f"Model:       {spec.get('model')}"
        + ("" if "@" in str(spec.get("model")) else " (its highest version)"),
        f"Profile:     {spec.get('profile')}",
        f"Pool:        {spec.get('pool')}",
        f"Replicas:    {status.get('readyReplicas', 0)} ready of {replicas}"
        + (f", {updated} updated" if updated is not None and updated != replicas else ""),
        f"Rollout:     {rollout}",
        f"Batching:    maxBatchSize {batching.get('maxBatchSize')}, "
        f"maxQueueDelay {_seconds(batching.get('maxQueueDelay'))}",
        f"SLO:         latency {_seconds(latency)}" if latency else "SLO:         none",
        f"Placement:   numa {placement.get('numa', 'any')}, "
        f"antiAffinity {str(placement.get('antiAffinity', False)).lower()}, "
        f"disallowMigration {str(placement.get('disallowMigration', False)).lower()}",
    ]
    if status.get("unloaded"):
        lines.append("Unloaded:    yes (load it again through the model repository API)")
    lines.append("Slices:")
    slices = status.get("slices", [])
    if not slices:
        lines.append("  (none)")
    for sl in slices:
        lines.extend(_slice_lines(sl))
    return printable("\n".join(lines), newlines=True)  # reasons quote what tenants named


def _age(seconds: float) -> str:
    """``3m 12s``, ``2h 5m``, ``4d 3h``: how long, to the two largest units."""
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    while len(parts) > 1 and parts[0][0] == 0:
        parts.pop(0)
    return " ".join(f"{n}{unit}" for n, unit in parts[:2])


def render_status(data: dict[str, Any], url: str, now: float) -> str:
    """The node's summary as `gpuvisor status` prints it: whether it is ready, since when,
    its devices, its slices by state (those in sight of the key) and whose key asked."""
    started = data.get("startedAt")
    since = "-"
    if isinstance(started, (int, float)) and started > 0:
        since = f"{_utc(started)} (up {_age(now - started)})"
    slices = data.get("slices") or {}
    counts = ", ".join(f"{n} {state}" for state, n in sorted(slices.items())) or "none"
    principal = data.get("principal") or {}
    role, tenant = principal.get("role") or "-", principal.get("tenant")
    return "\n".join(
        [
            f"node:     {url}  {'ready' if data.get('ready') else 'not ready'}",
            f"started:  {since}",
            f"devices:  {data.get('devices', 0)}",
            f"slices:   {counts}",
            f"key:      {role} key" + (f" of tenant '{tenant}'" if tenant else ""),
        ]
    )


def render_table(kind: str, items: list[dict[str, Any]]) -> Table:
    """Return a rich table of ``items`` with the columns that matter for ``kind``.

    Cells are plain text, never markup: a model path like ``models/[old]/x.onnx`` is shown
    as it is, whichever console prints the table."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    columns = _COLUMNS[kind]
    for header, _ in columns:
        table.add_column(header, overflow="fold")
    for item in items:
        table.add_row(
            *(
                Text("" if (v := getter(item)) is None else printable(str(v)))
                for _, getter in columns
            )
        )
    return table
