"""`gpuvisor up` with a node file this host cannot honour: one clear line and nothing written,
not a server's start-up traceback."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from gpuvisor.cli import app
from gpuvisor.inventory.nvml import discover_nvml
from gpuvisor.launch import NodeProcess, free_port

runner = CliRunner()


def test_up_refuses_a_node_file_that_requires_a_gpu_on_a_host_without_one(tmp_path: Path) -> None:
    gpus, _ = discover_nvml()
    if gpus:
        pytest.skip("this host has an NVIDIA GPU: nvml.enabled: true is satisfied here")
    config = tmp_path / "node.yaml"
    config.write_text(
        "apiVersion: gpuvisor/v1\nkind: Node\nmetadata: {name: edge}\n"
        "spec: {nvml: {enabled: true}}\n"
    )
    state = tmp_path / "state"
    result = runner.invoke(
        app, ["up", "--config", str(config), "--state", str(state), "--port", str(free_port())]
    )
    assert result.exit_code == 1, result.output
    output = " ".join(result.output.split())  # the console wraps long lines
    assert output.startswith("error: nvml.enabled is true but no NVIDIA GPU was found")
    assert "set nvml.enabled to auto to serve on the CPU instead" in output
    assert "Traceback" not in result.output
    assert not state.exists()  # refused before an admin key was made and never shown


def test_a_second_node_on_a_state_directory_in_use_is_refused(tmp_path: Path) -> None:
    """Two nodes on one state directory would share its database and book the same devices
    twice; the second is refused, and once the first has stopped (even killed), it starts."""
    state = tmp_path / "state"
    first = NodeProcess(state_dir=state, demo=False).start(timeout=120)
    try:
        result = runner.invoke(
            app, ["up", "--no-demo", "--state", str(state), "--port", str(free_port())]
        )
        assert result.exit_code == 1, result.output
        output = " ".join(result.output.split())
        assert output.startswith(
            f"error: another gpuvisor node (pid {first.process.pid}) runs on the state directory "
            f"{state}"
        ), output
        assert "give this one its own --state" in output
        assert "Traceback" not in result.output
        assert httpx.get(f"{first.url}/v2/health/ready", timeout=10).status_code == 200
    finally:
        first.stop(signal.SIGKILL)
    second = NodeProcess(state_dir=state, demo=False).start(timeout=120)  # the lock went with it
    second.stop()


def test_a_second_node_on_another_nodes_database_is_refused(tmp_path: Path) -> None:
    """Another state directory does not make it safe: --db naming the first node's SQLite
    file would share its objects and book the same devices twice."""
    first = NodeProcess(state_dir=tmp_path / "first", demo=False).start(timeout=120)
    database = tmp_path / "first" / "gpuvisor.db"
    try:
        result = runner.invoke(
            app,
            [
                "up",
                "--no-demo",
                "--state",
                str(tmp_path / "second"),
                "--db",
                f"sqlite:///{database}",
                "--port",
                str(free_port()),
            ],
        )
        assert result.exit_code == 1, result.output
        output = " ".join(result.output.split())
        assert output.startswith(
            f"error: another gpuvisor node (pid {first.process.pid}) uses the database {database}"
        ), output
        assert "give this one its own --db" in output
        assert httpx.get(f"{first.url}/v2/health/ready", timeout=10).status_code == 200
    finally:
        first.stop()


@pytest.mark.postgres
def test_a_second_node_on_another_nodes_postgresql_schema_is_refused(
    tmp_path: Path, pg_url: str
) -> None:
    """On PostgreSQL too: the first node holds an advisory lock on its schema as long as it
    runs (SIGKILL included: the server drops the lock with the connection)."""
    first = NodeProcess(state_dir=tmp_path / "first", demo=False, db=pg_url).start(timeout=120)
    try:
        result = runner.invoke(
            app,
            [
                "up",
                "--no-demo",
                "--state",
                str(tmp_path / "second"),
                "--db",
                pg_url,
                "--port",
                str(free_port()),
            ],
        )
        assert result.exit_code == 1, result.output
        output = " ".join(result.output.split())
        assert output.startswith(
            f"error: another gpuvisor node (gpuvisor node pid {first.process.pid} on "
        ), output
        assert "give this one its own database or schema" in output
        assert "Traceback" not in result.output
        assert httpx.get(f"{first.url}/v2/health/ready", timeout=10).status_code == 200
    finally:
        first.stop(signal.SIGKILL)
    # the lock went with the killed node's connection (its admin key file is in its state)
    second = NodeProcess(state_dir=tmp_path / "first", demo=False, db=pg_url).start(timeout=120)
    second.stop()
