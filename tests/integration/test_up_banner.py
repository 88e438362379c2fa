"""What `gpuvisor up` prints once the demo is ready, read from a node whose output goes to a
file (not a terminal): the tenant keys stay in their file, and the copy-paste examples work
as printed."""

from __future__ import annotations

import os
import subprocess
import textwrap
import time
from pathlib import Path

from gpuvisor.launch import NodeProcess


def _banner(node: NodeProcess, timeout: float = 30.0) -> str:
    log = node.state_dir / "node.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text()
        if "gpuvisor get deployments" in text:
            return text
        time.sleep(0.1)
    raise AssertionError(f"no banner in {log}:\n{log.read_text()[-3000:]}")


def test_the_demo_banner_keeps_tenant_keys_off_a_log_and_its_examples_work(
    demo_node: NodeProcess,
) -> None:
    banner = _banner(demo_node)
    keys_file = demo_node.state_dir / "demo" / "tenant-keys.json"
    assert f"keys in {keys_file}, not printed when the output is not a terminal" in " ".join(
        banner.split()
    )
    for tenant in ("analytics", "retail", "support"):
        assert demo_node.tenant_key(tenant) not in banner
        assert f"{tenant:10} key in the file" in banner
    # the "try it" block, run as an operator would paste it into a shell
    block = banner.split("try it", 1)[1].split("gpuvisor get deployments", 1)[0]
    assert "export ANALYTICS_KEY=" in block
    ran = subprocess.run(
        ["bash", "-euc", textwrap.dedent(block)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    assert '"outputs"' in ran.stdout  # curl's answer from basket-scorer
    assert "shelf class:" in ran.stdout  # the Triton client's answer from shelf-detector


def test_a_relative_state_directory_is_printed_as_an_absolute_one(tmp_path: Path) -> None:
    """The banner's paths are for other terminals, in other folders."""
    state = Path(os.path.relpath(tmp_path / "rel-state"))
    assert not state.is_absolute()
    with NodeProcess(state_dir=state, demo=False, log_path=tmp_path / "node.log") as node:
        deadline = time.monotonic() + 30
        while "admin key (shown once" not in (text := (tmp_path / "node.log").read_text()):
            assert time.monotonic() < deadline, text[-2000:]
            time.sleep(0.1)
        assert node.process is not None
    flat = " ".join(text.split())
    assert f"also in {(tmp_path / 'rel-state').resolve()}/admin.key" in flat, flat[-1500:]
