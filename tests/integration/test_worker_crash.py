"""A worker SIGKILLed under load fails only its own deployment's requests, then comes back."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import numpy as np
import orjson
import psutil

from gpuvisor.launch import NodeProcess

SHELF = orjson.dumps(
    {
        "inputs": [
            {
                "name": "image",
                "shape": [1, 3, 32, 32],
                "datatype": "FP32",
                "data": np.zeros(3072, np.float32).tolist(),
            }
        ]
    }
)
INTENT = orjson.dumps(
    {"inputs": [{"name": "tokens", "shape": [1, 16], "datatype": "INT64", "data": list(range(16))}]}
)


def _slice(node: NodeProcess, slice_id: str) -> dict[str, object]:
    items = httpx.get(f"{node.url}/api/v1/slices", headers=node.auth(node.admin_key)).json()[
        "items"
    ]
    return next(s for s in items if s["id"] == slice_id)


def test_sigkill_worker_under_load(demo_node: NodeProcess) -> None:
    victim = _slice(demo_node, "retail/shelf-detector/0")
    pid = int(victim["pid"])  # type: ignore[arg-type]
    assert pid != demo_node.process.pid and psutil.Process(pid).ppid() == demo_node.process.pid

    results: dict[str, list[int]] = {"retail": [], "support": []}
    stop = threading.Event()

    def load(tenant: str, deployment: str, body: bytes) -> None:
        with httpx.Client(
            headers=demo_node.auth(demo_node.tenant_key(tenant)), timeout=30
        ) as client:
            deadline = time.monotonic() + 20  # bounded, whatever happens
            while not stop.is_set() and time.monotonic() < deadline:
                status = client.post(
                    f"{demo_node.url}/v2/models/{deployment}/infer", content=body
                ).status_code
                results[tenant].append(status)

    threads = [
        threading.Thread(target=load, args=("retail", "shelf-detector", SHELF)) for _ in range(3)
    ]
    threads += [
        threading.Thread(target=load, args=("support", "intent-router", INTENT)) for _ in range(2)
    ]
    for t in threads:
        t.start()
    time.sleep(1.0)
    os.kill(pid, signal.SIGKILL)

    deadline = time.monotonic() + 30
    restarted = {}
    while time.monotonic() < deadline:
        restarted = _slice(demo_node, "retail/shelf-detector/0")
        if restarted["state"] == "Ready" and restarted["pid"] not in (None, pid):
            break
        time.sleep(0.1)
    time.sleep(1.0)  # let both tenants run against the restarted worker
    stop.set()
    for t in threads:
        t.join(30)

    assert restarted["state"] == "Ready" and restarted["pid"] != pid, restarted
    assert int(restarted["restarts"]) >= 1  # type: ignore[arg-type]
    retail, support = results["retail"], results["support"]
    assert support and all(s == 200 for s in support), f"support saw failures: {set(support)}"
    failed = [s for s in retail if s != 200]
    assert failed, "the kill should have failed some of retail's in-flight requests"
    assert set(failed) == {503}, f"failures must be 503, got {set(failed)}"
    assert retail[-1] == 200, "shelf-detector serves again after the restart"
    metrics = httpx.get(f"{demo_node.url}/metrics").text
    assert 'gpuvisor_worker_restarts_total{deployment="shelf-detector",tenant="retail"}' in metrics
    log = (demo_node.state_dir / "node.log").read_text()
    line = next(x for x in log.splitlines() if f"(pid {pid}) exited with code -9" in x)
    assert line.endswith("tenant=retail"), line  # whose worker it was


def test_batch_class_workers_yield_the_cpu(demo_node: NodeProcess) -> None:
    """The demo's nightly scorer (latencyClass batch) runs niced by workers.batchNice (10 by
    default); the shelf detector (critical) and the intent router (standard) do not."""
    base = psutil.Process(demo_node.process.pid).nice()
    for slice_id, wanted in [
        ("analytics/basket-scorer/0", base + 10),
        ("retail/shelf-detector/0", base),
        ("support/intent-router/0", base),
    ]:
        pid = int(_slice(demo_node, slice_id)["pid"])  # type: ignore[arg-type]
        assert psutil.Process(pid).nice() == wanted, slice_id
