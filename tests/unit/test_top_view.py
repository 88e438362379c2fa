"""`gpuvisor top`'s frame, rendered from a dashboard document into a captured console."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from gpuvisor.top import render_top


def _document(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "generatedAt": 1_800_000_000.0,
        "viewer": {"role": "tenant", "tenant": "retail"},
        "node": {"version": "0.1.0", "cluster": "store-042"},
        "attention": [
            {"level": "error", "subject": "retail", "text": "retail is starving on gpu-0: 40 queued"}
        ],
        "devices": [
            {
                "id": "gpu-0", "model": "H100-80GB", "healthy": True, "throttle": ["hw_thermal"],
                "utilization": 0.93, "temperature": 81.0, "power": 612.0,
                "memoryTotal": 80 * 2**30, "memoryUsed": 30 * 2**30, "memoryReserved": 40 * 2**30,
                "busy": 0.97, "shares": {"retail": 0.05},
                "slices": [{"slice": "retail/shelf/0", "tenant": "retail", "deployment": "shelf",
                            "state": "Ready", "memoryLimit": 8 * 2**30, "memoryUsed": 6 * 2**30}],
                "others": {"slices": 3, "memoryLimit": 32 * 2**30, "memoryUsed": 20 * 2**30, "share": 0.92},
            }
        ],
        "tenants": [
            {"name": "retail", "state": "starving", "queued": 40, "waitP99": 0.31, "rejections": {"rate_limit": 2},
             "devices": [{"device": "gpu-0", "share": 0.05, "entitlement": 0.25, "queued": 40}]}
        ],
        "deployments": [
            {"tenant": "retail", "name": "shelf", "state": "Ready", "latencyClass": "critical",
             "ready": 1, "replicas": 1, "p50": 0.0042, "p99": 0.0377, "rate": 812.5, "queued": 40,
             "requests": {"ok": 120345.0, "refused": 31.0, "failed": 7.0}, "restarts": 1}
        ],
        "pending": [{"slice": "retail/big/0", "state": "Pending", "reason": "gpu-0: 1Gi free < 2Gi requested"}],
    }  # fmt: skip
    data.update(overrides)
    return data


def _render(data: dict[str, Any], width: int = 140) -> str:
    console = Console(record=True, width=width, color_system=None)
    console.print(render_top(data, width))
    return console.export_text()


def test_frame_answers_who_waits_and_who_uses_the_device() -> None:
    text = _render(_document())
    lines = text.splitlines()
    assert lines[0].startswith("gpuvisor top  store-042  v0.1.0  tenant retail")
    assert "● retail is starving on gpu-0: 40 queued" in text
    device_row = next(line for line in lines if line.startswith("gpu-0 "))
    for cell in (
        "H100-80GB",
        "throttled:hw_thermal",
        "93%",
        "30Gi / 40Gi / 80Gi",
        "81°C",
        "612 W",
        "97%",
    ):
        assert cell in device_row, cell
    tenant_row = next(line for line in lines if line.startswith("retail ") and "starving" in line)
    for cell in ("5.0%", "25%", "310 ms", " 2"):
        assert cell in tenant_row, cell
    bar = tenant_row[tenant_row.index("25%") + 3 :].strip().split()[0]
    assert len(bar) == 24 and bar[6] == "│" and bar[:1] == "█"  # 5% used, guarantee at 25%
    deployment_row = next(line for line in lines if " shelf " in line and "critical" in line)
    for cell in ("4.2 ms", "37.7 ms", "812.5", "120345", " 31 ", " 7 "):
        assert cell in deployment_row, cell
    assert deployment_row.index(" 31 ") < deployment_row.index(" 7 ")  # REFUSED, then FAILED
    # counts are right-aligned: each ends where its column's heading does
    header = next(line for line in lines if " REFUSED " in line and line.startswith("TENANT"))
    for heading, cell in (("OK", "120345"), ("REFUSED", "31"), ("FAILED", "7")):
        end = header.index(f" {heading}") + 1 + len(heading)
        assert deployment_row[end - len(cell) : end] == cell, (heading, header, deployment_row)
    assert "OK, REFUSED, FAILED: since start" in text
    assert "retail/big/0" in text and "1Gi free < 2Gi requested" in text
    memory = next(line for line in lines if line.startswith("gpu-0 memory "))
    assert "█" in memory and "▒" in memory and "·" in memory  # in use, reserved, free
    assert "▒ others" in text


def test_frame_without_deployments_says_how_to_add_one() -> None:
    text = _render(_document(deployments=[], pending=[], tenants=[]))
    assert "No deployments yet: apply one with 'gpuvisor apply -f FILE'." in text
    assert "NOT SERVING" not in text


def test_frame_fits_a_narrow_terminal() -> None:
    text = _render(_document(), width=80)
    assert all(len(line) <= 80 for line in text.splitlines())
