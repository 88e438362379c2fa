"""The CLI against a running node, like an operator uses it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import yaml
from typer.testing import CliRunner

from gpuvisor.cli import app
from gpuvisor.launch import NodeProcess, free_port

runner = CliRunner()


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
    assert described.exit_code == 0, described.output
    assert "Replicas:    1 ready of 1" in described.output
    assert "retail/shelf-detector/0  Ready  on cpu-0" in described.output
    # the demo's critical profile, and the execution profile measured at load
    assert "given: critical class, computeShare 0.25, memory 512Mi" in described.output
    assert "time per batch: 1 → " in described.output
    status = runner.invoke(app, ["status"], env=env)
    assert status.exit_code == 0, status.output
    assert "ready" in status.output.splitlines()[0]
    assert "slices:   4 Ready" in status.output and "key:      admin key" in status.output


def test_get_one_device_or_slice_by_its_id(env: dict[str, str]) -> None:
    device = runner.invoke(app, ["get", "devices", "cpu-0", "-o", "json"], env=env)
    assert device.exit_code == 0, device.output
    assert json.loads(device.output)["id"] == "cpu-0"
    one = runner.invoke(app, ["get", "slices", "retail/shelf-detector/0"], env=env)
    assert one.exit_code == 0, one.output
    body = yaml.safe_load(one.output)
    assert (body["id"], body["state"], body["device"]) == (
        "retail/shelf-detector/0",
        "Ready",
        "cpu-0",
    )
    described = runner.invoke(app, ["describe", "device", "cpu-0"], env=env)
    assert described.exit_code == 0 and "id: cpu-0" in described.output
    missing = runner.invoke(app, ["get", "devices", "gpu-7"], env=env)
    assert missing.exit_code == 1
    assert "no device 'gpu-7' on this node (there are: cpu-0)" in missing.output


def test_cordon_sends_slices_to_pending_with_reasons_and_uncordon_brings_them_back(
    env: dict[str, str], demo_node: NodeProcess
) -> None:
    cordoned = runner.invoke(app, ["cordon", "cpu-0", "--reason", "kernel update"], env=env)
    assert cordoned.exit_code == 0, cordoned.output
    assert "device/cpu-0 cordoned" in cordoned.output
    assert "warning: 4 slice(s) found no other device with room" in cordoned.output
    try:
        # the node's log says who cordoned it and why, and what became of each slice
        log = (demo_node.state_dir / "node.log").read_text()
        assert "device cpu-0 cordoned by key gvk_" in log and "(kernel update)" in log
        assert "no other device has room for it; it stops (cpu-0 is cordoned)" in log
        again = runner.invoke(app, ["cordon", "cpu-0"], env=env)
        assert "(it already was cordoned)" in again.output
        devices = runner.invoke(app, ["get", "devices"], env=env)
        assert "cordoned" in devices.output
        # the demo has one device: every slice waits Pending, and describe says why
        described = runner.invoke(
            app, ["describe", "deployment", "intent-router", "--tenant", "support"], env=env
        )
        assert "support/intent-router/0  Pending  on -" in described.output, described.output
        assert "cannot be placed:\n      cpu-0: cordoned by an operator" in described.output
        # piped (no terminal, no COLUMNS), a slice's row stays on one line for grep
        piped = runner.invoke(app, ["get", "slices"], env={**env, "COLUMNS": ""})
        rows = [line for line in piped.output.splitlines() if "support/intent-router/0" in line]
        assert len(rows) == 1 and rows[0].rstrip().endswith("cordoned by an operator"), rows
        # both are audited with who and why; the repeat as a change of nothing
        records = httpx.get(
            f"{demo_node.url}/api/v1/audit",
            params={"action": "device.cordon"},
            headers=demo_node.auth(demo_node.admin_key),
            timeout=30,
        ).json()["items"]
        assert [r["reason"] for r in records][-2:] == [
            "kernel update",
            "unchanged: already cordoned",
        ]
    finally:
        back = runner.invoke(app, ["uncordon", "cpu-0"], env=env)
    assert back.exit_code == 0 and "device/cpu-0 uncordoned" in back.output
    drained = runner.invoke(app, ["drain", "cpu-0", "--timeout", "1"], env=env)
    assert drained.exit_code == 0 and "device/cpu-0 drained" in drained.output
    assert "support/intent-router/0: Pending on no device" in drained.output
    # on a one-device box nothing can move: said plainly, with the way back
    assert (
        "warning: 4 slice(s) found no other device with room and serve nothing until one "
        "has room or `gpuvisor uncordon cpu-0`"
    ) in " ".join(drained.output.split())
    runner.invoke(app, ["uncordon", "cpu-0"], env=env)
    ready = f"{demo_node.url}/v2/models/intent-router/ready"
    auth = demo_node.auth(demo_node.tenant_key("support"))
    deadline = time.monotonic() + 60
    while httpx.get(ready, headers=auth, timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "the slices did not come back after uncordon"
        time.sleep(0.2)


def test_a_drain_that_leaves_slices_running_says_so_and_fails(
    env: dict[str, str], demo_node: NodeProcess, tmp_path: Path
) -> None:
    """A disallowMigration slice stays on its cordoned device: the device is not drained,
    and a script that takes it down after `gpuvisor drain` must not be told it is."""
    models = demo_node.state_dir / "demo" / "models"
    manifest = tmp_path / "pinned.yaml"
    manifest.write_text(
        "apiVersion: gpuvisor/v1\nkind: Deployment\n"
        "metadata: {name: pinned-scorer, tenant: analytics}\n"
        "spec: {model: basket-scorer, profile: std-shared, pool: inference, "
        "placement: {disallowMigration: true}}\n"
    )
    assert (models / "basket-scorer.onnx").exists()
    applied = runner.invoke(app, ["apply", "-f", str(manifest)], env=env)
    assert applied.exit_code == 0, applied.output
    demo_node.wait_ready(60)
    try:
        drained = runner.invoke(app, ["drain", "cpu-0", "--timeout", "1"], env=env)
        output = " ".join(drained.output.split())
        assert drained.exit_code == 1, drained.output
        assert "device/cpu-0 cordoned" in output and "device/cpu-0 drained" not in output
        assert "error: device cpu-0 is not drained: 1 slice(s) still run on it after 1s" in output
        assert "analytics/pinned-scorer/0" in output
    finally:
        assert runner.invoke(app, ["uncordon", "cpu-0"], env=env).exit_code == 0
        deleted = runner.invoke(
            app, ["delete", "deployment", "pinned-scorer", "--tenant", "analytics"], env=env
        )
        assert deleted.exit_code == 0, deleted.output
    demo_node.wait_ready(60)


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
    # stored, but it cannot serve as it is: the CLI says so under the object
    elsewhere = tmp_path / "elsewhere.yaml"
    elsewhere.write_text(
        "apiVersion: gpuvisor/v1\nkind: Model\n"
        "metadata: {name: third-scorer, tenant: analytics}\nspec: {source: not-here.onnx}\n"
    )
    warned = runner.invoke(app, ["apply", "-f", str(elsewhere)], env=env)
    assert warned.exit_code == 0, warned.output
    assert (
        f"model/third-scorer@1 (tenant analytics) created warning: model file "
        f"{tmp_path / 'not-here.onnx'} is not on this node (yet)"
    ) in " ".join(warned.output.split())

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


def test_what_the_node_says_reaches_the_user_as_it_is(
    env: dict[str, str], demo_node: NodeProcess, tmp_path: Path
) -> None:
    folder = tmp_path / "[old]"
    folder.mkdir()
    models = demo_node.state_dir / "demo" / "models"
    (folder / "x.onnx").write_bytes((models / "basket-scorer.onnx").read_bytes())
    manifest = tmp_path / "old.yaml"
    manifest.write_text(
        "apiVersion: gpuvisor/v1\nkind: Model\nmetadata: {name: old-scorer, tenant: analytics}\n"
        "spec: {version: '1', source: '[old]/x.onnx'}\n"
    )
    applied = runner.invoke(app, ["apply", "-f", str(manifest)], env=env)
    assert applied.exit_code == 0, applied.output
    try:
        table = runner.invoke(app, ["get", "models", "-t", "analytics"], env=env)
        assert "[old]/x.onnx" in table.output, table.output
        one = runner.invoke(
            app, ["get", "model", "old-scorer", "-t", "analytics", "-o", "yaml"], env=env
        )
        assert yaml.safe_load(one.output)["spec"]["source"].endswith("[old]/x.onnx")
    finally:
        runner.invoke(app, ["delete", "model", "old-scorer", "-t", "analytics"], env=env)

    # the API asks for ?tenant=NAME; the CLI user is told the option
    untenanted = runner.invoke(app, ["get", "deployment", "shelf-detector"], env=env)
    assert untenanted.exit_code == 1
    assert "belong to a tenant: pass -t TENANT" in untenanted.output

    # host:port is plain HTTP, as the node serves it
    bare = demo_node.url.removeprefix("http://")
    status = runner.invoke(app, ["status", "--url", bare, "-o", "json"], env=env)
    assert status.exit_code == 0, status.output
    assert json.loads(status.output)["ready"] is True

    # slices are filtered by tenant in the CLI (the node lists them all)
    sliced = runner.invoke(app, ["get", "slices", "-t", "retail", "-o", "json"], env=env)
    tenants = {item["tenant"] for item in json.loads(sliced.output)["items"]}
    assert tenants == {"retail"}


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


def test_up_refuses_a_node_file_that_names_a_fleet(tmp_path: Path) -> None:
    """A running node does not load a Fleet: `up` says so and starts nothing, rather than
    accepting a setting that would silently do nothing."""
    config = tmp_path / "node.yaml"
    config.write_text(
        "apiVersion: gpuvisor/v1\nkind: Node\nmetadata: {name: edge}\nspec: {fleet: lab.fleet.yaml}\n"
    )
    state = tmp_path / "state"
    port = str(free_port())
    result = runner.invoke(
        app, ["up", "--config", str(config), "--state", str(state), "--port", port]
    )
    assert result.exit_code == 1, result.output
    output = " ".join(result.output.split())  # the console wraps long lines
    assert "spec.fleet: a running node does not load a Fleet" in output
    assert f"gpuvisor plan --fleet {tmp_path / 'lab.fleet.yaml'} -f MANIFESTS" in output
    assert not state.exists()  # refused before anything was created
