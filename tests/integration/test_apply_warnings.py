"""An apply that is stored but cannot serve as it is says so in its answer: a model file
missing on the node, replicas that fit on no device."""

from __future__ import annotations

from pathlib import Path

import httpx

from gpuvisor.launch import NodeProcess

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
