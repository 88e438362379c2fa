"""Key management on a real node, through the API and the CLI: revoking is idempotent (and
recorded once), `keys create` errors say what to type, and every refused creation is on record
with what it asked for."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from gpuvisor.cli import app
from gpuvisor.launch import NodeProcess

runner = CliRunner()


def _key_id(secret: str) -> str:
    return "gvk_" + secret.split("_")[1]


def _records(node: NodeProcess, **params: Any) -> list[dict[str, Any]]:
    answer = httpx.get(
        f"{node.url}/api/v1/audit",
        headers=node.auth(node.admin_key),
        params={"limit": 1000, **params},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    items: list[dict[str, Any]] = answer.json()["items"]
    return items


def _by_request(node: NodeProcess, request_id: str) -> dict[str, Any]:
    (record,) = [r for r in _records(node) if r["request_id"] == request_id]
    return record


@pytest.fixture(scope="module")
def keys(demo_node: NodeProcess) -> Iterator[dict[str, str]]:
    """An operator key, a tenant key, and a revoked admin key, by who holds them."""
    admin = demo_node.auth(demo_node.admin_key)
    made = {}
    for role in ("operator", "admin"):
        created = httpx.post(
            f"{demo_node.url}/api/v1/keys", headers=admin, json={"role": role}, timeout=30
        )
        assert created.status_code == 201, created.text
        made[role] = created.json()["key"]
    revoked = httpx.delete(
        f"{demo_node.url}/api/v1/keys/{_key_id(made['admin'])}", headers=admin, timeout=30
    )
    assert revoked.status_code == 200, revoked.text
    yield {
        "operator": made["operator"],
        "tenant": demo_node.tenant_key("support"),
        "revoked": made["admin"],
    }
    httpx.delete(
        f"{demo_node.url}/api/v1/keys/{_key_id(made['operator'])}", headers=admin, timeout=30
    )


def test_revoking_a_revoked_key_says_since_when_and_records_no_second_revocation(
    demo_node: NodeProcess, env: dict[str, str]
) -> None:
    url, admin = demo_node.url, demo_node.auth(demo_node.admin_key)
    key_id = _key_id(demo_node.create_tenant_key("support", "revoked twice"))

    answers = []
    for attempt in (1, 2):
        answer = httpx.delete(
            f"{url}/api/v1/keys/{key_id}",
            headers={**admin, "X-Request-ID": f"req-revoke-{attempt}"},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        answers.append(answer.json())
    listed = httpx.get(f"{url}/api/v1/keys", headers=admin, params={"tenant": "support"})
    (info,) = [k for k in listed.json()["items"] if k["id"] == key_id]
    revoked_at = info["revoked_at"]
    assert revoked_at is not None
    assert answers == [
        {"revoked": key_id},
        {"revoked": key_id, "already_revoked_at": revoked_at},
    ]

    again = runner.invoke(app, ["keys", "revoke", key_id], env=env)
    assert again.exit_code == 0, again.output
    since = f"{revoked_at[:19]}Z"
    assert again.output.strip() == f"key {key_id} was already revoked at {since}"

    records = [r for r in _records(demo_node, action="key.revoke") if r["object_name"] == key_id]
    assert [(r["result"], r["tenant"], r["reason"]) for r in records] == [
        ("ok", "support", "revoked"),
        ("ok", "support", f"unchanged: already revoked at {since}"),
        ("ok", "support", f"unchanged: already revoked at {since}"),
    ]
    assert records[0]["request_id"] == "req-revoke-1"
    assert records[1]["request_id"] == "req-revoke-2"
    # the key stays refused, from its first revocation on
    key = httpx.get(f"{url}/api/v1/keys", headers=admin).json()["items"]
    assert [k["revoked_at"] for k in key if k["id"] == key_id] == [revoked_at]


def test_the_cli_names_a_revoked_key_by_its_id_never_its_secret(
    demo_node: NodeProcess, env: dict[str, str]
) -> None:
    secret = demo_node.create_tenant_key("support", "pasted whole")
    revoked = runner.invoke(app, ["keys", "revoke", secret], env=env)
    assert revoked.exit_code == 0, revoked.output
    assert revoked.output.strip() == f"{_key_id(secret)} revoked"
    assert secret.split("_", 2)[2] not in revoked.output  # gvk_<id>_<secret, may hold _>


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--tenant", "suport"],
            "error: tenant 'suport' does not exist: did you mean 'support'? "
            "(a new tenant needs a Tenant applied first)",
        ),
        (
            ["--tenant", "zz-nothing-like-it"],
            "error: tenant 'zz-nothing-like-it' does not exist: apply a Tenant first",
        ),
        (
            ["--role", "operator", "--expires-in", "30d"],
            "error: expiresIn (--expires-in) '30d' is not a duration: give hours, minutes or "
            "seconds, like '720h' for 30 days (units h, m, s, ms, us, ns)",
        ),
        (
            ["--role", "operator", "--expires-in", "0s"],
            "error: expiresIn (--expires-in) '0s' is no lifetime: give one longer than 0",
        ),
    ],
    ids=["misspelt tenant", "unknown tenant", "days", "zero"],
)
def test_keys_create_errors_say_what_to_type(
    demo_node: NodeProcess, env: dict[str, str], args: list[str], message: str
) -> None:
    before = len(_records(demo_node, action="key.create", result="failed"))
    refused = runner.invoke(app, ["keys", "create", *args], env=env)
    assert refused.exit_code == 1, refused.output
    assert " ".join(refused.output.split()) == message
    failed = _records(demo_node, action="key.create", result="failed")
    assert len(failed) == before + 1
    assert failed[-1]["reason"] == "400 " + message.removeprefix("error: ")


# who asks, for what, the answer's status, and what the record of the refusal says
REFUSALS = [
    ("operator", {"role": "admin"}, 403, "key.create", "", "this asked for an admin key"),
    ("tenant", {"tenant": "retail"}, 403, "key.create", "retail", "a tenant key of 'retail'"),
    # refused for the key's role before the body is read for what it means
    ("operator", {"role": "superuser"}, 403, "key.create", "", "may not create API keys"),
    ("operator", {"expiresIn": 5}, 403, "key.create", "", "may not create API keys"),
    ("revoked", {"role": "superuser"}, 401, "authenticate", "", "was revoked"),
    ("nobody", {"role": "superuser"}, 401, "authenticate", "", "no API key"),
]


@pytest.mark.parametrize(
    ("holder", "body", "status", "action", "tenant", "reason"),
    REFUSALS,
    ids=[f"{r[0]} asks for {r[1]}" for r in REFUSALS],
)
def test_a_refused_key_creation_is_recorded_whatever_the_body(
    demo_node: NodeProcess,
    keys: dict[str, str],
    holder: str,
    body: dict[str, Any],
    status: int,
    action: str,
    tenant: str,
    reason: str,
) -> None:
    request_id = f"req-refused-{holder}-{sorted(body.items())}"
    headers = demo_node.auth(keys[holder]) if holder in keys else {}
    answer = httpx.post(
        f"{demo_node.url}/api/v1/keys",
        headers={**headers, "X-Request-ID": request_id},
        json=body,
        timeout=30,
    )
    assert answer.status_code == status, answer.text
    record = _by_request(demo_node, request_id)
    assert (record["action"], record["result"], record["tenant"]) == (action, "denied", tenant)
    assert record["reason"].startswith(f"{status} ") and reason in record["reason"]
    if holder in ("operator", "tenant"):
        assert record["actor"] == _key_id(keys[holder]).removeprefix("gvk_")
        assert (record["object_kind"], record["object_name"]) == ("ApiKey", "")
    assert answer.json()["error"] == record["reason"].removeprefix(f"{status} ")


def test_the_cli_refusal_of_an_admin_key_to_an_operator_is_on_record(
    demo_node: NodeProcess, env: dict[str, str], keys: dict[str, str]
) -> None:
    operator = keys["operator"]
    refused = runner.invoke(app, ["keys", "create", "--role", "admin", "--key", operator], env=env)
    assert refused.exit_code == 1, refused.output
    assert " ".join(refused.output.split()) == (
        "error: an operator key may not create API keys (this asked for an admin key): it "
        "needs an admin key (the node writes its first one to admin.key in its state directory)"
    )
    record = _records(demo_node, actor=_key_id(operator), action="key.create")[-1]
    assert (record["role"], record["result"]) == ("operator", "denied")
    assert "this asked for an admin key" in record["reason"]
