"""A client that leaves while its request is queued: the request is dropped without running,
counted as ``client_closed``, and the requests queued beside it are served as usual.

A real node and worker, and a real slow model (an ONNX ``Loop`` that runs max(x) times) to
hold the device while the other requests queue behind it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from onnx_models import looper_model
from prometheus_client.parser import text_string_to_metric_families

from gpuvisor.launch import NodeProcess
from gpuvisor.runtime.tensors import json_infer_request

NODE_CONFIG = """
apiVersion: gpuvisor/v1
kind: Node
metadata: {name: leaving}
spec:
  cpu: {enabled: true, memory: 2Gi, threads: 1}
"""

MANIFEST = """
apiVersion: gpuvisor/v1
kind: Tenant
metadata: {name: shop}
---
apiVersion: gpuvisor/v1
kind: Profile
metadata: {name: small}
spec: {memory: 256Mi, computeShare: 0.5}
---
apiVersion: gpuvisor/v1
kind: Model
metadata: {name: looper, tenant: shop}
spec: {source: LOOPER}
---
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {name: looper, tenant: shop}
spec: {model: looper, profile: small, batching: {maxBatchSize: 1}}
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    root = tmp_path_factory.mktemp("client-disconnect")
    (root / "looper.onnx").write_bytes(looper_model())
    config = root / "node.yaml"
    config.write_text(NODE_CONFIG)
    proc = NodeProcess(state_dir=root / "state", config=config, demo=False)
    proc.start(timeout=120)
    try:
        proc.apply_as_admin(MANIFEST.replace("LOOPER", str(root / "looper.onnx")))
        _wait_ready(proc)
        yield proc
    finally:
        proc.stop()


def _wait_ready(node: NodeProcess) -> None:
    deadline = time.monotonic() + 120
    while True:
        items = httpx.get(
            f"{node.url}/api/v1/slices", headers=node.auth(node.admin_key), timeout=30
        ).json()["items"]
        if [s["state"] for s in items] == ["Ready"]:
            return
        assert time.monotonic() < deadline, items
        time.sleep(0.05)


def _body(trips: float) -> bytes:
    return json_infer_request({"x": np.full((1, 4), trips, dtype=np.float32)})


def _infer(node: NodeProcess, key: str, trips: float) -> httpx.Response:
    return httpx.post(
        f"{node.url}/v2/models/looper/infer",
        content=_body(trips),
        headers=node.auth(key),
        timeout=60,
    )


def _counters(node: NodeProcess) -> tuple[dict[str, float], float]:
    """The looper's requests by outcome, and the rows its batches have run (from /metrics)."""
    outcomes: dict[str, float] = {}
    rows = 0.0
    text = httpx.get(node.url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("deployment") != "looper":
                continue
            if sample.name == "gpuvisor_requests_total":
                outcomes[sample.labels["outcome"]] = sample.value
            elif sample.name == "gpuvisor_batch_size_sum":
                rows += sample.value
    return outcomes, rows


def _trips_for(node: NodeProcess, key: str, seconds: float) -> float:
    """How many Loop iterations take about ``seconds`` on this machine now."""
    trips = 200_000.0
    started = time.perf_counter()
    assert _infer(node, key, trips).status_code == 200
    per_trip = (time.perf_counter() - started) / trips
    return float(min(max(seconds / per_trip, trips), 5e7))


def _leave_after_sending(node: NodeProcess, key: str, body: bytes, stay: float) -> None:
    """Send a whole inference request on a raw connection, wait ``stay`` seconds without
    reading the answer, and close the connection."""
    host, port = "127.0.0.1", int(node.url.rsplit(":", 1)[1])
    head = (
        f"POST /v2/models/looper/infer HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, port), timeout=10) as conn:
        conn.sendall(head + body)
        time.sleep(stay)


def test_a_queued_request_whose_client_left_is_dropped_without_running(
    node: NodeProcess,
) -> None:
    key = node.create_tenant_key("shop")
    long_trips = _trips_for(node, key, 3.0)  # ample: the test needs 0.8 s of it
    outcomes_before, rows_before = _counters(node)

    answers: dict[str, httpx.Response] = {}

    def send(name: str, trips: float) -> None:
        answers[name] = _infer(node, key, trips)

    running = threading.Thread(target=send, args=("running", long_trips))
    running.start()
    time.sleep(0.3)  # the long request holds the device; the two below wait behind it
    staying = threading.Thread(target=send, args=("staying", 2.0))
    staying.start()
    # first in line is the staying request: the dispatcher may already have granted it to run
    # next (lookahead), while the one sent below is certainly still queued when its client
    # leaves
    time.sleep(0.2)
    _leave_after_sending(node, key, _body(3.0), stay=0.3)
    running.join(60)
    staying.join(60)

    assert answers["running"].status_code == 200, answers["running"].text
    assert answers["staying"].status_code == 200, answers["staying"].text
    [out] = orjson.loads(answers["staying"].content)["outputs"]
    assert out["data"] == [4.0] * 4  # 2 + 2 iterations: it ran, after the client that left

    deadline = time.monotonic() + 10
    while True:
        outcomes, rows = _counters(node)
        if outcomes.get("ok", 0) - outcomes_before.get("ok", 0) >= 2:
            break
        assert time.monotonic() < deadline, outcomes
        time.sleep(0.05)
    # the request whose client left was counted as such, and never reached the device
    assert outcomes.get("client_closed", 0) - outcomes_before.get("client_closed", 0) == 1
    assert outcomes["ok"] - outcomes_before.get("ok", 0) == 2
    assert rows - rows_before == 2  # the long request's row and the staying one's

    # the node serves on
    assert _infer(node, key, 1.0).status_code == 200


def test_a_client_that_leaves_while_its_request_runs_does_not_harm_the_node(
    node: NodeProcess,
) -> None:
    """Once on the device a request runs to its end; its answer goes nowhere."""
    key = node.create_tenant_key("shop")
    trips = _trips_for(node, key, 0.6)
    outcomes_before, rows_before = _counters(node)
    _leave_after_sending(node, key, _body(trips), stay=0.2)
    deadline = time.monotonic() + 30
    while True:
        outcomes, rows = _counters(node)
        if rows - rows_before >= 1:
            break
        assert time.monotonic() < deadline, (outcomes, rows)
        time.sleep(0.05)
    assert outcomes.get("client_closed", 0) == outcomes_before.get("client_closed", 0)
    response = _infer(node, key, 1.0)
    assert response.status_code == 200
    [out] = orjson.loads(response.content)["outputs"]
    assert out["data"] == [2.0] * 4


@contextlib.contextmanager
def _node_of_its_own(root: Path) -> Iterator[tuple[NodeProcess, str]]:
    """A node serving the looper for one test that stops or kills it, and a key of its
    tenant."""
    (root / "looper.onnx").write_bytes(looper_model())
    config = root / "node.yaml"
    config.write_text(NODE_CONFIG)
    with NodeProcess(state_dir=root / "state", config=config, demo=False) as proc:
        proc.apply_as_admin(MANIFEST.replace("LOOPER", str(root / "looper.onnx")))
        _wait_ready(proc)
        yield proc, proc.create_tenant_key("shop")


def test_requests_still_queued_when_the_node_stops_get_a_503_not_a_500(
    tmp_path: Path,
) -> None:
    """SIGTERM with more queued than can run in the server's graceful time: what runs is
    answered, what is still queued after the node's grace gets 503 with its reason; none
    gets the bare 500 of a request cancelled by the server."""
    with _node_of_its_own(tmp_path) as (proc, key):
        trips = _trips_for(proc, key, 2.0)  # 12 such requests queue far past 10 s
        answers: list[httpx.Response] = []

        def send() -> None:
            answers.append(_infer(proc, key, trips))

        senders = [threading.Thread(target=send) for _ in range(12)]
        for sender in senders:
            sender.start()
        time.sleep(0.5)
        assert proc.process is not None
        proc.process.send_signal(signal.SIGTERM)
        for sender in senders:
            sender.join(60)
        assert proc.process.wait(30) is not None
    statuses = sorted(a.status_code for a in answers)
    # what ran is answered (200, or 503 if it still ran after 9.5 s on a loaded machine)
    assert len(statuses) == 12 and set(statuses) <= {200, 503}, statuses
    assert 503 in statuses, statuses
    for answer in answers:
        if answer.status_code == 503:
            assert "the node is stopping" in answer.json()["error"], answer.text


def test_a_worker_mid_batch_dies_with_its_killed_node(tmp_path: Path) -> None:
    """SIGKILL the node while its worker runs a long batch: the worker goes too (the kernel
    kills it), not once its batch is over."""
    with _node_of_its_own(tmp_path) as (proc, key):
        [item] = httpx.get(
            f"{proc.url}/api/v1/slices", headers=proc.auth(proc.admin_key), timeout=30
        ).json()["items"]
        worker = int(item["pid"])
        trips = _trips_for(proc, key, 30.0)
        sender = threading.Thread(target=lambda: _infer_ignoring_errors(proc, key, trips))
        sender.start()
        time.sleep(1.0)  # the batch runs
        proc.stop(signal.SIGKILL)
        sender.join(30)
    deadline = time.monotonic() + 5
    while _alive(worker):
        assert time.monotonic() < deadline, f"worker {worker} outlived its node"
        time.sleep(0.05)


def _infer_ignoring_errors(node: NodeProcess, key: str, trips: float) -> None:
    with contextlib.suppress(httpx.HTTPError):
        _infer(node, key, trips)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (its parent, the test's node, has not reaped it yet) has exited too
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    return False
