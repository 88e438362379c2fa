"""Writes to the admin API refused for their body or parameters, on a real node: from a key
that may make the write, each answers a 400 that says what was wrong, and is on record under
that key and the route's action; from a key that may not (a tenant key creating keys or
cordoning), a 403 whatever the body, on record as the refused action; without a valid key it
is answered (and recorded) as the missing key it is; the node serves on."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from gpuvisor.launch import NodeProcess


@pytest.fixture(scope="module")
def keys(demo_node: NodeProcess) -> Iterator[dict[str, str]]:
    """The keys that send the refused writes, by who holds them."""
    admin = demo_node.auth(demo_node.admin_key)
    created = httpx.post(
        f"{demo_node.url}/api/v1/keys", headers=admin, json={"role": "operator"}, timeout=30
    )
    assert created.status_code == 201, created.text
    operator = created.json()["key"]
    yield {
        "admin": demo_node.admin_key,
        "operator": operator,
        "tenant": demo_node.tenant_key("support"),
        "unknown": "gvk_nosuchid_" + "x" * 43,
    }
    httpx.delete(f"{demo_node.url}/api/v1/keys/gvk_{_id(operator)}", headers=admin, timeout=30)


def _id(secret: str) -> str:
    return secret.split("_")[1]


def _records(node: NodeProcess) -> list[dict[str, Any]]:
    answer = httpx.get(
        f"{node.url}/api/v1/audit",
        headers=node.auth(node.admin_key),
        params={"limit": 1000},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    items: list[dict[str, Any]] = answer.json()["items"]
    return items


def _post(
    node: NodeProcess, path: str, key: str | None, body: dict[str, Any], request_id: str = ""
) -> httpx.Response:
    """POST ``body`` (httpx's arguments, ``headers`` among them) to ``path`` with ``key``."""
    sent = dict(body)
    headers = {**(node.auth(key) if key else {}), **sent.pop("headers", {})}
    if request_id:
        headers["X-Request-ID"] = request_id
    return httpx.post(f"{node.url}{path}", headers=headers, timeout=30, **sent)


@dataclass(frozen=True)
class Refused:
    """A write sent by ``holder`` with something wrong in it, and what its record says."""

    label: str
    holder: str
    path: str
    body: dict[str, Any]
    error: str
    action: str

    @property
    def request_id(self) -> str:
        return f"req-invalid-{self.label.replace(' ', '-')}"

    @property
    def status(self) -> int:
        """401 where no valid key was sent, 403 from a tenant key (which may neither create keys
        nor cordon): then the key is what is wrong, whatever the body."""
        return {"admin": 400, "operator": 400, "tenant": 403}.get(self.holder, 401)


NOT_JSON = {"content": b'{"role": "operator",', "headers": {"Content-Type": "application/json"}}
KEYS = "/api/v1/keys"
CORDON = "/api/v1/devices/cpu-0/cordon"
DRAIN = "/api/v1/devices/cpu-0/drain?timeout=-1"
FORBIDDEN_KEYS = "may not create API keys (this asked for a key)"
FORBIDDEN_CORDON = "a tenant key may not cordon or drain devices"
BAD_REASON = {"json": {"reason": 5}}
REFUSED = [
    Refused("admin key, not JSON", "admin", KEYS, NOT_JSON, "not valid JSON", "key.create"),
    Refused("admin, bad role", "admin", KEYS, {"json": {"role": "boss"}}, "role: ", "key.create"),
    Refused("tenant key, not JSON", "tenant", KEYS, NOT_JSON, FORBIDDEN_KEYS, "key.create"),
    Refused("cordon, not JSON", "operator", CORDON, NOT_JSON, "not valid JSON", "device.cordon"),
    Refused("cordon, bad reason", "operator", CORDON, BAD_REASON, "reason: ", "device.cordon"),
    Refused("admin cordon, bad reason", "admin", CORDON, BAD_REASON, "reason: ", "device.cordon"),
    Refused(
        "tenant cordon, not JSON", "tenant", CORDON, NOT_JSON, FORBIDDEN_CORDON, "device.cordon"
    ),
    Refused(
        "tenant cordon, bad reason", "tenant", CORDON, BAD_REASON, FORBIDDEN_CORDON, "device.cordon"
    ),
    Refused("drain, bad timeout", "operator", DRAIN, {}, "timeout: ", "device.cordon"),
    Refused(
        "tenant drain, not JSON, bad timeout",
        "tenant",
        DRAIN,
        NOT_JSON,
        FORBIDDEN_CORDON,
        "device.cordon",
    ),
    Refused("no key, not JSON", "nobody", KEYS, NOT_JSON, "no API key", "authenticate"),
    Refused(
        "unknown key, not JSON", "unknown", CORDON, NOT_JSON, "unknown API key", "authenticate"
    ),
]


@pytest.mark.parametrize("refused", REFUSED, ids=[r.label for r in REFUSED])
def test_a_write_refused_for_its_input_is_on_record_with_who_sent_it(
    demo_node: NodeProcess, keys: dict[str, str], refused: Refused
) -> None:
    answer = _post(
        demo_node, refused.path, keys.get(refused.holder), refused.body, refused.request_id
    )

    assert answer.status_code == refused.status, answer.text
    error = answer.json()["error"]
    assert refused.error in error
    (record,) = [r for r in _records(demo_node) if r["request_id"] == refused.request_id]
    result = "failed" if refused.status == 400 else "denied"
    assert (record["action"], record["result"]) == (refused.action, result)
    assert record["reason"] == f"{refused.status} {error}"
    named = {
        "key.create": ("ApiKey", ""),
        "device.cordon": ("Device", "cpu-0"),
        "authenticate": ("endpoint", f"POST {refused.path.partition('?')[0]}"),
    }[refused.action]
    assert (record["object_kind"], record["object_name"]) == named
    if refused.status != 401:  # who sent it: the key's id, role and tenant
        tenant = "support" if refused.holder == "tenant" else ""
        who = (_id(keys[refused.holder]), refused.holder, tenant)
        assert (record["actor"], record["role"], record["tenant"]) == who
    else:
        assert (record["actor"], record["role"]) == ("", "")


def test_json_that_does_not_parse_is_answered_with_what_to_send(demo_node: NodeProcess) -> None:
    answer = _post(demo_node, KEYS, demo_node.admin_key, NOT_JSON)
    assert answer.status_code == 400
    assert answer.json() == {
        "error": "invalid request: the body is not valid JSON (Expecting property name "
        f"enclosed in double quotes at character {len(NOT_JSON['content'])}): send a JSON object",
        "code": "invalid_request",
    }


def test_a_read_refused_for_its_parameters_is_not_recorded(demo_node: NodeProcess) -> None:
    answer = httpx.get(
        f"{demo_node.url}/api/v1/audit",
        headers={**demo_node.auth(demo_node.admin_key), "X-Request-ID": "req-invalid-read"},
        params={"limit": 0},
        timeout=30,
    )
    assert answer.status_code == 400
    assert "limit" in answer.json()["error"]
    assert [r for r in _records(demo_node) if r["request_id"] == "req-invalid-read"] == []


def test_a_refusal_reason_is_kept_to_a_readable_length(demo_node: NodeProcess) -> None:
    device = "d" * 3000
    answer = httpx.post(
        f"{demo_node.url}/api/v1/devices/{device}/cordon",
        headers={**demo_node.auth(demo_node.admin_key), "X-Request-ID": "req-long-reason"},
        timeout=30,
    )
    assert answer.status_code == 404
    (record,) = [r for r in _records(demo_node) if r["request_id"] == "req-long-reason"]
    assert len(record["reason"]) <= 1000
    assert record["reason"].startswith("404 device 'ddd") and record["reason"].endswith("…")


def test_the_node_serves_on_after_refused_writes(
    demo_node: NodeProcess, keys: dict[str, str]
) -> None:
    admin = demo_node.auth(keys["admin"])
    refused = _post(demo_node, CORDON, keys["admin"], NOT_JSON)
    assert refused.status_code == 400
    assert httpx.get(f"{demo_node.url}/v2/health/ready", timeout=30).status_code == 200
    status = httpx.get(f"{demo_node.url}/api/v1/status", headers=admin, timeout=30)
    assert status.status_code == 200 and status.json()["ready"] is True
    devices = httpx.get(f"{demo_node.url}/api/v1/devices", headers=admin, timeout=30).json()
    assert [d["cordoned"] for d in devices["items"] if d["id"] == "cpu-0"] == [False]
    created = httpx.post(
        f"{demo_node.url}{KEYS}",
        headers=admin,
        json={"role": "tenant", "tenant": "support", "description": "after refusals"},
        timeout=30,
    )
    assert created.status_code == 201, created.text
    revoked = httpx.delete(
        f"{demo_node.url}{KEYS}/gvk_{_id(created.json()['key'])}", headers=admin, timeout=30
    )
    assert revoked.status_code == 200, revoked.text
