"""The CLI against a running node, like an operator uses it."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from gpuvisor.cli import app
from gpuvisor.launch import NodeProcess, free_port

runner = CliRunner()


@pytest.fixture
def env(demo_node: NodeProcess) -> dict[str, str]:
    return {
        "GPUVISOR_URL": demo_node.url,
        "GPUVISOR_STATE": str(demo_node.state_dir),
        "COLUMNS": "200",
    }


def test_get_lists_what_the_node_serves(env: dict[str, str]) -> None:
    devices = runner.invoke(app, ["get", "devices"], env=env)
    assert devices.exit_code == 0, devices.output
    assert "cpu-0" in devices.output
    deployments = runner.invoke(app, ["get", "deployments"], env=env)
    assert deployments.exit_code == 0
    for name in ("shelf-detector", "intent-router", "basket-scorer"):
        assert name in deployments.output
    described = runner.invoke(
        app, ["describe", "deployment", "shelf-detector", "--tenant", "retail"], env=env
    )
    assert described.exit_code == 0 and "readyReplicas: 1" in described.output


def test_apply_keys_and_delete(env: dict[str, str], demo_node: NodeProcess, tmp_path: Path) -> None:
    models = demo_node.state_dir / "demo" / "models"
    manifest = tmp_path / "extra.yaml"
    (tmp_path / "scorer.onnx").write_bytes((models / "basket-scorer.onnx").read_bytes())
    manifest.write_text("""
apiVersion: gpuvisor/v1
kind: Model
metadata: {name: second-scorer, tenant: analytics}
spec: {version: "1", source: scorer.onnx}
---
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {name: second-scorer, tenant: analytics}
spec: {model: second-scorer, profile: std-small}
""")
    applied = runner.invoke(app, ["apply", "-f", str(manifest)], env=env)
    assert applied.exit_code == 0, applied.output
    assert "deployment/second-scorer (tenant analytics) created" in applied.output
    again = runner.invoke(app, ["apply", "-f", str(manifest)], env=env)
    assert "deployment/second-scorer (tenant analytics) unchanged" in again.output

    created = runner.invoke(app, ["keys", "create", "--tenant", "analytics"], env=env)
    assert created.exit_code == 0, created.output
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("gvk_")
    demo_node.wait_ready(60)
    body = (
        b'{"inputs":[{"name":"features","shape":[1,16],"datatype":"FP32","data":['
        + b",".join([b"1"] * 16)
        + b"]}]}"
    )
    answer = httpx.post(
        f"{demo_node.url}/v2/models/second-scorer/infer", content=body, headers=demo_node.auth(key)
    )
    assert answer.status_code == 200, answer.text

    listed = runner.invoke(app, ["keys", "list"], env=env)
    assert key not in listed.output and "analytics" in listed.output
    key_id = "_".join(key.split("_")[:2])
    assert runner.invoke(app, ["keys", "revoke", key_id], env=env).exit_code == 0
    assert (
        httpx.post(
            f"{demo_node.url}/v2/models/second-scorer/infer",
            content=body,
            headers=demo_node.auth(key),
        ).status_code
        == 401
    )

    in_use = runner.invoke(
        app, ["delete", "model", "second-scorer", "--tenant", "analytics"], env=env
    )
    assert in_use.exit_code == 1 and "used by Deployment analytics/second-scorer" in in_use.output
    deleted = runner.invoke(
        app, ["delete", "deployment", "second-scorer", "--tenant", "analytics"], env=env
    )
    assert deleted.exit_code == 0, deleted.output


def test_errors_are_clear(env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: gpuvisor/v1\nkind: Profile\nmetadata: {name: p}\nspec: {memory: lots}\n"
    )
    result = runner.invoke(app, ["apply", "-f", str(bad)], env=env)
    assert result.exit_code == 1
    assert "bad.yaml doc 1 Profile/p: spec.memory" in result.output
    unknown = runner.invoke(app, ["get", "widgets"], env=env)
    assert unknown.exit_code == 1 and "unknown kind 'widgets'" in unknown.output
    nowhere = runner.invoke(
        app, ["get", "devices"], env={**env, "GPUVISOR_URL": f"http://127.0.0.1:{free_port()}"}
    )
    assert nowhere.exit_code == 1 and "is 'gpuvisor up' running?" in nowhere.output


def test_every_command_has_help() -> None:
    for command in (
        ["--help"],
        ["up", "--help"],
        ["apply", "--help"],
        ["get", "--help"],
        ["describe", "--help"],
        ["delete", "--help"],
        ["keys", "create", "--help"],
        ["status", "--help"],
        ["bench", "--help"],
    ):
        result = runner.invoke(app, command)
        assert result.exit_code == 0, command
        assert "Usage" in result.output
