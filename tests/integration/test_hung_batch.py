"""A model that hangs does not hold its device: once a batch has held the device for
``workers.batchTimeout``, its worker is killed, its request fails with a 503 that says why,
the other tenant's request that waited behind it runs, and the worker comes back.

A real node, real workers, and a real hanging model: an ONNX ``Loop`` whose trip count is
the largest input value, so a request with 1e12 in it runs for days (while the zeros the
worker profiles the model with at load run no iteration at all).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import orjson
import pytest
from onnx_models import adder_model, looper_model

from gpuvisor.launch import NodeProcess
from gpuvisor.runtime.tensors import json_infer_request

NODE_CONFIG = """
apiVersion: gpuvisor/v1
kind: Node
metadata: {name: watchdog}
spec:
  cpu: {enabled: true, memory: 2Gi, threads: 1}
  workers: {batchTimeout: 1s, restartBackoff: 100ms}
"""

MANIFEST = """
apiVersion: gpuvisor/v1
kind: Tenant
metadata: {name: stuck}
---
apiVersion: gpuvisor/v1
kind: Tenant
metadata: {name: other}
---
apiVersion: gpuvisor/v1
kind: Profile
metadata: {name: small}
spec: {memory: 256Mi, computeShare: 0.2}
---
apiVersion: gpuvisor/v1
kind: Model
metadata: {name: looper, tenant: stuck}
spec: {source: LOOPER}
---
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {name: looper, tenant: stuck}
spec: {model: looper, profile: small}
---
apiVersion: gpuvisor/v1
kind: Model
metadata: {name: adder, tenant: other}
spec: {source: ADDER}
---
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {name: adder, tenant: other}
spec: {model: adder, profile: small}
---
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {name: adder-one, tenant: other}
spec: {model: adder, profile: small, batching: {maxBatchSize: 1}}
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    root = tmp_path_factory.mktemp("hung-batch")
    (root / "looper.onnx").write_bytes(looper_model())
    (root / "adder.onnx").write_bytes(adder_model(1.0))
    config = root / "node.yaml"
    config.write_text(NODE_CONFIG)
    proc = NodeProcess(state_dir=root / "state", config=config, demo=False)
    proc.start(timeout=120)
    try:
        manifest = MANIFEST.replace("LOOPER", str(root / "looper.onnx"))
        proc.apply_as_admin(manifest.replace("ADDER", str(root / "adder.onnx")))
        yield proc
    finally:
        proc.stop()


def infer(node: NodeProcess, key: str, model: str, x: np.ndarray) -> httpx.Response:
    return httpx.post(
        f"{node.url}/v2/models/{model}/infer",
        content=json_infer_request({"x": x.astype(np.float32)}),
        headers=node.auth(key),
        timeout=60,
    )


def output(response: httpx.Response) -> list[float]:
    [out] = orjson.loads(response.content)["outputs"]
    return [float(v) for v in out["data"]]


def slice_of(node: NodeProcess, tenant: str, deployment: str | None = None) -> dict[str, object]:
    items = httpx.get(
        f"{node.url}/api/v1/slices", headers=node.auth(node.admin_key), timeout=30
    ).json()["items"]
    wanted = deployment or {"stuck": "looper", "other": "adder"}[tenant]
    [mine] = [i for i in items if i["tenant"] == tenant and i["deployment"] == wanted]
    return mine  # type: ignore[no-any-return]


def wait_ready(
    node: NodeProcess, tenant: str, restarts: int = 0, deployment: str | None = None
) -> dict[str, object]:
    deadline = time.monotonic() + 120
    while True:
        found = slice_of(node, tenant, deployment)
        if found["state"] == "Ready" and found["restarts"] == restarts:
            return found
        assert time.monotonic() < deadline, (found["state"], found["reason"], found["restarts"])
        time.sleep(0.05)


def test_a_hung_batch_is_stopped_and_the_batch_behind_it_runs(node: NodeProcess) -> None:
    stuck, other = node.create_tenant_key("stuck"), node.create_tenant_key("other")
    before = wait_ready(node, "stuck")
    wait_ready(node, "other")
    small = np.full((1, 4), 2.0)
    assert output(infer(node, stuck, "looper", small)) == [4.0] * 4  # 2 + 2 iterations

    answers: dict[str, httpx.Response] = {}

    def send(name: str, key: str, model: str, x: np.ndarray) -> None:
        answers[name] = infer(node, key, model, x)

    hang = threading.Thread(target=send, args=("hung", stuck, "looper", np.full((1, 4), 1e12)))
    hang.start()
    time.sleep(0.3)  # the hung batch holds the device now; this request queues behind it
    behind = threading.Thread(target=send, args=("behind", other, "adder", small))
    behind.start()
    hang.join(60)
    behind.join(60)

    hung = answers["hung"]
    assert hung.status_code == 503, hung.text
    error = hung.json()["error"]
    assert error.startswith("a batch of slice stuck/looper/0 held device cpu-0 for 1"), error
    assert "longer than the batch timeout (1s, workers.batchTimeout)" in error
    assert error.endswith("was stopped while serving this request; it is being restarted")
    assert hung.headers["Retry-After"] == "1"
    # the other tenant's request waited behind it, and was answered
    assert answers["behind"].status_code == 200, answers["behind"].text
    assert output(answers["behind"]) == [3.0] * 4

    # the worker comes back (a new process) and serves again
    after = wait_ready(node, "stuck", restarts=1)
    assert after["pid"] != before["pid"]
    assert output(infer(node, stuck, "looper", small)) == [4.0] * 4
    assert output(infer(node, other, "adder", small)) == [3.0] * 4
    metrics = httpx.get(f"{node.url}/metrics", timeout=30).text
    assert (
        'gpuvisor_hung_batches_total{deployment="looper",device="cpu-0",tenant="stuck"} 1.0'
        in metrics
    )


def test_a_request_staged_behind_a_hung_batch_is_answered_at_its_deadline(
    node: NodeProcess,
) -> None:
    """A request granted to run next (staged behind the running batch, as a batch of one
    always is) whose deadline passes while the running batch hangs is taken back and answered
    503 at its deadline, not once the batch timeout has stopped the hung batch."""
    stuck, other = node.create_tenant_key("stuck"), node.create_tenant_key("other")
    wait_ready(node, "stuck", restarts=slice_of(node, "stuck")["restarts"])  # type: ignore[arg-type]
    wait_ready(node, "other", deployment="adder-one")
    answers: dict[str, httpx.Response] = {}
    hang = threading.Thread(
        target=lambda: answers.update(hung=infer(node, stuck, "looper", np.full((1, 4), 1e12)))
    )
    hang.start()
    time.sleep(0.3)  # the hung batch holds the device
    started = time.monotonic()
    late = httpx.post(
        f"{node.url}/v2/models/adder-one/infer",
        content=json_infer_request(
            {"x": np.full((1, 4), 2.0, dtype=np.float32)}, {"timeout": 200_000}
        ),
        headers=node.auth(other),
        timeout=60,
    )
    waited = time.monotonic() - started
    hang.join(60)
    assert late.status_code == 503, late.text
    error = late.json()
    assert (error["code"], error["reason"]) == ("deadline_exceeded", "deadline_expired"), error
    assert waited < 0.9, f"answered after {waited:.2f}s: at the batch timeout, not the deadline"
    assert answers["hung"].status_code == 503
    # the other requests of that deployment are served once the device is free again
    assert output(infer(node, other, "adder-one", np.full((1, 4), 2.0))) == [3.0] * 4
