"""`gpuvisor top`: the dashboard in a terminal (rich), for an operator on the node over SSH.

It reads the same document as /ui (``GET /api/v1/dashboard``, scoped to the key) and redraws
it in place: what needs attention, devices with their memory split by slice, tenants' share
of device time against their guarantee, deployments, and slices that are not serving.
"""

from __future__ import annotations

import contextlib
import time
import zlib
from collections.abc import Callable
from datetime import datetime
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from gpuvisor.client import NodeClient
from gpuvisor.errors import GpuvisorError
from gpuvisor.quoting import printable_data
from gpuvisor.units import format_size

__all__ = ["render_top", "run_top"]

_PALETTE = ("green", "magenta", "cyan", "yellow", "blue", "bright_red", "bright_green", "orange3")
_LEVEL_STYLE = {"ok": "green", "info": "cyan", "warn": "yellow", "error": "bold red"}
_STATE_STYLE = {
    "Ready": "green",
    "ok": "green",
    "waiting": "yellow",
    "starving": "bold red",
    "Failed": "bold red",
    "Pending": "yellow",
    "Loading": "yellow",
    "Updating": "cyan",
    "Restarting": "yellow",
}
BAR = 24  # characters of a share bar
_NUMERIC = {"UTIL", "BUSY", "SHARE", "GUARANTEED", "QUEUED", "P50", "P99", "REQ/S", "READY"}
_NUMERIC |= {"OK", "REFUSED", "FAILED", "RESTARTS", "P99 WAIT", "REFUSED/min", "TEMP", "POWER"}


def _colour(tenant: str) -> str:
    return _PALETTE[zlib.crc32(tenant.encode()) % len(_PALETTE)]


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.3g} ms"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}" if x >= 0.1 or x == 0 else f"{x:.1%}"


def _size(n: float | None) -> str:
    return "-" if n is None else format_size(int(n))


def _memory_bar(device: dict[str, Any], width: int) -> Text:
    """The device's memory as ``width`` cells: each slice's cap in its tenant's colour (solid
    where in use), other tenants' slices as one grey block, free memory as dots."""
    total = max(1, device["memoryTotal"])
    bar = Text()
    for s in device["slices"]:
        cells = max(1, round(width * s["memoryLimit"] / total))
        used = s["memoryUsed"] or 0
        solid = min(cells, round(cells * used / max(1, s["memoryLimit"])))
        bar.append("█" * solid + "▒" * (cells - solid), style=_colour(s["tenant"]))
    if device["others"]:
        cells = max(1, round(width * device["others"]["memoryLimit"] / total))
        bar.append("▒" * cells, style="grey50")
    bar.append("·" * max(0, width - len(bar)), style="grey35")
    return bar


def _share_bar(share: float, entitlement: float, colour: str) -> Text:
    """Device-time share as a bar, with ``│`` where the guaranteed share ends."""
    filled = min(BAR, round(BAR * share))
    mark = min(BAR - 1, round(BAR * entitlement)) if entitlement > 0 else None
    bar = Text()
    for i in range(BAR):
        if i == mark:
            bar.append("│", style="bold white")
        elif i < filled:
            bar.append("█", style=colour)
        else:
            bar.append("░", style="grey35")
    return bar


def _table(*columns: str) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False, expand=False)
    for column in columns:
        right = column in _NUMERIC
        table.add_column(column, justify="right" if right else "left", overflow="fold")
    return table


def render_top(data: dict[str, Any], width: int = 100) -> RenderableType:
    """Return one frame of the view of a dashboard document (``GET /api/v1/dashboard``)."""
    data = printable_data(data)  # names and reasons tenants chose: no escape sequences
    viewer = data["viewer"]
    who = f"tenant {viewer['tenant']}" if viewer.get("tenant") else viewer["role"]
    node = data["node"]
    stamp = datetime.fromtimestamp(data["generatedAt"]).strftime("%H:%M:%S")
    parts: list[RenderableType] = [
        Text.assemble(
            ("gpuvisor top", "bold"),
            f"  {node['cluster']}  v{node['version']}  {who}  {stamp}",
            style="",
        )
    ]
    for item in data["attention"]:
        parts.append(Text("● " + item["text"], style=_LEVEL_STYLE.get(item["level"], "")))

    devices = _table(
        "DEVICE", "MODEL", "HEALTH", "UTIL", "MEMORY used/reserved/total", "TEMP", "POWER", "BUSY"
    )
    bars: list[RenderableType] = []
    for d in data["devices"]:
        health = "ok" if d["healthy"] else "UNHEALTHY"
        if d["throttle"]:
            health += " throttled:" + ",".join(d["throttle"])
        devices.add_row(
            d["id"],
            d["model"],
            Text(health, style="green" if d["healthy"] and not d["throttle"] else "bold red"),
            _pct(d["utilization"]),
            f"{_size(d['memoryUsed'])} / {_size(d['memoryReserved'])} / {_size(d['memoryTotal'])}",
            "-" if d["temperature"] is None else f"{d['temperature']:.0f}°C",
            "-" if d["power"] is None else f"{d['power']:.0f} W",
            _pct(d["busy"]),
        )
        legend = Text(" " * (len(d["id"]) + 8))
        for name in sorted({s["tenant"] for s in d["slices"]}):
            legend.append("■ ", style=_colour(name)).append(name + "  ")
        if d["others"]:
            legend.append("▒ others", style="grey50")
        bar_width = max(20, min(64, width - len(d["id"]) - 10))
        bars.append(Text.assemble(f"{d['id']} memory ", _memory_bar(d, bar_width)))
        bars.append(legend)
    parts += [Text("\nDEVICES", style="bold underline"), devices, *bars]

    tenants = _table(
        "TENANT", "STATE", "DEVICE", "SHARE", "GUARANTEED", "", "QUEUED", "P99 WAIT", "REFUSED/min"
    )
    for t in data["tenants"]:
        rows = t["devices"] or [{"device": "-", "share": 0.0, "entitlement": 0.0, "queued": 0}]
        refused = sum(t["rejections"].values())
        for i, e in enumerate(rows):
            tenants.add_row(
                Text(t["name"], style=_colour(t["name"])) if i == 0 else "",
                Text(t["state"], style=_STATE_STYLE.get(t["state"], "")) if i == 0 else "",
                e["device"],
                _pct(e["share"]),
                _pct(e["entitlement"]),
                _share_bar(e["share"], e["entitlement"], _colour(t["name"])),
                str(e["queued"]),
                _ms(t["waitP99"]) if i == 0 else "",
                str(refused) if i == 0 else "",
            )
    parts += [
        Text("\nTENANTS (device time, last window; │ = guaranteed)", style="bold underline"),
        tenants,
    ]

    if data["deployments"]:
        deployments = _table(
            "TENANT", "DEPLOYMENT", "STATE", "CLASS", "READY", "P50", "P99", "REQ/S", "QUEUED",
            "OK", "REFUSED", "FAILED", "RESTARTS",
        )  # fmt: skip
        for d in data["deployments"]:
            deployments.add_row(
                Text(d["tenant"], style=_colour(d["tenant"])),
                d["name"],
                Text(d["state"], style=_STATE_STYLE.get(d["state"], "")),
                d["latencyClass"] or "-",
                f"{d['ready']}/{d['replicas']}",
                _ms(d["p50"]),
                _ms(d["p99"]),
                f"{d['rate']:.1f}",
                str(d["queued"]),
                f"{d['requests']['ok']:.0f}",
                f"{d['requests'].get('refused', 0):.0f}",
                f"{d['requests']['failed']:.0f}",
                str(d["restarts"]),
            )
        title = "\nDEPLOYMENTS (P50, P99, REQ/S: last minute; OK, REFUSED, FAILED: since start)"
        parts += [Text(title, style="bold underline"), deployments]
    else:
        parts.append(
            Text("\nNo deployments yet: apply one with 'gpuvisor apply -f FILE'.", style="yellow")
        )

    if data["pending"]:
        pending = _table("SLICE", "STATE", "WHY")
        for p in data["pending"]:
            pending.add_row(
                p["slice"],
                Text(p["state"], style=_STATE_STYLE.get(p["state"], "")),
                p["reason"] or "-",
            )
        parts += [Text("\nNOT SERVING", style="bold underline"), pending]
    return Group(*parts)


def run_top(
    client: NodeClient,
    console: Console,
    interval: float = 1.0,
    iterations: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Redraw the view every ``interval`` seconds, ``iterations`` times (None: until Ctrl-C).

    Returns 0; with one iteration, a node that cannot be reached raises its GpuvisorError.
    In the live view an unreachable node is shown in the frame and retried.
    """
    if iterations == 1:
        console.print(render_top(client.request("GET", "/api/v1/dashboard"), console.width))
        return 0
    # in a terminal each frame replaces the last; into a file or a pipe, frames follow one
    # another (a live display there would keep only the last)
    live = Live(console=console, auto_refresh=False, screen=False, transient=False)

    def show(frame: RenderableType) -> None:
        if console.is_terminal:
            live.update(frame, refresh=True)
        else:
            console.print(frame)

    done = 0
    with live if console.is_terminal else contextlib.nullcontext():
        try:
            while iterations is None or done < iterations:
                try:
                    frame = render_top(client.request("GET", "/api/v1/dashboard"), console.width)
                except GpuvisorError as exc:
                    frame = Text(
                        f"gpuvisor top: {exc.message} (retrying every {interval:g}s)",
                        style="bold red",
                    )
                show(frame)
                done += 1
                if iterations is None or done < iterations:
                    sleep(interval)
        except KeyboardInterrupt:
            pass
    return 0
