"""An apply that is stored but cannot serve as it is says so in its answer: a model file
missing on the node, replicas that fit on no device."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from gpuvisor.demo.models import sample_inputs
from gpuvisor.launch import NodeProcess
from gpuvisor.runtime.tensors import json_infer_request

MANIFEST = """
apiVersion: gpuvisor/v1
kind: Tenant
metadata: {name: nightly}
---
apiVersion: gpuvisor/v1
kind: Model
metadata: {name: nightly-scorer, tenant: nightly}
spec: {source: SOURCE}
---
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {name: nightly-scorer, tenant: nightly}
spec: {model: nightly-scorer, profile: PROFILE, replicas: 2}
"""


def _apply(node: NodeProcess, text: str) -> dict[tuple[str, str], list[str]]:
    answer = httpx.post(
        f"{node.url}/api/v1/apply", headers=node.auth(node.admin_key), content=text, timeout=60
    )
    assert answer.status_code == 200, answer.text
    return {(r["kind"], r["name"]): r["warnings"] for r in answer.json()["results"]}


def test_apply_warns_about_a_missing_model_file_and_unplaceable_replicas(
    demo_node: NodeProcess, tmp_path: Path
) -> None:
    missing = tmp_path / "nightly-scorer.onnx"
    warnings = _apply(
        demo_node, MANIFEST.replace("SOURCE", str(missing)).replace("PROFILE", "std-shared")
    )
    assert warnings[("Model", "nightly-scorer@1")] == [
        f"model file {missing} is not on this node (yet): deployments of this model stay "
        "Failed until it is (they load as soon as it appears)"
    ]
    assert warnings[("Deployment", "nightly-scorer")] == []

    # the file in place, and a profile that asks for more of the device than is left
    present = demo_node.state_dir / "demo" / "models" / "basket-scorer.onnx"
    profile = (
        "apiVersion: gpuvisor/v1\nkind: Profile\nmetadata: {name: huge}\n"
        "spec: {memory: 256Mi, computeShare: 0.9}\n---\n"
    )
    warnings = _apply(
        demo_node, profile + MANIFEST.replace("SOURCE", str(present)).replace("PROFILE", "huge")
    )
    assert warnings[("Model", "nightly-scorer@1")] == []
    [pending] = warnings[("Deployment", "nightly-scorer")]
    assert pending.startswith("2 of 2 replica(s) Pending: cpu-0: compute shares would sum to ")
    # said once, by the deployment: not again under the profile applied with it
    assert warnings[("Profile", "huge")] == []


WEEKLY = """
apiVersion: gpuvisor/v1
kind: Tenant
metadata: {name: weekly}
---
apiVersion: gpuvisor/v1
kind: Profile
metadata: {name: weekly-small}
spec: {memory: 256Mi, computeShare: 0.05}
---
apiVersion: gpuvisor/v1
kind: Model
metadata: {name: weekly-scorer, tenant: weekly}
spec: {source: SOURCE, version: "1"}
---
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {name: weekly-scorer, tenant: weekly}
spec: {model: weekly-scorer, profile: weekly-small}
"""


def _apply_results(node: NodeProcess, text: str) -> dict[tuple[str, str], dict[str, list[str]]]:
    answer = httpx.post(
        f"{node.url}/api/v1/apply", headers=node.auth(node.admin_key), content=text, timeout=60
    )
    assert answer.status_code == 200, answer.text
    return {(r["kind"], r["name"]): r for r in answer.json()["results"]}


def _serving(node: NodeProcess) -> list[tuple[str, str]]:
    items = httpx.get(
        f"{node.url}/api/v1/slices", headers=node.auth(node.admin_key), timeout=30
    ).json()["items"]
    return sorted((s["model"], s["state"]) for s in items if s["tenant"] == "weekly")


def _wait_serving(node: NodeProcess, want: list[tuple[str, str]]) -> None:
    deadline = time.monotonic() + 120
    while (found := _serving(node)) != want:
        assert time.monotonic() < deadline, found
        time.sleep(0.05)


def test_apply_says_which_deployments_roll_and_which_a_profile_leaves_pending(
    demo_node: NodeProcess,
) -> None:
    source = demo_node.state_dir / "demo" / "models" / "basket-scorer.onnx"
    manifest = WEEKLY.replace("SOURCE", str(source))
    first = _apply_results(demo_node, manifest)
    assert first[("Model", "weekly-scorer@1")]["notes"] == []  # nothing served it before
    _wait_serving(demo_node, [("weekly-scorer@1", "Ready")])

    # a new version of a model the deployment names without a version: it rolls to it (and
    # not to the old version, which the same file holds)
    v1 = manifest.split("---")[2]
    v2 = v1.replace('version: "1"', 'version: "2"')
    second = _apply_results(demo_node, v1 + "---" + v2)
    assert second[("Model", "weekly-scorer@1")]["notes"] == []
    assert second[("Model", "weekly-scorer@2")]["notes"] == [
        "deployment weekly-scorer rolls from weekly-scorer@1 to weekly-scorer@2, replica by "
        "replica: follow it with `gpuvisor describe deployment weekly-scorer -t weekly`"
    ]
    _wait_serving(demo_node, [("weekly-scorer@2", "Ready")])
    # the same version again changes nothing and says nothing
    again = _apply_results(demo_node, v2)
    assert again[("Model", "weekly-scorer@2")]["outcome"] == "unchanged"
    assert again[("Model", "weekly-scorer@2")]["notes"] == []

    # the profile grows past what the device has left: the apply says whose replicas it strands
    grown = manifest.split("---")[1].replace("computeShare: 0.05", "computeShare: 0.99")
    results = _apply_results(demo_node, grown)
    [warning] = results[("Profile", "weekly-small")]["warnings"]
    assert warning == (
        "deployment weekly/weekly-scorer: 1 of 1 replica(s) Pending: no device has room for "
        "the new spec now, even in the old instance's place (weekly/weekly-scorer/0#2 serves "
        "the old spec meanwhile; placed again at every reconcile)"
    ), warning
    # the old instance serves on, the new spec waits for room
    assert _serving(demo_node) == [("weekly-scorer@2", "Pending"), ("weekly-scorer@2", "Ready")]
    items = httpx.get(
        f"{demo_node.url}/api/v1/slices", headers=demo_node.auth(demo_node.admin_key), timeout=30
    ).json()["items"]
    [old] = [i for i in items if i["tenant"] == "weekly" and i["state"] == "Ready"]
    assert old["reason"].endswith("fits on no device"), old["reason"]
    key = demo_node.create_tenant_key("weekly")
    body = json_infer_request(sample_inputs("basket-scorer"))
    served = httpx.post(
        f"{demo_node.url}/v2/models/weekly-scorer/infer",
        headers=demo_node.auth(key),
        content=body,
        timeout=30,
    )
    assert served.status_code == 200, served.text
    # the profile back within room: the replica takes the new spec, and one instance is left
    shrunk = grown.replace("computeShare: 0.99", "computeShare: 0.06")
    assert _apply_results(demo_node, shrunk)[("Profile", "weekly-small")]["warnings"] == []
    _wait_serving(demo_node, [("weekly-scorer@2", "Ready")])
