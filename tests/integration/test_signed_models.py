"""Signed models on a running node: a pool with requireSignedModels serves a correctly signed
model, refuses unsigned and untrusted ones at apply, and fails a slice whose file changed until
the signed file is back."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gpuvisor.demo.models import build_demo_model, sample_inputs
from gpuvisor.launch import NodeProcess
from gpuvisor.runtime.tensors import json_infer_request
from gpuvisor.security.signing import KeyPair, generate_key_pair, load_private_key, sign_file

BASE = """
apiVersion: gpuvisor/v1
kind: Tenant
metadata: {{name: acme}}
spec: {{pools: [secure]}}
---
apiVersion: gpuvisor/v1
kind: Profile
metadata: {{name: small}}
spec: {{memory: 512Mi}}
---
apiVersion: gpuvisor/v1
kind: Pool
metadata: {{name: secure}}
spec: {{requireSignedModels: true, trustedKeys: ["{key}"]}}
"""
MODEL_AND_DEPLOYMENT = """
apiVersion: gpuvisor/v1
kind: Model
metadata: {{name: {name}, tenant: acme}}
spec: {{source: "{source}", signature: {signature}}}
---
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {{name: {name}, tenant: acme}}
spec: {{model: {name}, profile: small, pool: secure}}
"""


@dataclass
class Setup:
    node: NodeProcess
    trusted: KeyPair
    other: KeyPair
    models: Path
    tenant_key: str

    def admin(self) -> dict[str, str]:
        return self.node.auth(self.node.admin_key)

    def model_file(self, name: str) -> Path:
        path = self.models / f"{name}.onnx"
        path.write_bytes(build_demo_model("basket-scorer").SerializeToString())
        return path

    def apply(self, name: str, source: Path, signature: str | None) -> httpx.Response:
        manifest = MODEL_AND_DEPLOYMENT.format(
            name=name, source=source, signature=signature or "null"
        )
        return httpx.post(
            f"{self.node.url}/api/v1/apply", headers=self.admin(), content=manifest, timeout=60
        )

    def slices(self, name: str) -> list[dict[str, object]]:
        response = httpx.get(
            f"{self.node.url}/api/v1/deployments/{name}?tenant=acme", headers=self.admin()
        )
        assert response.status_code == 200, response.text
        return response.json()["status"]["slices"]  # type: ignore[no-any-return]

    def wait_settled(self, name: str, timeout: float = 60) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            slices = self.slices(name)
            if slices and slices[0]["state"] in ("Ready", "Failed", "Pending"):
                return slices[0]
            time.sleep(0.1)
        raise AssertionError(f"{name} did not settle: {self.slices(name)}")

    def infer(self, name: str) -> httpx.Response:
        return httpx.post(
            f"{self.node.url}/v2/models/{name}/infer",
            headers=self.node.auth(self.tenant_key),
            content=json_infer_request(sample_inputs("basket-scorer")),
            timeout=30,
        )


def _sign(pair: KeyPair, path: Path) -> str:
    return sign_file(load_private_key(pair.private_path), path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("signed-models")
    keys, models = root / "keys", root / "models"
    models.mkdir()
    trusted, other = generate_key_pair(keys, "trusted"), generate_key_pair(keys, "other")
    node = NodeProcess(state_dir=root / "state", demo=False)
    node.start(timeout=120)
    try:
        node.apply_as_admin(BASE.format(key=trusted.public_text))
        yield Setup(node, trusted, other, models, node.create_tenant_key("acme"))
    finally:
        node.stop()


def test_correctly_signed_model_becomes_ready_and_serves(setup: Setup) -> None:
    source = setup.model_file("good")
    applied = setup.apply("good", source, _sign(setup.trusted, source))
    assert applied.status_code == 200, applied.text
    assert setup.wait_settled("good")["state"] == "Ready"
    response = setup.infer("good")
    assert response.status_code == 200, response.text
    assert response.json()["outputs"]


def _assert_refused(setup: Setup, name: str, response: httpx.Response, words: list[str]) -> None:
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["code"] == "integrity_error"
    for word in words:
        assert word in body["error"]
    # nothing of the refused manifest was stored
    missing = httpx.get(
        f"{setup.node.url}/api/v1/deployments/{name}?tenant=acme", headers=setup.admin()
    )
    assert missing.status_code == 404, missing.text


def test_unsigned_model_is_refused_at_apply(setup: Setup) -> None:
    source = setup.model_file("unsigned")
    response = setup.apply("unsigned", source, None)
    _assert_refused(setup, "unsigned", response, ["not signed", "requireSignedModels", "secure"])
    assert response.json()["reason"] == "unsigned"


def test_model_signed_by_another_key_is_refused_at_apply(setup: Setup) -> None:
    source = setup.model_file("foreign")
    response = setup.apply("foreign", source, _sign(setup.other, source))
    _assert_refused(setup, "foreign", response, [setup.other.fingerprint, "not in the trustedKeys"])
    assert response.json()["reason"] == "untrusted_key"
    assert response.json()["key"] == setup.other.fingerprint


def test_malformed_signature_is_refused_at_apply(setup: Setup) -> None:
    source = setup.model_file("garbled")
    response = setup.apply("garbled", source, "ed25519:nonsense")
    _assert_refused(setup, "garbled", response, ["malformed signature"])


def test_file_changed_after_signing_fails_the_slice_until_the_signed_file_is_back(
    setup: Setup,
) -> None:
    source = setup.model_file("tampered")
    applied = setup.apply("tampered", source, _sign(setup.trusted, source))
    assert applied.status_code == 200, applied.text
    assert setup.wait_settled("tampered")["state"] == "Ready"
    # the file is replaced while the node serves it; the next load must refuse it
    replacement = setup.models / "replacement.onnx"
    replacement.write_bytes(build_demo_model("shelf-classifier").SerializeToString())
    shutil.move(replacement, source)
    tenant = setup.node.auth(setup.tenant_key)
    base = f"{setup.node.url}/v2/repository/models/tampered"
    assert httpx.post(f"{base}/unload", headers=tenant, timeout=30).status_code == 200
    reload = httpx.post(f"{base}/load", headers=tenant, timeout=60)
    assert reload.status_code == 503, reload.text
    assert "is not the file that was signed" in reload.json()["error"]
    state = setup.wait_settled("tampered")
    assert state["state"] == "Failed"
    assert "is not the file that was signed" in str(state["reason"])
    assert setup.trusted.fingerprint in str(state["reason"])
    assert setup.infer("tampered").status_code == 503
    # putting the signed file back brings the slice back, with no apply and no load by hand
    setup.model_file("tampered")
    deadline = time.monotonic() + 60
    while (state := setup.slices("tampered")[0])["state"] != "Ready":
        assert time.monotonic() < deadline, state
        time.sleep(0.1)
    assert setup.infer("tampered").status_code == 200
