"""Saving and restoring with the CLI (`get KIND -o yaml|json > f; apply -f f`), and the implicit
`default` pool, against a running node."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml
from onnx_models import slow_model
from typer.testing import CliRunner

from gpuvisor.cli import app
from gpuvisor.launch import NodeProcess

runner = CliRunner()
FORMATS = ("yaml", "json")
IMPLICIT_NOTE = (
    "implicit: not applied; the pool of deployments that name none "
    "(apply a Pool named 'default' to change it)"
)


@pytest.fixture(scope="module")
def operator_key(demo_node: NodeProcess) -> Iterator[str]:
    created = httpx.post(
        f"{demo_node.url}/api/v1/keys",
        headers=demo_node.auth(demo_node.admin_key),
        json={"role": "operator", "description": "list tests"},
        timeout=30,
    )
    assert created.status_code == 201, created.text
    yield created.json()["key"]
    httpx.delete(
        f"{demo_node.url}/api/v1/keys/{created.json()['id']}",
        headers=demo_node.auth(demo_node.admin_key),
        timeout=30,
    )


def cli(env: dict[str, str], *args: str) -> str:
    """Run a CLI command that must succeed; return what it printed on stdout."""
    result = runner.invoke(app, list(args), env=env)
    assert result.exit_code == 0, result.output
    return result.stdout


def cli_error(env: dict[str, str], *args: str) -> str:
    """Run a CLI command that must fail cleanly; return its output, on one line."""
    result = runner.invoke(app, list(args), env=env)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # an error, not a crash
    return " ".join(result.output.split())


def save(env: dict[str, str], tmp_path: Path, fmt: str, *get_args: str) -> tuple[Path, Any]:
    """``gpuvisor get ... -o FMT > file``: return the file and what it holds."""
    text = cli(env, "get", *get_args, "-o", fmt)
    path = tmp_path / f"{'-'.join(get_args).replace('/', '_')}.{fmt}"
    path.write_text(text)
    return path, (json.loads(text) if fmt == "json" else yaml.safe_load(text))


def outcomes(applied: str) -> dict[str, str]:
    """``deployment/x (tenant t) created`` lines as {"deployment/x": "created"}."""
    lines = [line.split() for line in applied.splitlines() if not line.startswith(" ")]
    return {words[0]: words[-1] for words in lines}


def wait_ready(node: NodeProcess, tenant: str, model: str) -> None:
    url = f"{node.url}/v2/models/{model}/ready"
    auth = node.auth(node.tenant_key(tenant))
    deadline = time.monotonic() + 90
    while httpx.get(url, headers=auth, timeout=5).status_code != 200:
        assert time.monotonic() < deadline, f"{tenant}/{model} did not become Ready"
        time.sleep(0.2)


# ---- saving and restoring ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("plural", ["tenants", "profiles", "models", "deployments"])
def test_a_saved_list_is_manifests_and_applies_back_unchanged(
    env: dict[str, str], tmp_path: Path, plural: str, fmt: str
) -> None:
    path, saved = save(env, tmp_path, fmt, plural)
    assert (saved["apiVersion"], saved["kind"]) == ("gpuvisor/v1", "List")
    assert saved["items"], saved
    for item in saved["items"]:
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(item), item
    applied = outcomes(cli(env, "apply", "-f", str(path)))
    assert len(applied) == len(saved["items"])
    assert set(applied.values()) == {"unchanged"}, applied


def test_a_list_the_api_answers_is_a_body_the_api_applies(demo_node: NodeProcess) -> None:
    admin = demo_node.auth(demo_node.admin_key)
    listed = httpx.get(f"{demo_node.url}/api/v1/profiles", headers=admin, timeout=30)
    assert listed.status_code == 200 and listed.json()["kind"] == "List"
    applied = httpx.post(
        f"{demo_node.url}/api/v1/apply", headers=admin, content=listed.content, timeout=60
    )
    assert applied.status_code == 200, applied.text
    results = applied.json()["results"]
    assert len(results) == len(listed.json()["items"])
    assert {r["outcome"] for r in results} == {"unchanged"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_deleted_deployment_comes_back_from_the_saved_list(
    env: dict[str, str], demo_node: NodeProcess, tmp_path: Path, fmt: str
) -> None:
    path, saved = save(env, tmp_path, fmt, "deployments")
    assert any(item["status"]["readyReplicas"] == 1 for item in saved["items"])
    cli(env, "delete", "deployment", "basket-scorer", "-t", "analytics")
    try:
        applied = outcomes(cli(env, "apply", "-f", str(path)))
    finally:
        runner.invoke(app, ["apply", "-f", str(path)], env=env)  # whatever happens, put it back
    assert applied.pop("deployment/basket-scorer") == "created"
    assert set(applied.values()) == {"unchanged"}
    wait_ready(demo_node, "analytics", "basket-scorer")


def test_a_tenant_saves_and_restores_its_own_deployments(
    env: dict[str, str], demo_node: NodeProcess, tmp_path: Path
) -> None:
    tenant_env = {**env, "GPUVISOR_KEY": demo_node.tenant_key("retail")}
    path, saved = save(tenant_env, tmp_path, "yaml", "deployments")
    assert {item["metadata"]["tenant"] for item in saved["items"]} == {"retail"}
    applied = outcomes(cli(tenant_env, "apply", "-f", str(path)))
    assert applied == {
        "deployment/shelf-detector": "unchanged",
        "deployment/sku-lookup": "unchanged",
    }


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("plural", "what"), [("devices", "a device"), ("slices", "a slice")])
def test_devices_and_slices_are_status_and_are_refused_on_apply(
    env: dict[str, str], tmp_path: Path, plural: str, what: str, fmt: str
) -> None:
    path, saved = save(env, tmp_path, fmt, plural)
    assert "kind" not in saved or saved["kind"] != "List"  # not manifests: no List to apply
    refused = cli_error(env, "apply", "-f", str(path))
    assert (
        f"{path.name} doc 1 item 1: this is {what} as 'gpuvisor get' prints it: what the node "
        "reports, not an object to apply (apply Tenant, Profile, Pool, Model or Deployment "
        "manifests)"
    ) in refused
    one_id = saved["items"][0]["id"]
    one, _ = save(env, tmp_path, fmt, plural, one_id)
    assert f"{one.name} doc 1: this is {what}" in cli_error(env, "apply", "-f", str(one))


def test_a_list_with_mistakes_applies_nothing_and_names_each_item(
    env: dict[str, str], tmp_path: Path
) -> None:
    _, saved = save(env, tmp_path, "yaml", "profiles")
    count = len(saved["items"])
    header = {"apiVersion": "gpuvisor/v1", "metadata": {"name": "list-extra"}}
    saved["items"] += [
        {**header, "kind": "Profile", "spec": {"memory": "256Mi"}},  # fine on its own
        {**header, "kind": "Widget"},
        {**header, "kind": "Profile", "metadata": {"name": "list-bad"}, "spec": {"memory": "x"}},
    ]
    path = tmp_path / "profiles-edited.yaml"
    path.write_text(yaml.safe_dump(saved, sort_keys=False))
    refused = cli_error(env, "apply", "-f", str(path))
    assert f"profiles-edited.yaml doc 1 item {count + 2}: kind: unknown kind 'Widget'" in refused
    assert (
        f"profiles-edited.yaml doc 1 item {count + 3} Profile/list-bad: spec.memory: expected a "
        "size like '512Mi'"
    ) in refused
    # all or nothing: the valid new item was not stored either
    assert "not found" in cli_error(env, "get", "profile", "list-extra")

    # a reference that does not resolve is found on the node, and named by its item too
    dangling = {
        "kind": "List",
        "items": [
            {
                "apiVersion": "gpuvisor/v1",
                "kind": "Deployment",
                "metadata": {"name": "list-dangling", "tenant": "retail"},
                "spec": {"model": "sku-lookup", "profile": "std-smal"},
            }
        ],
    }
    path.write_text(json.dumps(dangling))
    assert (
        "profiles-edited.yaml doc 1 item 1 Deployment/list-dangling: spec.profile: unknown "
        "profile 'std-smal' (did you mean 'std-small'?)"
    ) in cli_error(env, "apply", "-f", str(path))


# ---- the implicit default pool ----------------------------------------------------------


def test_the_implicit_default_pool_is_listed_and_shown(env: dict[str, str], tmp_path: Path) -> None:
    table = cli(env, "get", "pools").splitlines()
    assert [line.split()[0] for line in table] == ["NAME", "default", "inference"]
    assert table[1].split()[1:3] == ["shared", "best-effort"]
    assert table[1].endswith("implicit (not applied)")
    assert "implicit" not in table[2]
    for fmt in FORMATS:
        _, listed = save(env, tmp_path, fmt, "pools")
        default = listed["items"][0]
        assert default == {
            "apiVersion": "gpuvisor/v1",
            "metadata": {"name": "default", "tenant": None, "labels": {}},
            "kind": "Pool",
            "spec": {
                "selector": {},
                "tenancy": "shared",
                "scheduler": "best-effort",
                "placement": "binpack",
                "memoryHeadroom": 0,
                "requireSignedModels": False,
                "trustedKeys": [],
            },
            "status": {"implicit": True, "note": IMPLICIT_NOTE},
        }
        assert "status" not in listed["items"][1]  # an applied pool says nothing of the sort
    one = yaml.safe_load(cli(env, "get", "pool", "default"))
    assert one["status"]["note"] == IMPLICIT_NOTE
    described = cli(env, "describe", "pool", "default")
    assert "implicit: true" in described


@pytest.mark.parametrize("role", ["admin", "operator", "tenant"])
def test_whoever_may_read_pools_sees_the_implicit_one(
    demo_node: NodeProcess, operator_key: str, role: str
) -> None:
    key = {
        "admin": demo_node.admin_key,
        "operator": operator_key,
        "tenant": demo_node.tenant_key("support"),
    }[role]
    headers = demo_node.auth(key)
    listed = httpx.get(f"{demo_node.url}/api/v1/pools", headers=headers, timeout=30)
    assert listed.status_code == 200, listed.text
    names = [item["metadata"]["name"] for item in listed.json()["items"]]
    assert names == ["default", "inference"]
    one = httpx.get(f"{demo_node.url}/api/v1/pools/default", headers=headers, timeout=30)
    assert one.status_code == 200 and one.json()["status"]["implicit"] is True
    # a filter by tenant selects no cluster-scoped object, the implicit one neither
    filtered = httpx.get(
        f"{demo_node.url}/api/v1/pools", params={"tenant": "support"}, headers=headers, timeout=30
    )
    assert filtered.json()["items"] == []
    # deleting it: refused as for any pool to those who may not change pools, and to the
    # admin because there is nothing stored to delete
    deleted = httpx.delete(f"{demo_node.url}/api/v1/pools/default", headers=headers, timeout=30)
    assert deleted.status_code == (409 if role == "admin" else 403), deleted.text
    assert httpx.get(f"{demo_node.url}/api/v1/pools/default", headers=headers).status_code == 200


def test_deleting_the_implicit_pool_says_why_it_cannot_be(env: dict[str, str]) -> None:
    refused = cli_error(env, "delete", "pool", "default")
    assert refused == (
        "error: Pool default cannot be deleted: it was never applied. It is the implicit pool "
        "of deployments that name none (every device); apply a Pool named 'default' to change it"
    )


def test_an_applied_default_pool_replaces_the_implicit_one_until_deleted(
    env: dict[str, str], demo_node: NodeProcess, tmp_path: Path
) -> None:
    manifest = tmp_path / "default-pool.yaml"
    manifest.write_text(
        "apiVersion: gpuvisor/v1\nkind: Pool\nmetadata: {name: default}\n"
        "spec: {selector: {kind: cpu}, scheduler: equal-share}\n"
    )
    assert "pool/default created" in cli(env, "apply", "-f", str(manifest))
    try:
        one = yaml.safe_load(cli(env, "get", "pool", "default"))
        assert "status" not in one and one["spec"]["scheduler"] == "equal-share"
        _, listed = save(env, tmp_path, "json", "pools")
        defaults = [i for i in listed["items"] if i["metadata"]["name"] == "default"]
        assert len(defaults) == 1 and defaults[0]["spec"]["selector"] == {"kind": "cpu"}
    finally:
        deleted = runner.invoke(app, ["delete", "pool", "default"], env=env)
    assert deleted.exit_code == 0 and "pool/default deleted" in deleted.output
    again = yaml.safe_load(cli(env, "get", "pool", "default"))
    assert again["status"]["implicit"] is True and again["spec"]["scheduler"] == "best-effort"


def test_a_saved_pool_list_applies_the_implicit_pool_as_a_real_one(
    env: dict[str, str], tmp_path: Path
) -> None:
    """What a saved list holds is applied as it is: the implicit pool's settings become a
    stored Pool `default` (the same behaviour), which can then be deleted again."""
    path, _ = save(env, tmp_path, "yaml", "pools")
    try:
        applied = outcomes(cli(env, "apply", "-f", str(path)))
        assert applied == {"pool/default": "created", "pool/inference": "unchanged"}
        assert "status" not in yaml.safe_load(cli(env, "get", "pool", "default"))
    finally:
        runner.invoke(app, ["delete", "pool", "default"], env=env)
    assert "implicit" in cli(env, "get", "pool", "default")


def test_one_device_is_read_by_its_id(demo_node: NodeProcess) -> None:
    admin = demo_node.auth(demo_node.admin_key)
    listed = httpx.get(f"{demo_node.url}/api/v1/devices", headers=admin, timeout=30).json()
    one = httpx.get(f"{demo_node.url}/api/v1/devices/cpu-0", headers=admin, timeout=30)
    assert one.status_code == 200, one.text
    assert one.json() == listed["items"][0]
    # camelCase, as every other object of the API
    assert {"memoryTotal", "numaNode", "migMode", "healthReason", "memoryReserved"} <= set(
        one.json()
    )
    assert not [key for key in one.json() if "_" in key], one.json()
    missing = httpx.get(f"{demo_node.url}/api/v1/devices/gpu-9", headers=admin, timeout=30)
    assert missing.status_code == 404
    assert missing.json()["error"] == "device 'gpu-9' not found (this node has: cpu-0)"


def test_a_list_filtered_by_an_unknown_tenant_is_not_found(demo_node: NodeProcess) -> None:
    admin = demo_node.auth(demo_node.admin_key)
    for plural in ("deployments", "models"):
        answer = httpx.get(
            f"{demo_node.url}/api/v1/{plural}",
            params={"tenant": "nosuch"},
            headers=admin,
            timeout=30,
        )
        assert answer.status_code == 404, answer.text
        assert answer.json()["error"].startswith("unknown tenant 'nosuch'")
    known = httpx.get(
        f"{demo_node.url}/api/v1/deployments",
        params={"tenant": "retail"},
        headers=admin,
        timeout=30,
    )
    assert known.status_code == 200 and known.json()["items"]
    # one object named in an unknown tenant: the tenant is the mistake, whatever the method
    for method in ("GET", "DELETE"):
        answer = httpx.request(
            method,
            f"{demo_node.url}/api/v1/deployments/shelf-detector",
            params={"tenant": "nosuch"},
            headers=admin,
            timeout=30,
        )
        assert answer.status_code == 404, answer.text
        assert answer.json()["error"].startswith("unknown tenant 'nosuch'")
    missing = httpx.get(
        f"{demo_node.url}/api/v1/deployments/nothing",
        params={"tenant": "retail"},
        headers=admin,
        timeout=30,
    )
    assert missing.json()["error"] == "Deployment 'nothing' not found in tenant 'retail'"


def test_the_documented_save_and_restore_fills_an_empty_node(
    env: dict[str, str], demo_node: NodeProcess, tmp_path: Path
) -> None:
    """The loop in docs/operations.md, in its order, from the demo node (with a tenant that
    names a pool) to a node with nothing applied: everything comes back."""
    docs = (Path(__file__).parents[2] / "docs" / "operations.md").read_text()
    block = docs.split("```sh\nfor kind in ", 1)[1].split("```", 1)[0]
    kinds = block.split("; do", 1)[0].split()
    apply_line = next(line for line in block.splitlines() if line.startswith("gpuvisor apply"))
    order = [w.removesuffix(".yaml") for w in apply_line.split() if w.endswith(".yaml")]
    assert sorted(order) == sorted(kinds)
    cli(env, "apply", "-f", str(_write(tmp_path, "confined.yaml", CONFINED)))
    try:
        saved = {kind: save(env, tmp_path, "yaml", kind)[0] for kind in kinds}
        with NodeProcess(state_dir=tmp_path / "empty", demo=False) as empty:
            empty_env = {**env, "GPUVISOR_URL": empty.url, "GPUVISOR_STATE": str(empty.state_dir)}
            args = [a for kind in order for a in ("-f", str(saved[kind]))]
            applied = outcomes(cli(empty_env, "apply", *args))
            assert applied["tenant/confined"] == "created"
            assert applied["deployment/shelf-detector"] == "created"
            assert cli(empty_env, "get", "tenants", "-o", "yaml") == cli(
                env, "get", "tenants", "-o", "yaml"
            )
    finally:
        cli(env, "delete", "tenant", "confined")


CONFINED = """
apiVersion: gpuvisor/v1
kind: Tenant
metadata: {name: confined}
spec: {pools: [inference]}
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@contextlib.contextmanager
def _analytics_deployment(node: NodeProcess, name: str, source: Path) -> Iterator[None]:
    """A Model ``name`` of ``source`` and its Deployment in the demo's analytics tenant, for
    the test's time."""
    admin = node.auth(node.admin_key)
    manifest = f"""
apiVersion: gpuvisor/v1
kind: Model
metadata: {{name: {name}, tenant: analytics}}
spec: {{source: {source}}}
---
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {{name: {name}, tenant: analytics}}
spec: {{model: {name}, profile: std-small}}
"""
    applied = httpx.post(f"{node.url}/api/v1/apply", headers=admin, content=manifest, timeout=60)
    assert applied.status_code == 200, applied.text
    try:
        yield
    finally:
        for plural in ("deployments", "models"):
            deleted = httpx.delete(
                f"{node.url}/api/v1/{plural}/{name}",
                params={"tenant": "analytics"},
                headers=admin,
                timeout=60,
            )
            assert deleted.status_code == 200, deleted.text


def _slice(node: NodeProcess, slice_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One slice as the API lists it, and every slice listed with it."""
    listed = httpx.get(f"{node.url}/api/v1/slices", headers=node.auth(node.admin_key), timeout=30)
    items: list[dict[str, Any]] = listed.json()["items"]
    [item] = [s for s in items if s["id"] == slice_id]
    return item, items


def test_a_failed_slice_holds_no_room_on_its_device(demo_node: NodeProcess, tmp_path: Path) -> None:
    """Placement gives a Failed slice's room back; the device listing says the same."""
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with _analytics_deployment(demo_node, "garbage", garbage):
        deadline = time.monotonic() + 60
        while (found := _slice(demo_node, "analytics/garbage/0"))[0]["state"] != "Failed":
            assert time.monotonic() < deadline, found[0]
            time.sleep(0.2)
        failed, items = found
        device = httpx.get(
            f"{demo_node.url}/api/v1/devices/cpu-0",
            headers=demo_node.auth(demo_node.admin_key),
            timeout=30,
        ).json()
        holding = [s for s in items if s["device"] == "cpu-0" and s["state"] != "Failed"]
        assert failed["id"] not in device["slices"]
        assert sorted(device["slices"]) == sorted(s["id"] for s in holding)
        assert device["memoryReserved"] == sum(s["memory"] for s in holding)


def test_a_loading_slice_names_the_worker_that_loads_it(
    demo_node: NodeProcess, tmp_path: Path
) -> None:
    model = tmp_path / "slow.onnx"
    model.write_bytes(slow_model(400_000))  # its load runs it several times: seconds
    with _analytics_deployment(demo_node, "slow", model):
        deadline = time.monotonic() + 60
        while True:
            item, _ = _slice(demo_node, "analytics/slow/0")
            if item["state"] == "Loading" and item["pid"] is not None:
                break
            assert item["state"] in ("Pending", "Loading"), item
            assert time.monotonic() < deadline, item
            time.sleep(0.05)
        assert psutil.pid_exists(item["pid"])
        assert "gpuvisor.runtime.worker" in " ".join(psutil.Process(item["pid"]).cmdline())
