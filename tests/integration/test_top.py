"""`gpuvisor top` against a real node: one frame for scripts (--once), the live view in a
real pseudo-terminal redrawing in place, tenant keys seeing their own, clear errors."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time

from gpuvisor.launch import NodeProcess, free_port


def _top(node: NodeProcess, *args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "160", "GPUVISOR_URL": node.url}
    env.pop("GPUVISOR_KEY", None)
    if key:
        env["GPUVISOR_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "gpuvisor", "top", "--state", str(node.state_dir), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_once_prints_every_tenant_for_the_admin_key(demo_node: NodeProcess) -> None:
    result = _top(demo_node, "--once")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("gpuvisor top  local  v")
    assert "admin" in out.splitlines()[0]
    for section in ("DEVICES", "TENANTS", "DEPLOYMENTS"):
        assert section in out
    for deployment in ("shelf-detector", "sku-lookup", "intent-router", "basket-scorer"):
        assert deployment in out
    assert "cpu-0 memory " in out
    assert "Nobody is waiting or starving; 4 deployment(s) serving" in out


def test_frames_into_a_pipe_follow_one_another(demo_node: NodeProcess) -> None:
    """Not a terminal (a file, a pipe, a log): every frame is printed, not only the last."""
    result = _top(demo_node, "--iterations", "3", "--interval", "0.2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("gpuvisor top  local  v") == 3
    assert "\x1b[" not in result.stdout  # no cursor movement


def test_a_tenant_key_sees_its_own_deployments_only(demo_node: NodeProcess) -> None:
    result = _top(demo_node, "--once", key=demo_node.tenant_key("support"))
    assert result.returncode == 0, result.stderr
    assert "tenant support" in result.stdout.splitlines()[0]
    assert "intent-router" in result.stdout
    for other in ("retail", "analytics", "shelf-detector", "basket-scorer"):
        assert other not in result.stdout


def test_live_view_redraws_in_place_in_a_terminal(demo_node: NodeProcess) -> None:
    primary, secondary = pty.openpty()
    env = {**os.environ, "COLUMNS": "150", "LINES": "60", "TERM": "xterm-256color"}
    env.pop("GPUVISOR_KEY", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "gpuvisor", "top", "--url", demo_node.url, "--state",
         str(demo_node.state_dir), "--iterations", "3", "--interval", "0.3"],
        stdin=secondary, stdout=secondary, stderr=secondary, env=env, close_fds=True,
    )  # fmt: skip
    os.close(secondary)
    output = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([primary], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # the terminal closed: the command exited
                break
            if not chunk:
                break
            output += chunk
        elif process.poll() is not None:
            break
    os.close(primary)
    assert process.wait(30) == 0, output.decode(errors="replace")[-2000:]
    raw = output.decode(errors="replace")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)  # colours and cursor moves
    assert text.count("gpuvisor top  local") >= 3, "a frame per refresh"
    assert "\x1b[2K" in raw and "\x1b[1A" in raw, (
        "frames are redrawn in place (erase line, cursor up)"
    )
    assert "shelf-detector" in text


def test_an_unreachable_node_is_a_clear_error(demo_node: NodeProcess) -> None:
    result = _top(demo_node, "--once", "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "cannot reach a gpuvisor node" in result.stderr


def test_a_wrong_key_is_a_clear_error(demo_node: NodeProcess) -> None:
    result = _top(demo_node, "--once", key="gvk_abcdefgh_not-a-real-key")
    assert result.returncode == 1
    assert "error:" in result.stderr and "key" in result.stderr.lower()
