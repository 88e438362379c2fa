"""The dashboard's data: one JSON document, scoped to the caller's key, that the /ui page and
`gpuvisor top` both render.

It answers, first, "is anyone starving or waiting, and who is using the device": devices
with their memory split by slice and their utilisation, each tenant's share of device time
against its entitlement, deployments with their state and latency, and the reasons a slice
is not serving. An admin or operator key sees every tenant; a tenant key sees its own
objects only, other tenants' slices on a shared device folded into one anonymous "others".
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from gpuvisor import __version__
from gpuvisor.spec.kinds import Deployment, Tenant

if TYPE_CHECKING:
    from prometheus_client import Counter

    from gpuvisor.control.slices import SliceState
    from gpuvisor.node import Node
    from gpuvisor.security.keys import Principal
    from gpuvisor.telemetry.recent import RecentActivity

__all__ = ["STARVING_SHARE", "STARVING_WAIT", "attention", "build_dashboard", "tenant_view"]

#: A tenant with queued work that gets less than this fraction of its entitlement, while its
#: requests wait at least ``STARVING_WAIT`` seconds (p99) and other tenants use the device
#: time it misses, is starving: the guarantee is not met.
STARVING_SHARE = 0.8
STARVING_WAIT = 0.05
_MEMORY_WARNING = 0.9  # a slice using this much of its memory cap is flagged
_STATE_ORDER = ("Failed", "Pending", "Restarting", "Loading", "Stopping")


def build_dashboard(node: Node, principal: Principal) -> dict[str, Any]:
    """Return the dashboard document for ``principal`` (see docs/observability.md)."""
    assert node.controller is not None
    controller = node.controller
    visible = principal.may_see

    slices = list(controller.slices.values())
    sample = node.sampler.latest if node.sampler is not None else None
    readings = sample.devices if sample is not None else {}
    slice_memory = sample.slice_memory if sample is not None else {}
    shares = node.recent.busy_share()
    devices = [
        _device(device, slices, readings.get(device.id), slice_memory, shares, visible)
        for device in node.topology.devices
    ]
    tenants = [
        tenant_view(node.recent, t, slices, shares)
        for t in controller.resources
        if isinstance(t, Tenant) and visible(t.metadata.name)
    ]
    requests = _counts(node.metrics.requests, "outcome")
    deployments = [
        _deployment(node, d, requests)
        for d in controller.deployments()
        if visible(d.metadata.tenant or "")
    ]
    pending = [
        {
            "slice": s.id,
            "tenant": s.tenant,
            "deployment": s.deployment,
            "state": s.state,
            "reason": s.reason,
            "since": s.since,
            "replaces": s.replaces,
        }
        for s in sorted(slices, key=lambda s: s.id)
        if visible(s.tenant) and s.state != "Ready"
    ]
    return {
        "generatedAt": time.time(),
        "viewer": {"role": principal.role, "tenant": principal.tenant},
        "node": {
            "version": __version__,
            "cluster": node.spec.cluster,
            "ready": node.ready,
            "startedAt": node.started_at,
            "samplePeriod": node.spec.telemetry.sample_period,
            "shareWindow": node.recent.share_window,
            "latencyWindow": node.recent.window,
        },
        "attention": attention(devices, tenants, deployments, pending),
        "devices": devices,
        "tenants": tenants,
        "deployments": deployments,
        "pending": pending,
    }


def _device(
    device: Any,
    slices: list[SliceState],
    reading: Any,
    slice_memory: dict[str, int],
    shares: dict[tuple[str, str], float],
    visible: Any,
) -> dict[str, Any]:
    on_device = [s for s in slices if s.device_id == device.id and s.state != "Failed"]
    own = [s for s in on_device if visible(s.tenant)]
    others = [s for s in on_device if not visible(s.tenant)]
    busy = {t: share for (d, t), share in shares.items() if d == device.id}
    return {
        "id": device.id,
        "model": device.model,
        "kind": device.kind,
        "healthy": device.healthy and (reading is None or reading.healthy),
        "problem": (reading.problem if reading is not None else "") or device.health_reason,
        "cordoned": device.cordoned,
        "utilization": reading.utilization if reading is not None else None,
        "temperature": reading.temperature if reading is not None else None,
        "power": reading.power if reading is not None else None,
        "throttle": sorted(reading.throttle) if reading is not None else [],
        "memoryTotal": device.memory_total,
        "memoryUsed": reading.memory_used if reading is not None else None,
        "memoryReserved": sum(s.memory for s in on_device),
        "slices": [
            {
                "slice": s.id,
                "tenant": s.tenant,
                "deployment": s.deployment,
                "state": s.state,
                "memoryLimit": s.memory,
                "memoryUsed": slice_memory.get(s.id),
                "computeShare": s.compute_share,
            }
            for s in sorted(own, key=lambda s: s.id)
        ],
        "others": {
            "slices": len(others),
            "memoryLimit": sum(s.memory for s in others),
            # a shared worker hosts several slices and reports its memory for each: count
            # each worker process once (a slice with no worker counts on its own)
            "memoryUsed": sum(
                {(s.worker_pid or s.id): slice_memory.get(s.id, 0) for s in others}.values()
            ),
            "share": sum(v for t, v in busy.items() if not visible(t)),
        }
        if others
        else None,
        "shares": {t: v for t, v in sorted(busy.items()) if visible(t)},
        "busy": sum(busy.values()),
    }


#: Outcomes of requests turned away without running (an invalid request, over the tenant's
#: rate or queue cap, a deadline it could not meet or that passed while it was queued, the
#: client gone): what the tenants' refusals count too. The rest failed on the server's side
#: (a model that failed, a worker that crashed, no slice ready). A deadline never fails a
#: request that runs: one granted the device is answered.
_REFUSED = {
    "invalid_request",
    "too_many_requests",
    "deadline_exceeded",
    "client_closed",
    "not_found",
}


def _by_whose_doing(outcomes: dict[str, float]) -> dict[str, float]:
    """Requests since the node started: ``ok``, ``refused`` (turned away without running)
    and ``failed`` (the server's doing)."""
    out = {"ok": 0.0, "refused": 0.0, "failed": 0.0}
    for outcome, count in outcomes.items():
        if outcome == "ok":
            out["ok"] += count
        elif outcome in _REFUSED or (outcome.isdigit() and outcome.startswith("4")):
            out["refused"] += count
        else:
            out["failed"] += count
    return out


def tenant_view(
    recent: RecentActivity,
    tenant: Tenant,
    slices: list[SliceState],
    shares: dict[tuple[str, str], float],
) -> dict[str, Any]:
    name = tenant.metadata.name
    serving = [s for s in slices if s.tenant == name and s.state == "Ready" and s.device_id]
    per_device: dict[str, dict[str, Any]] = {}
    for s in serving:
        assert s.device_id is not None
        entry = per_device.setdefault(
            s.device_id, {"device": s.device_id, "share": 0.0, "entitlement": 0.0, "queued": 0}
        )
        entry["entitlement"] += s.compute_share
        entry["queued"] += len(s.queue.items) if s.queue is not None else 0
    for (device, owner), share in shares.items():
        if owner == name:
            per_device.setdefault(
                device, {"device": device, "share": 0.0, "entitlement": 0.0, "queued": 0}
            )["share"] = share
    wait_p99 = recent.wait_p99(name)
    queued = sum(e["queued"] for e in per_device.values())
    device_busy: dict[str, float] = {}
    for (device, _), share in shares.items():
        device_busy[device] = device_busy.get(device, 0.0) + share
    starving = [
        e["device"]
        for e in per_device.values()
        if e["queued"] > 0
        and e["entitlement"] > 0
        and e["share"] < STARVING_SHARE * e["entitlement"]
        and (wait_p99 or 0.0) >= STARVING_WAIT
        # others took the device time it missed: on an idle device the wait is the host's
        # (CPU, network), not the scheduler's
        and device_busy.get(e["device"], 0.0) - e["share"] >= e["entitlement"] - e["share"]
    ]
    rejections = recent.rejections(name)
    state = "starving" if starving else "waiting" if queued else "ok"
    return {
        "name": name,
        "weight": tenant.spec.weight,
        "state": state,
        "starvingOn": starving,
        "queued": queued,
        "waitP99": wait_p99,
        "share": sum(e["share"] for e in per_device.values()),
        "entitlement": sum(e["entitlement"] for e in per_device.values()),
        "devices": sorted(per_device.values(), key=lambda e: e["device"]),
        "rejections": rejections,
    }


def _deployment(
    node: Node, dep: Deployment, requests: dict[tuple[str, str], dict[str, float]]
) -> dict[str, Any]:
    assert node.controller is not None
    tenant, name = dep.metadata.tenant or "", dep.metadata.name
    slices = node.controller.deployment_slices(tenant, name)
    ready = [s for s in slices if s.state == "Ready"]
    rollout = node.controller.rollout(tenant, name)
    unloaded = (tenant, name) in node.controller.unloaded
    if unloaded:
        state, reason = "Unloaded", "unloaded through the model repository API"
    elif not slices:
        state, reason = "NoReplicas", "replicas: 0"
    elif rollout.ready == rollout.replicas and not rollout.done:
        state, reason = "Updating", rollout.describe()  # every replica serves meanwhile
    elif rollout.ready == rollout.replicas:
        state, reason = "Ready", ""
    else:
        worst = min(
            (s for s in slices if s.state != "Ready"),
            key=lambda s: _STATE_ORDER.index(s.state) if s.state in _STATE_ORDER else 99,
        )
        state, reason = worst.state, worst.reason
    latency = node.recent.latency(tenant, name)
    outcomes = requests.get((tenant, name), {})
    first = (ready or slices)[0] if slices else None  # the version requests go to
    return {
        "tenant": tenant,
        "name": name,
        "model": f"{first.model_name}@{first.model_version}" if first else dep.spec.model,
        "profile": dep.spec.profile,
        "pool": dep.spec.pool,
        "latencyClass": first.latency_class if first else None,
        "state": state,
        "reason": reason,
        "replicas": dep.spec.replicas,
        "ready": rollout.ready,
        "updated": rollout.updated,
        "p50": latency.p50,
        "p99": latency.p99,
        "rate": latency.rate,
        "answered": latency.count,
        "queued": sum(len(s.queue.items) for s in ready if s.queue is not None),
        "requests": _by_whose_doing(outcomes),
        "restarts": sum(s.restarts for s in slices),
        "slo": dep.spec.slo.latency,
        "slices": [
            {
                "slice": s.id,
                "device": s.device_id,
                "state": s.state,
                "reason": s.reason,
                "queued": len(s.queue.items) if s.queue is not None and s.state == "Ready" else 0,
                "restarts": s.restarts,
            }
            for s in slices
        ],
    }


def _counts(counter: Counter, by: str) -> dict[tuple[str, str], dict[str, float]]:
    """Return a labelled counter's totals per (tenant, deployment), split by label ``by``."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    for family in counter.collect():
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            labels = sample.labels
            key = (labels.get("tenant", ""), labels.get("deployment", ""))
            split = out.setdefault(key, {})
            split[labels.get(by, "")] = split.get(labels.get(by, ""), 0.0) + sample.value
    return out


def attention(
    devices: Iterable[dict[str, Any]],
    tenants: Iterable[dict[str, Any]],
    deployments: Iterable[dict[str, Any]],
    pending: Iterable[dict[str, Any]],
) -> list[dict[str, str]]:
    """Return what needs a look, worst first; one "ok" line when nothing does."""
    items: list[tuple[int, str, str, str]] = []  # (rank, level, subject, text)
    for d in devices:
        if not d["healthy"]:
            items.append(
                (
                    0,
                    "error",
                    d["id"],
                    f"{d['id']} is unhealthy: {d['problem'] or 'reported by the inventory'}",
                )
            )
        if d.get("cordoned"):
            items.append((2, "warn", d["id"], f"{d['id']} is cordoned: it takes no new slices"))
        if d["throttle"]:
            items.append(
                (2, "warn", d["id"], f"{d['id']} clocks are throttled ({', '.join(d['throttle'])})")
            )
        for s in d["slices"]:
            used, limit = s["memoryUsed"], s["memoryLimit"]
            if used is not None and limit and used >= _MEMORY_WARNING * limit:
                items.append(
                    (
                        2,
                        "warn",
                        s["tenant"],
                        f"{s['slice']} uses {used / limit:.0%} of its memory cap",
                    )
                )
    for t in tenants:
        wait = t["waitP99"]
        wait_text = f", p99 wait {wait * 1000:.0f} ms" if wait is not None else ""
        if t["state"] == "starving":
            on = ", ".join(t["starvingOn"])
            items.append(
                (
                    0,
                    "error",
                    t["name"],
                    f"{t['name']} is starving on {on}: {t['queued']} queued, "
                    f"{t['share']:.0%} of device time against {t['entitlement']:.0%} guaranteed{wait_text}",
                )
            )
        elif t["state"] == "waiting":
            items.append(
                (
                    3,
                    "info",
                    t["name"],
                    f"{t['name']} has {t['queued']} request(s) queued{wait_text}",
                )
            )
        if t["rejections"]:
            total = sum(t["rejections"].values())
            why = ", ".join(f"{reason} {n}" for reason, n in sorted(t["rejections"].items()))
            items.append(
                (
                    1,
                    "warn",
                    t["name"],
                    f"{t['name']}: {total} request(s) refused in the last minute ({why})",
                )
            )
    for p in pending:
        level, rank = ("error", 0) if p["state"] == "Failed" else ("warn", 1)
        if p["state"] == "Loading" and p.get("replaces"):
            level, rank = "info", 2  # a rolling update: the instance it replaces serves
        reason = f": {p['reason']}" if p["reason"] else ""
        items.append((rank, level, p["tenant"], f"{p['slice']} is {p['state']}{reason}"))
    if not items:
        ready = sum(1 for d in deployments if d["state"] in ("Ready", "Updating"))
        return [
            {
                "level": "ok",
                "subject": "",
                "text": f"Nobody is waiting or starving; {ready} deployment(s) serving",
            }
        ]
    items.sort(key=lambda i: i[0])
    return [{"level": level, "subject": subject, "text": text} for _, level, subject, text in items]
