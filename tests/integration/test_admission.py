"""Admission on a running node: over-rate requests get 429 with Retry-After, infeasible
deadlines are refused before they queue, and the other tenants do not notice."""

from __future__ import annotations

import statistics
import threading
import time

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpuvisor.demo.models import sample_inputs
from gpuvisor.launch import NodeProcess
from gpuvisor.runtime.tensors import json_infer_request


def _json_body(model: str, parameters: dict[str, object] | None = None) -> bytes:
    return json_infer_request(sample_inputs(model), parameters)


def _batches_run(node: NodeProcess, deployment: str) -> float:
    """How many batches of ``deployment`` have run on a device (from /metrics)."""
    text = httpx.get(node.url + "/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "gpuvisor_batch_size":
            for sample in family.samples:
                if sample.name.endswith("_count") and sample.labels["deployment"] == deployment:
                    total += sample.value
    return total


def _latencies(node: NodeProcess, tenant: str, model: str, count: int) -> list[float]:
    headers = node.auth(node.tenant_key(tenant))
    body = _json_body(model)
    seconds = []
    with httpx.Client(base_url=node.url, headers=headers, timeout=30) as http:
        for _ in range(count):
            started = time.perf_counter()
            response = http.post(f"/v2/models/{model}/infer", content=body)
            assert response.status_code == 200, response.text
            seconds.append(time.perf_counter() - started)
    return seconds


def test_over_rate_requests_get_429_and_others_are_unaffected(demo_node: NodeProcess) -> None:
    admin = demo_node.auth(demo_node.admin_key)
    limited = (
        "apiVersion: gpuvisor/v1\nkind: Tenant\nmetadata: {name: analytics}\n"
        "spec: {weight: 1, quota: {memory: 4Gi, deployments: 5, requestsPerSecond: 5}}\n"
    )
    applied = httpx.post(demo_node.url + "/api/v1/apply", headers=admin, content=limited)
    assert applied.status_code == 200, applied.text

    alone = _latencies(demo_node, "support", "intent-router", 40)
    during: list[float] = []
    support = threading.Thread(
        target=lambda: during.extend(_latencies(demo_node, "support", "intent-router", 40))
    )
    analytics = demo_node.auth(demo_node.tenant_key("analytics"))
    body = _json_body("basket-scorer")
    statuses: list[int] = []
    retry_after: list[str] = []
    support.start()
    with httpx.Client(base_url=demo_node.url, headers=analytics, timeout=30) as http:
        started = time.monotonic()
        while time.monotonic() - started < 1.0:
            response = http.post("/v2/models/basket-scorer/infer", content=body)
            statuses.append(response.status_code)
            if response.status_code == 429:
                retry_after.append(response.headers["retry-after"])
                error = response.json()
                assert error["code"] == "too_many_requests" and error["reason"] == "rate_limit"
                assert "requestsPerSecond" in error["error"]
    support.join()

    ok, refused = statuses.count(200), statuses.count(429)
    assert set(statuses) <= {200, 429}
    # a burst of 5, then 5 per second, over about one second
    assert 5 <= ok <= 12 and refused > ok, statuses
    assert all(int(value) >= 1 for value in retry_after)
    assert len(during) == 40, "every request of the other tenant succeeded"
    assert statistics.median(during) <= 3 * statistics.median(alone) + 0.005


def test_an_infeasible_deadline_is_refused_before_it_queues(demo_node: NodeProcess) -> None:
    retail = demo_node.auth(demo_node.tenant_key("retail"))
    body = _json_body("shelf-classifier", {"timeout": 1})  # one microsecond
    batches_before = _batches_run(demo_node, "shelf-detector")
    with httpx.Client(base_url=demo_node.url, headers=retail, timeout=30) as http:
        for _ in range(20):
            response = http.post("/v2/models/shelf-detector/infer", content=body)
            assert response.status_code == 503, response.text
            error = response.json()
            assert error["code"] == "deadline_exceeded"
            assert error["reason"] == "deadline_infeasible"
            # the model alone takes longer than a microsecond: no retry can make it
            assert "deadline of 0.001 ms: the model alone takes" in error["error"], error
            assert "retry-after" not in response.headers
        fine = http.post("/v2/models/shelf-detector/infer", content=_json_body("shelf-classifier"))
        assert fine.status_code == 200, "requests without the impossible deadline still run"
    # the 20 refused requests never reached the device: only the one that ran did
    assert _batches_run(demo_node, "shelf-detector") - batches_before == 1


@pytest.mark.parametrize(
    ("parameters", "fragment"),
    [
        ({"priority": -1}, "'priority'"),
        ({"priority": "high"}, "'priority'"),
        ({"timeout": -1}, "'timeout'"),
        ({"timeout": "soon"}, "'timeout'"),
    ],
)
def test_bad_scheduling_parameters_are_a_clear_400(
    demo_node: NodeProcess, parameters: dict[str, object], fragment: str
) -> None:
    retail = demo_node.auth(demo_node.tenant_key("retail"))
    response = httpx.post(
        demo_node.url + "/v2/models/shelf-detector/infer",
        headers=retail,
        content=_json_body("shelf-classifier", parameters),
        timeout=30,
    )
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]


def test_priority_and_timeout_are_accepted(demo_node: NodeProcess) -> None:
    retail = demo_node.auth(demo_node.tenant_key("retail"))
    response = httpx.post(
        demo_node.url + "/v2/models/shelf-detector/infer",
        headers=retail,
        content=_json_body("shelf-classifier", {"priority": 1, "timeout": 5_000_000}),
        timeout=30,
    )
    assert response.status_code == 200, response.text
    # 0 is no timeout, as in Triton (tritonclient sends it as given)
    no_timeout = httpx.post(
        demo_node.url + "/v2/models/shelf-detector/infer",
        headers=retail,
        content=_json_body("shelf-classifier", {"timeout": 0}),
        timeout=30,
    )
    assert no_timeout.status_code == 200, no_timeout.text


def test_a_shape_among_the_parameters_does_not_count_as_rows(demo_node: NodeProcess) -> None:
    # The node counts rows from the first input's shape only: a "shape" elsewhere in the
    # request (here a request parameter) makes a 1-row request look no larger, so it is not
    # refused for a deadline it can meet.
    retail = demo_node.auth(demo_node.tenant_key("retail"))
    request = orjson.loads(_json_body("shelf-classifier"))
    parameters = {"shape": [10**15], "timeout": 10_000_000}
    body = orjson.dumps({"parameters": parameters, "inputs": request["inputs"]})
    response = httpx.post(
        demo_node.url + "/v2/models/shelf-detector/infer", headers=retail, content=body, timeout=30
    )
    assert response.status_code == 200, response.text
    assert response.json()["outputs"]


def test_a_request_refused_for_its_deadline_does_not_use_the_tenants_rate(
    demo_node: NodeProcess,
) -> None:
    admin = demo_node.auth(demo_node.admin_key)
    limited = (
        "apiVersion: gpuvisor/v1\nkind: Tenant\nmetadata: {name: analytics}\n"
        "spec: {weight: 1, quota: {memory: 4Gi, deployments: 5, requestsPerSecond: 2}}\n"
    )
    applied = httpx.post(demo_node.url + "/api/v1/apply", headers=admin, content=limited)
    assert applied.status_code == 200, applied.text
    analytics = demo_node.auth(demo_node.tenant_key("analytics"))
    impossible = _json_body("basket-scorer", {"timeout": 1})  # one microsecond
    with httpx.Client(base_url=demo_node.url, headers=analytics, timeout=30) as http:
        refused = [
            http.post("/v2/models/basket-scorer/infer", content=impossible) for _ in range(8)
        ]
        # all refused for the deadline, none for the rate: they never queued
        assert [r.json()["reason"] for r in refused] == ["deadline_infeasible"] * 8
        # so the tenant's burst of 2 is still there for requests that do queue
        fine = [
            http.post("/v2/models/basket-scorer/infer", content=_json_body("basket-scorer"))
            for _ in range(2)
        ]
        assert [r.status_code for r in fine] == [200, 200], [r.text for r in fine]
