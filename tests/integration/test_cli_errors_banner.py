"""The `gpuvisor up` banner of a node on a port and state directory of its own: its
commands reach that node as printed, and after a restart its "demo tenants" are the demo's
alone."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from gpuvisor.launch import NodeProcess


def _banner_since(log: Path, offset: int, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text()[offset:]
        if "gpuvisor get slices" in text:
            return text
        time.sleep(0.1)
    raise AssertionError(f"no banner in {log}:\n{log.read_text()[-3000:]}")


def _extra_tenant(models: Path) -> str:
    return f"""
apiVersion: gpuvisor/v1
kind: Tenant
metadata: {{name: extra}}
---
apiVersion: gpuvisor/v1
kind: Model
metadata: {{name: scorer, tenant: extra}}
spec: {{version: "1", source: {models / "basket-scorer.onnx"}}}
---
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {{name: extra-scorer, tenant: extra}}
spec: {{model: scorer, profile: std-shared, pool: inference}}
"""


def test_the_banner_reaches_its_node_and_lists_only_the_demo_tenants(tmp_path: Path) -> None:
    state = tmp_path / "state"
    node = NodeProcess(state_dir=state).start()
    log = state / "node.log"
    try:
        banner = _banner_since(log, 0)
        line = next(ln for ln in banner.splitlines() if "gpuvisor get deployments" in ln)
        assert f"--url {node.url}" in line and f"--state {state}" in line
        # as an operator pastes it into another shell: none of the node's environment
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUVISOR_")}
        args = shlex.split(line.strip())
        assert args[:3] == ["gpuvisor", "get", "deployments"]
        ran = subprocess.run(
            [sys.executable, "-m", "gpuvisor", *args[1:]],
            capture_output=True,
            text=True,
            env={**env, "HOME": str(tmp_path / "home")},  # no ~/.gpuvisor to fall back on
            timeout=60,
        )
        assert ran.returncode == 0, ran.stderr
        assert "shelf-detector" in ran.stdout
        node.apply_as_admin(_extra_tenant(state / "demo" / "models"))
    finally:
        node.stop()

    offset = len(log.read_text())
    restarted = NodeProcess(state_dir=state, port=node.port).start()
    try:
        banner = _banner_since(log, offset)
        demo_part = banner.split("demo tenants", 1)[1].split("try it", 1)[0]
        assert "shelf-detector" in demo_part
        assert "extra" not in demo_part
    finally:
        restarted.stop()
