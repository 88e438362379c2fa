"""Bad input gets a clear 4xx and loses nothing: the node and its workers keep serving."""

from __future__ import annotations

import gzip
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from gpuvisor.launch import NodeProcess

NODE_CONFIG = """
apiVersion: gpuvisor/v1
kind: Node
metadata: {name: test-node}
spec:
  limits: {maxBodySize: 1Mi}
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    state = tmp_path_factory.mktemp("bad-input")
    config = Path(state) / "node.yaml"
    config.write_text(NODE_CONFIG)
    proc = NodeProcess(state_dir=state / "state", config=config, demo=True)
    proc.start(timeout=120)
    try:
        yield proc
    finally:
        proc.stop()


def _features(
    shape: list[int],
    datatype: str = "FP32",
    data: list[float] | None = None,
    name: str = "features",
) -> bytes:
    count = int(np.prod(shape))
    return orjson.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "shape": shape,
                    "datatype": datatype,
                    "data": data if data is not None else [0.5] * count,
                }
            ]
        }
    )


def _binary(header: dict[str, object], payload: bytes) -> tuple[bytes, dict[str, str]]:
    head = orjson.dumps(header)
    return head + payload, {"Inference-Header-Content-Length": str(len(head))}


GOOD = _features([1, 16])
TRUNCATED, TRUNCATED_HEADERS = _binary(
    {
        "inputs": [
            {
                "name": "features",
                "shape": [1, 16],
                "datatype": "FP32",
                "parameters": {"binary_data_size": 64},
            }
        ]
    },
    struct.pack("<8f", *([0.5] * 8)),  # 32 of the announced 64 bytes
)
GZIP, DEFLATE = {"Content-Encoding": "gzip"}, {"Content-Encoding": "deflate"}
GZIPPED = gzip.compress(GOOD)

# (case, path, body, extra headers, expected status, words the message must contain)
CASES = [
    ("wrong shape", "basket-scorer", _features([1, 15]), {}, 400, ["shape"]),
    (
        "data does not fill the shape",
        "basket-scorer",
        _features([1, 16], data=[1.0] * 10),
        {},
        400,
        ["16"],
    ),
    ("wrong dtype", "basket-scorer", _features([1, 16], "FP64"), {}, 400, ["FP64", "FP32"]),
    ("missing input", "basket-scorer", orjson.dumps({"inputs": []}), {}, 400, ["features"]),
    (
        "unknown input name",
        "basket-scorer",
        _features([1, 16], name="featurez"),
        {},
        400,
        ["featurez"],
    ),
    ("truncated binary body", "basket-scorer", TRUNCATED, TRUNCATED_HEADERS, 400, ["64"]),
    (
        "header length beyond the body",
        "basket-scorer",
        GOOD,
        {"Inference-Header-Content-Length": "999999"},
        400,
        ["Inference-Header-Content-Length"],
    ),
    ("invalid JSON", "basket-scorer", b'{"inputs": [', {}, 400, ["JSON"]),
    ("not an object", "basket-scorer", b"[1, 2, 3]", {}, 400, []),
    (
        "unknown requested output",
        "basket-scorer",
        orjson.dumps({**orjson.loads(GOOD), "outputs": [{"name": "nope"}]}),
        {},
        400,
        ["nope"],
    ),
    (
        "a sign in the header length",
        "basket-scorer",
        GOOD,
        {"Inference-Header-Content-Length": "+5"},
        400,
        ["invalid Inference-Header-Content-Length header '+5'"],
    ),
    ("empty body", "basket-scorer", b"", {}, 400, ["request body is empty"]),
    (
        "binary data without its header length",
        "basket-scorer",
        TRUNCATED,
        {},
        400,
        ["not valid JSON", "needs the Inference-Header-Content-Length header"],
    ),
    (
        "more rows than maxBatchSize",
        "basket-scorer",
        _features([33, 16]),  # the demo's basket-scorer runs at most 32 rows in a batch
        {},
        400,
        ["33 rows", "32", "maxBatchSize"],
    ),
    (
        "gzip cut short",
        "basket-scorer",
        GZIPPED[:-8],  # without its CRC and length
        GZIP,
        400,
        ["not valid gzip data", "ends before its compressed stream does"],
    ),
    ("gzip then other bytes", "basket-scorer", GZIPPED + b"junk", GZIP, 400, ["not valid gzip"]),
    (
        "deflate cut short",
        "basket-scorer",
        zlib.compress(GOOD)[:-4],  # without its checksum
        DEFLATE,
        400,
        ["not valid deflate data", "ends before"],
    ),
    (
        "deflate then other bytes",
        "basket-scorer",
        zlib.compress(GOOD) + b"xy",
        DEFLATE,
        400,
        ["2 bytes follow the end of its stream"],
    ),
    (
        "unsupported encoding",
        "basket-scorer",
        GOOD,
        {"Content-Encoding": "br"},
        400,
        ["unsupported Content-Encoding 'br'"],
    ),
    (
        "JSON nested too deeply",
        "basket-scorer",
        b'{"inputs":[{"name":"features","shape":[1,16],"datatype":"FP32","data":'
        + b"[" * 5000
        + b"]" * 5000
        + b"}]}",
        {},
        400,
        ["nests arrays or objects too deeply"],
    ),
    ("unknown model", "no-such-model", GOOD, {}, 404, ["no-such-model"]),
    ("unknown version", "basket-scorer/versions/7", GOOD, {}, 404, ["7"]),
]


@pytest.mark.parametrize(
    ("case", "model", "body", "headers", "status", "words"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_request_gets_clear_error_and_node_keeps_serving(
    node: NodeProcess,
    case: str,
    model: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    words: list[str],
) -> None:
    auth = node.auth(node.tenant_key("analytics"))
    response = httpx.post(
        f"{node.url}/v2/models/{model}/infer", content=body, headers={**auth, **headers}, timeout=30
    )
    assert response.status_code == status, response.text
    message = response.json()["error"]
    for word in words:
        assert word in message, f"{case}: {message!r} should mention {word!r}"
    # every error carries its code, whether the node or the model's worker refused it
    expected_code = {400: "invalid_request", 404: "not_found", 413: "payload_too_large"}
    if status in expected_code:
        assert response.json().get("code") == expected_code[status], response.text
    good = httpx.post(
        f"{node.url}/v2/models/basket-scorer/infer", content=GOOD, headers=auth, timeout=30
    )
    assert good.status_code == 200, "the same worker must keep serving after a bad request"
    assert len(good.json()["outputs"][0]["data"]) == 1


def test_other_methods_on_an_inference_path_are_405(node: NodeProcess) -> None:
    auth = node.auth(node.tenant_key("analytics"))
    for method in ("GET", "PUT", "DELETE"):
        response = httpx.request(
            method, f"{node.url}/v2/models/basket-scorer/infer", headers=auth, timeout=30
        )
        assert response.status_code == 405, response.text
        assert response.headers["allow"] == "POST"
        assert response.json() == {
            "error": f"{method} is not allowed on an inference path: send a POST",
            "code": "method_not_allowed",
        }


def test_other_methods_and_unknown_paths_elsewhere_say_so_with_a_code(node: NodeProcess) -> None:
    auth = node.auth(node.tenant_key("analytics"))
    wrong = httpx.delete(f"{node.url}/v2/repository/index", headers=auth, timeout=30)
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert wrong.json() == {
        "error": "method DELETE is not allowed on /v2/repository/index",
        "code": "method_not_allowed",
    }
    slash = httpx.post(f"{node.url}/v2/models/basket-scorer/infer/", headers=auth, timeout=30)
    assert (slash.status_code, slash.json()["code"]) == (404, "not_found"), slash.text
    unknown = httpx.get(f"{node.url}/v2/nothing-here", headers=auth, timeout=30)
    assert unknown.status_code == 404
    assert unknown.json() == {
        "error": "no such endpoint: GET /v2/nothing-here",
        "code": "not_found",
    }


def test_a_bytes_shape_far_beyond_its_data_is_400_and_the_worker_lives(node: NodeProcess) -> None:
    # ~100 bytes that once made the worker allocate 8 TiB and die, failing its batch-mates
    auth = node.auth(node.tenant_key("retail"))
    url = f"{node.url}/v2/models/sku-lookup/infer"

    def sku(shape: list[int]) -> tuple[bytes, dict[str, str]]:
        entry = {"name": "sku", "shape": shape, "datatype": "BYTES"}
        return _binary(
            {"inputs": [{**entry, "parameters": {"binary_data_size": 12}}]},
            struct.pack("<I", 8) + b"sku-0007",
        )

    def worker_pid() -> int:
        slices = httpx.get(f"{node.url}/api/v1/slices", headers=auth, timeout=30).json()["items"]
        (sku_slice,) = [s for s in slices if s["deployment"] == "sku-lookup"]
        return int(sku_slice["pid"])

    good, good_headers = sku([1, 1])
    assert httpx.post(url, content=good, headers={**auth, **good_headers}, timeout=30).is_success
    pid = worker_pid()
    # refused by the node for its rows (more than maxBatchSize), and by the worker for its
    # shape; the worker's own bound on BYTES elements is in test_tensors_validation
    for shape, words in (([2**40, 1], "1099511627776 rows"), ([1, 2**40], "but the model expects")):
        bad, bad_headers = sku(shape)
        response = httpx.post(url, content=bad, headers={**auth, **bad_headers}, timeout=30)
        assert response.status_code == 400, response.text
        assert words in response.json()["error"]
    response = httpx.post(url, content=good, headers={**auth, **good_headers}, timeout=30)
    assert response.status_code == 200, response.text
    assert worker_pid() == pid, "the worker must not have been restarted"


def test_a_client_that_hangs_up_mid_body_is_no_error(node: NodeProcess) -> None:
    key = node.tenant_key("analytics")
    head = (
        "POST /v2/models/basket-scorer/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {key}\r\nContent-Length: 1000\r\n\r\n"
    )
    log_path = node.state_dir / "node.log"
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as raw:
        raw.sendall(head.encode() + b'{"inputs":')  # then hang up, 990 bytes short
    deadline = time.monotonic() + 10
    while "disconnected before its request body was read" not in log_path.read_text():
        assert time.monotonic() < deadline, log_path.read_text()[-2000:]
        time.sleep(0.05)
    log = log_path.read_text()
    assert "ClientDisconnect" not in log and "Traceback" not in log, log[-3000:]
    auth = node.auth(key)
    good = httpx.post(
        f"{node.url}/v2/models/basket-scorer/infer", content=GOOD, headers=auth, timeout=30
    )
    assert good.status_code == 200


def test_compressed_bodies_are_answered_like_plain_ones(node: NodeProcess) -> None:
    """gzip (also several members, as `cat a.gz b.gz` makes) and deflate bodies; one that
    inflates beyond the body limit is 413."""
    auth = node.auth(node.tenant_key("analytics"))
    url = f"{node.url}/v2/models/basket-scorer/infer"
    plain = httpx.post(url, content=GOOD, headers=auth, timeout=30)
    assert plain.status_code == 200, plain.text
    two_members = gzip.compress(GOOD[:20]) + gzip.compress(GOOD[20:])
    x_gzip = {"Content-Encoding": "x-gzip"}  # RFC 9110: the same as gzip
    for body, headers in (
        (GZIPPED, GZIP),
        (two_members, GZIP),
        (zlib.compress(GOOD), DEFLATE),
        (GZIPPED, x_gzip),
    ):
        answer = httpx.post(url, content=body, headers={**auth, **headers}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"] == plain.json()["outputs"]
    bomb = gzip.compress(b" " * (3 << 20))  # 3 MiB of spaces in a few KiB
    answer = httpx.post(url, content=bomb, headers={**auth, **GZIP}, timeout=30)
    assert answer.status_code == 413, answer.text
    many = gzip.compress(b"") * 65 + GZIPPED
    answer = httpx.post(url, content=many, headers={**auth, **GZIP}, timeout=30)
    assert answer.status_code == 400 and "more than 64 gzip members" in answer.json()["error"]


def test_body_over_the_limit_is_413(node: NodeProcess) -> None:
    auth = node.auth(node.tenant_key("analytics"))
    big = _features([70000, 16])  # > 1 MiB of JSON
    assert len(big) > 2**20
    response = httpx.post(
        f"{node.url}/v2/models/basket-scorer/infer", content=big, headers=auth, timeout=60
    )
    assert response.status_code == 413
    assert response.json()["error"] == (
        "request body is over the limit of 1Mi (limits.maxBodySize in the node configuration)"
    )
    # manifests have their own, fixed limit, and the refusal says so (not maxBodySize)
    manifests = httpx.post(
        f"{node.url}/api/v1/apply",
        content=b"#" * (5 << 20),
        headers=node.auth(node.admin_key),
        timeout=60,
    )
    assert manifests.status_code == 413
    assert manifests.json()["error"] == (
        "request body is over the limit of 4Mi "
        "(fixed for manifests: split a larger apply into several)"
    )

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds for streamed bodies too
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    streamed = httpx.post(
        f"{node.url}/v2/models/basket-scorer/infer", content=chunks(), headers=auth, timeout=60
    )
    assert streamed.status_code == 413
    assert (
        httpx.post(
            f"{node.url}/v2/models/basket-scorer/infer", content=GOOD, headers=auth
        ).status_code
        == 200
    )


def test_bad_request_in_a_batch_does_not_fail_its_batch_mates(node: NodeProcess) -> None:
    """Good and bad requests sent together (and so batched together) each get their own answer."""
    import concurrent.futures

    auth = node.auth(node.tenant_key("analytics"))
    bodies = [GOOD if i % 2 == 0 else _features([1, 16], data=[1.0] * 3) for i in range(40)]
    with (
        httpx.Client(headers=auth, timeout=30) as client,
        concurrent.futures.ThreadPoolExecutor(8) as pool,
    ):
        statuses = list(
            pool.map(
                lambda b: (
                    client.post(f"{node.url}/v2/models/basket-scorer/infer", content=b).status_code
                ),
                bodies,
            )
        )
    assert statuses == [200 if i % 2 == 0 else 400 for i in range(40)]


def test_errors_on_admin_routes_use_the_error_shape(node: NodeProcess) -> None:
    admin = node.auth(node.admin_key)
    bad_yaml = httpx.post(f"{node.url}/api/v1/apply", headers=admin, content=b"kind: [unclosed")
    assert bad_yaml.status_code == 400 and "invalid YAML" in bad_yaml.json()["error"]
    typo = httpx.post(
        f"{node.url}/api/v1/apply",
        headers=admin,
        content=b"""
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {name: shelf-detector-2, tenant: retail}
spec: {model: shelf-classifier@3, profile: rt-smal}
""",
    )
    assert typo.status_code == 400
    assert (
        "doc 1 Deployment/shelf-detector-2: spec.profile: unknown profile 'rt-smal'"
        in typo.json()["error"]
    )
    unknown_field = httpx.post(
        f"{node.url}/api/v1/apply",
        headers=admin,
        content=b"""
apiVersion: gpuvisor/v1
kind: Profile
metadata: {name: p1}
spec: {memory: 1Gi, computeShares: 0.5}
""",
    )
    assert unknown_field.status_code == 400 and "computeShares" in unknown_field.json()["error"]
    nothing = httpx.get(f"{node.url}/v2/nowhere")
    assert nothing.status_code == 404 and "error" in nothing.json()


def test_a_host_header_naming_another_machine_is_refused_on_a_loopback_node(
    node: NodeProcess,
) -> None:
    """A web page that rebinds its own name to 127.0.0.1 reads the node as its own origin;
    the node answers only requests addressed to a loopback name."""
    port = node.url.rsplit(":", 1)[1]
    for path in ("/metrics", "/ui/", "/v2/health/ready", "/v2/models/basket-scorer/infer"):
        refused = httpx.get(
            f"{node.url}{path}", headers={"Host": f"rebind.attacker.example:{port}"}, timeout=30
        )
        assert refused.status_code == 400, (path, refused.text)
        assert "is not this node" in refused.json()["error"]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "127.0.0.1"):
        assert httpx.get(f"{node.url}/metrics", headers={"Host": host}, timeout=30).is_success


def test_no_route_reads_a_body_past_the_api_limit(node: NodeProcess) -> None:
    """A key creation or a cordon takes a few hundred bytes: a huge body, with no key at all,
    is refused before it is read (Content-Length) or once it passes the limit (chunked)."""
    huge = b"a" * (9 << 20)
    for path in ("/api/v1/keys", "/api/v1/devices/cpu-0/cordon"):
        declared = httpx.post(f"{node.url}{path}", content=huge, timeout=60)
        assert declared.status_code == 413, declared.text
        assert "over the limit of 8Mi (fixed for the node's API)" in declared.json()["error"]

        def chunks() -> Iterator[bytes]:
            for start in range(0, len(huge), 1 << 20):
                yield huge[start : start + (1 << 20)]

        streamed = httpx.post(
            f"{node.url}{path}", content=chunks(), headers=node.auth(node.admin_key), timeout=60
        )
        assert streamed.status_code == 413, streamed.text
    ui = httpx.get(f"{node.url}/ui/", timeout=30)
    assert ui.headers["X-Frame-Options"] == "DENY"
    assert ui.headers["Content-Security-Policy"] == "frame-ancestors 'none'"
