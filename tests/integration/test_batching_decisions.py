"""Which models a node merges requests for: a model whose shapes look batchable but whose
rows are not independent (a softmax over a sequence of tokens) is found out when it loads,
and its concurrent requests each get their own answer, whatever their length. A real node,
real workers, concurrent clients."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import orjson
import pytest
from onnx import TensorProto, helper

from gpuvisor.launch import NodeProcess

NODE_CONFIG = """
apiVersion: gpuvisor/v1
kind: Node
metadata: {name: batching}
spec:
  cpu: {enabled: true, memory: 2Gi, threads: 1}
"""

MANIFEST = """
apiVersion: gpuvisor/v1
kind: Tenant
metadata: {name: text}
---
apiVersion: gpuvisor/v1
kind: Profile
metadata: {name: small}
spec: {memory: 256Mi, computeShare: 0.5, isolation: shared}
---
apiVersion: gpuvisor/v1
kind: Model
metadata: {name: attention, tenant: text}
spec: {source: SEQ}
---
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {name: attention, tenant: text}
spec: {model: attention, profile: small, batching: {maxBatchSize: 8, maxQueueDelay: 50ms}}
---
apiVersion: gpuvisor/v1
kind: Model
metadata: {name: attention-declared, tenant: text}
spec: {source: SEQ, batchable: false}
---
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {name: attention-declared, tenant: text}
spec: {model: attention-declared, profile: small}
"""


def softmax_over_tokens() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["tokens"], ["weights"], axis=0)],
        "attention",
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["T"])],
        [helper.make_tensor_value_info("weights", TensorProto.FLOAT, ["T"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model.SerializeToString()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    root = tmp_path_factory.mktemp("batching")
    (root / "seq.onnx").write_bytes(softmax_over_tokens())
    config = root / "node.yaml"
    config.write_text(NODE_CONFIG)
    proc = NodeProcess(state_dir=root / "state", config=config, demo=False)
    proc.start(timeout=120)
    try:
        proc.apply_as_admin(MANIFEST.replace("SEQ", str(root / "seq.onnx")))
        deadline = time.monotonic() + 120
        while {s["state"] for s in _slices(proc)} != {"Ready"}:
            assert time.monotonic() < deadline, _slices(proc)
            time.sleep(0.05)
        yield proc
    finally:
        proc.stop()


def _slices(node: NodeProcess) -> list[dict[str, object]]:
    answer = httpx.get(f"{node.url}/api/v1/slices", headers=node.auth(node.admin_key), timeout=30)
    items: list[dict[str, object]] = answer.json()["items"]
    return items


@pytest.fixture(scope="module")
def key(node: NodeProcess) -> str:
    return node.create_tenant_key("text")


def _infer(node: NodeProcess, key: str, model: str, tokens: list[float]) -> httpx.Response:
    body = {
        "inputs": [{"name": "tokens", "shape": [len(tokens)], "datatype": "FP32", "data": tokens}]
    }
    return httpx.post(
        f"{node.url}/v2/models/{model}/infer",
        headers=node.auth(key),
        content=orjson.dumps(body),
        timeout=60,
    )


def test_the_node_says_why_it_does_not_merge_requests(node: NodeProcess) -> None:
    by_name = {s["deployment"]: s for s in _slices(node)}
    found, declared = by_name["attention"], by_name["attention-declared"]
    assert found["batchable"] is False
    assert str(found["batchingNote"]).startswith(
        "requests are not merged into batches: output 'weights' of a row changes when "
        "another row runs beside it"
    )
    assert (declared["batchable"], declared["batchingNote"]) == (False, "")
    log = (node.state_dir / "node.log").read_text()
    assert "slice text/attention/0: requests are not merged into batches" in log


@pytest.mark.parametrize("model", ["attention", "attention-declared"])
def test_concurrent_requests_each_get_their_own_answer_whatever_their_length(
    node: NodeProcess, key: str, model: str
) -> None:
    rng = np.random.default_rng(7)
    # lengths beyond maxBatchSize (8) too: a model that is not batched takes requests whole
    sequences = [rng.standard_normal(int(n)).astype(np.float32) for n in rng.integers(2, 40, 24)]
    answers: list[httpx.Response | None] = [None] * len(sequences)

    def send(i: int) -> None:
        answers[i] = _infer(node, key, model, sequences[i].tolist())

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(sequences))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for tokens, answer in zip(sequences, answers, strict=True):
        assert answer is not None and answer.status_code == 200, answer and answer.text
        expected = np.exp(tokens - tokens.max()) / np.exp(tokens - tokens.max()).sum()
        got = np.array(answer.json()["outputs"][0]["data"], dtype=np.float32)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
