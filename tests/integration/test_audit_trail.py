"""The audit log on a real node: mutations and refusals are recorded with who, what and the
request id, listed through the API and the CLI, and `gpuvisor audit verify` catches a record
changed in the database."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest
from in_process import node_in_this_process
from typer.testing import CliRunner

from gpuvisor.cli import app
from gpuvisor.launch import NodeProcess

runner = CliRunner()

PROFILE = """
apiVersion: gpuvisor/v1
kind: Profile
metadata: {name: audited-extra}
spec: {memory: 256Mi, computeShare: 0.0}
"""


def _key_id(secret: str) -> str:
    return secret.split("_")[1]


def _secret_part(key: str) -> str:
    """What follows ``gvk_<id>_``: the secret itself may hold ``_`` too."""
    return key.split("_", 2)[2]


def _audit(node: NodeProcess, key: str, **params: Any) -> list[dict[str, Any]]:
    response = httpx.get(f"{node.url}/api/v1/audit", headers=node.auth(key), params=params)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def test_mutations_and_refusals_are_recorded_and_verified(demo_node: NodeProcess) -> None:
    url, admin = demo_node.url, demo_node.admin_key
    support = demo_node.tenant_key("support")

    def admin_headers(request_id: str) -> dict[str, str]:
        return {**demo_node.auth(admin), "X-Request-ID": request_id}

    applied = httpx.post(f"{url}/api/v1/apply", headers=admin_headers("req-apply"), content=PROFILE)
    assert applied.status_code == 200, applied.text
    deleted = httpx.delete(
        f"{url}/api/v1/profiles/audited-extra", headers=admin_headers("req-delete")
    )
    assert deleted.status_code == 200, deleted.text
    wrong = httpx.get(
        f"{url}/api/v1/devices",
        headers={**demo_node.auth("gvk_nosuchid_secret"), "X-Request-ID": "req-wrong"},
    )
    assert wrong.status_code == 401
    wrong_infer = httpx.post(
        f"{url}/v2/models/shelf-detector/infer",
        headers={**demo_node.auth("gvk_nosuchid_secret"), "X-Request-ID": "req-infer"},
        content=b"{}",
    )
    assert wrong_infer.status_code == 401
    foreign = httpx.delete(
        f"{url}/api/v1/deployments/shelf-detector",
        params={"tenant": "retail"},
        headers={**demo_node.auth(support), "X-Request-ID": "req-foreign"},
    )
    assert foreign.status_code == 404
    assert httpx.get(f"{url}/api/v1/audit", headers=demo_node.auth(support)).status_code == 403
    analytics = demo_node.auth(demo_node.tenant_key("analytics"))
    for verb in ("unload", "load"):
        answer = httpx.post(
            f"{url}/v2/repository/models/basket-scorer/{verb}",
            headers={**analytics, "X-Request-ID": f"req-{verb}"},
            timeout=120,
        )
        assert answer.status_code == 200, answer.text

    by_request = {r["request_id"]: r for r in _audit(demo_node, admin)}
    apply_record = by_request["req-apply"]
    assert {k: apply_record[k] for k in ("actor", "role", "action", "result", "reason")} == {
        "actor": _key_id(admin),
        "role": "admin",
        "action": "apply",
        "result": "ok",
        "reason": "created",
    }
    assert (apply_record["object_kind"], apply_record["object_name"]) == (
        "Profile",
        "audited-extra",
    )
    delete_record = by_request["req-delete"]
    assert (delete_record["action"], delete_record["result"], delete_record["object_name"]) == (
        "delete",
        "ok",
        "audited-extra",
    )
    assert delete_record["seq"] > apply_record["seq"]
    for request_id, endpoint in (
        ("req-wrong", "GET /api/v1/devices"),
        ("req-infer", "POST /v2/models/shelf-detector/infer"),
    ):
        record = by_request[request_id]
        assert (record["action"], record["result"], record["actor"]) == (
            "authenticate",
            "denied",
            "",
        )
        assert record["object_name"] == endpoint and "unknown API key" in record["reason"]
    for verb in ("unload", "load"):
        record = by_request[f"req-{verb}"]
        assert (record["action"], record["result"], record["tenant"]) == (
            f"model.{verb}",
            "ok",
            "analytics",
        )
        assert (record["object_kind"], record["object_name"]) == ("Deployment", "basket-scorer")
    refused = by_request["req-foreign"]
    assert {k: refused[k] for k in ("actor", "role", "tenant", "action", "result")} == {
        "actor": _key_id(support),
        "role": "tenant",
        "tenant": "retail",
        "action": "delete",
        "result": "denied",
    }
    assert (refused["object_kind"], refused["object_name"]) == ("Deployment", "shelf-detector")
    assert refused["reason"].startswith("404 ")

    # Filters, and the tenant key's refused look at the log is itself on record.
    denied = _audit(demo_node, admin, result="denied", actor=f"gvk_{_key_id(support)}")
    assert [(r["action"], r["object_name"]) for r in denied][-2:] == [
        ("delete", "shelf-detector"),
        ("request", "GET /api/v1/audit"),
    ]
    assert [
        r["request_id"] for r in _audit(demo_node, admin, tenant="retail", action="delete")
    ] == ["req-foreign"]
    assert len(_audit(demo_node, admin, limit=2)) == 2
    operator = httpx.post(
        f"{url}/api/v1/keys", headers=demo_node.auth(admin), json={"role": "operator"}
    ).json()["key"]
    created = _audit(demo_node, operator, action="key.create")[-1]
    assert (created["object_name"], created["reason"]) == (
        f"gvk_{_key_id(operator)}",
        "role operator",
    )

    schema = httpx.get(f"{url}/openapi.json").json()
    assert "/api/v1/audit" in schema["paths"]
    assert {p["name"] for p in schema["paths"]["/api/v1/audit"]["get"]["parameters"]} == {
        "actor",
        "tenant",
        "action",
        "result",
        "since",
        "until",
        "limit",
    }

    env = {"GPUVISOR_URL": url, "GPUVISOR_STATE": str(demo_node.state_dir), "COLUMNS": "250"}
    listed = runner.invoke(app, ["audit", "list", "--result", "denied", "--since", "1h"], env=env)
    assert listed.exit_code == 0, listed.output
    assert "Deployment/shelf-detector" in listed.output and "authenticate" in listed.output
    # what the node did on its own is told apart from a caller without a key
    first = runner.invoke(
        app, ["audit", "list", "--action", "key.create", "--limit", "1000"], env=env
    )
    bootstrap = [line for line in first.output.splitlines() if "bootstrap admin key" in line]
    assert len(bootstrap) == 1 and bootstrap[0].split()[2:4] == ["node", "node"], bootstrap
    unknown = [line for line in listed.output.splitlines() if "unknown API key" in line]
    assert unknown and all(line.split()[2:4] == ["-", "-"] for line in unknown), unknown
    # an action no record can have is a mistake, not an empty list
    bogus = runner.invoke(app, ["audit", "list", "--action", "bogus"], env=env)
    assert bogus.exit_code == 1, bogus.output
    assert "action" in bogus.output and "'device.cordon'" in bogus.output, bogus.output

    state = ["--state", str(demo_node.state_dir)]
    intact = runner.invoke(app, ["audit", "verify", *state])
    assert intact.exit_code == 0, intact.output
    assert "audit log intact" in intact.output
    with closing(sqlite3.connect(demo_node.state_dir / "gpuvisor.db")) as db, db:
        db.execute("UPDATE audit_log SET actor = 'someone' WHERE seq = ?", (apply_record["seq"],))
    tampered = runner.invoke(app, ["audit", "verify", *state])
    assert tampered.exit_code == 1
    assert f"record {apply_record['seq']} was modified" in tampered.output


def test_a_write_without_a_request_id_is_told_the_one_its_record_holds(
    demo_node: NodeProcess,
) -> None:
    """The id a write is recorded under is generated when the client sent none: the answer
    says it, so that the client can find its record."""
    headers = demo_node.auth(demo_node.admin_key)
    applied = httpx.post(f"{demo_node.url}/api/v1/apply", headers=headers, content=PROFILE)
    assert applied.status_code == 200, applied.text
    request_id = applied.headers.get("X-Request-ID", "")
    assert len(request_id) == 32, applied.headers
    [record] = [
        r
        for r in _audit(demo_node, demo_node.admin_key, action="apply", limit=1000)
        if r["request_id"] == request_id
    ]
    assert record["object_name"] == "audited-extra" and record["result"] == "ok"
    deleted = httpx.delete(f"{demo_node.url}/api/v1/profiles/audited-extra", headers=headers)
    assert deleted.status_code == 200, deleted.text
    assert len(deleted.headers.get("X-Request-ID", "")) == 32
    assert deleted.headers["X-Request-ID"] != request_id


def test_secrets_sent_by_mistake_are_kept_out_of_answers_logs_and_the_audit_log(
    demo_node: NodeProcess,
) -> None:
    url, admin = demo_node.url, demo_node.admin_key
    support = demo_node.tenant_key("support")
    node_log = demo_node.state_dir / "node.log"
    logged_before = node_log.stat().st_size  # what the node logs from here on
    # a tenant key sent without "Bearer ": refused, and the answer does not repeat it
    bare = httpx.get(f"{url}/v2/models/intent-router", headers={"Authorization": support})
    assert bare.status_code == 401
    assert bare.json()["error"] == (
        "the Authorization header has no scheme: send 'Authorization: Bearer <key>'"
    )
    # a whole key pasted in place of its id: the key is revoked by its id
    created = httpx.post(
        f"{url}/api/v1/keys",
        headers=demo_node.auth(admin),
        json={"role": "tenant", "tenant": "support"},
    )
    assert created.status_code == 201, created.text
    throwaway = created.json()["key"]
    revoked = httpx.delete(f"{url}/api/v1/keys/{throwaway}", headers=demo_node.auth(admin))
    assert revoked.status_code == 200, revoked.text
    assert revoked.json() == {"revoked": f"gvk_{_key_id(throwaway)}"}
    gone = httpx.get(f"{url}/v2/models/intent-router", headers=demo_node.auth(throwaway))
    assert gone.status_code == 401 and "was revoked" in gone.json()["error"]
    malformed = httpx.delete(
        f"{url}/api/v1/keys/gvk_short_S3cretS3cret", headers=demo_node.auth(admin)
    )
    assert malformed.status_code == 400
    assert "not its secret" in malformed.json()["error"]
    assert "S3cret" not in malformed.text

    records = httpx.get(
        f"{url}/api/v1/audit", headers=demo_node.auth(admin), params={"limit": 1000}
    )
    assert records.status_code == 200
    secrets = [_secret_part(support), _secret_part(throwaway), "S3cretS3cret"]
    places = {
        "the audit log": records.text,
        "the node's log": node_log.read_bytes()[logged_before:].decode(),
    }
    for where, text in places.items():
        for secret in secrets:
            assert secret not in text, f"a secret reached {where}"


def test_a_mutation_that_fails_on_a_bug_is_recorded_as_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 500 during an apply still leaves a record of the attempt, with the error (the node
    runs in this process so that its store can be made to fail)."""

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("disk on fire")

    async def scenario() -> None:
        async with node_in_this_process(tmp_path / "state") as (node, client, admin):
            assert node.store is not None
            monkeypatch.setattr(node.store, "apply", broken)
            answer = await client.post(
                "/api/v1/apply", content=PROFILE, headers={**admin, "X-Request-ID": "req-500"}
            )
            assert answer.status_code == 500
            assert answer.json()["error"] == "internal error: RuntimeError: disk on fire"
            (record,) = node.store.audit.list(action="apply", result="failed")
            assert (record.object_kind, record.object_name, record.role) == (
                "Profile",
                "audited-extra",
                "admin",
            )
            assert record.reason == "500 internal error: RuntimeError: disk on fire"
            assert record.request_id == "req-500"
            assert node.store.audit.verify().ok

    asyncio.run(scenario())


def test_a_tenant_key_deleting_a_cluster_object_is_denied_whether_it_exists_or_not(
    demo_node: NodeProcess,
) -> None:
    """Recorded as denied (the key may not), not as a failed 404: `audit list --result denied`
    shows every such attempt."""
    support = demo_node.auth(demo_node.tenant_key("support"))
    for path in ("tenants/retail", "profiles/no-such-profile", "pools/inference"):
        answer = httpx.delete(
            f"{demo_node.url}/api/v1/{path}",
            headers={**support, "X-Request-ID": f"req-del-{path.replace('/', '-')}"},
        )
        assert answer.status_code == 403, answer.text
        assert answer.json()["error"].startswith("a tenant key may not change ")
    denied = _audit(demo_node, demo_node.admin_key, result="denied", action="delete")
    ids = {r["request_id"] for r in denied}
    assert {"req-del-tenants-retail", "req-del-profiles-no-such-profile"} <= ids


def test_a_flood_of_requests_without_a_valid_key_is_recorded_within_a_budget(
    demo_node: NodeProcess,
) -> None:
    """Each refused key is recorded, but one address cannot grow the database as fast as it
    sends: past a burst, refusals are counted into the address's next record."""

    def authenticate_records() -> list[dict[str, Any]]:
        return _audit(demo_node, demo_node.admin_key, action="authenticate", limit=1000)

    before = len(authenticate_records())
    bad = demo_node.auth("gvk_nosuchid_flood")
    started = time.monotonic()
    with httpx.Client(base_url=demo_node.url, headers=bad, timeout=30) as http:
        for _ in range(60):
            answer = http.get("/api/v1/status")
            assert answer.status_code == 401
            # recorded or not, each refusal has an id the client can quote
            assert len(answer.headers.get("X-Request-ID", "")) == 32, answer.headers
        time.sleep(0.6)  # a few records' worth of budget again
        assert http.get("/api/v1/status").status_code == 401
    records = authenticate_records()
    _assert_within_budget(records[before:], 61, time.monotonic() - started, "127.0.0.1")


def test_a_key_asking_again_and_again_for_what_it_may_not_see_is_recorded_within_a_budget(
    demo_node: NodeProcess,
) -> None:
    """A valid tenant key refused (403 for the audit log, 404 for another tenant's objects)
    is recorded, but cannot grow the database as fast as it sends either."""
    key = demo_node.create_tenant_key("support", "asks too often")
    key_id = key.split("_")[1]

    def refusals() -> list[dict[str, Any]]:
        records = _audit(demo_node, demo_node.admin_key, result="denied", limit=1000)
        return [r for r in records if r["actor"] == key_id]

    started = time.monotonic()
    with httpx.Client(base_url=demo_node.url, headers=demo_node.auth(key), timeout=30) as http:
        for i in range(60):
            path = "/api/v1/audit" if i % 2 else "/api/v1/deployments?tenant=retail"
            assert http.get(path).status_code in (403, 404)
        time.sleep(0.6)  # a few records' worth of budget again
        assert http.get("/api/v1/audit").status_code == 403
    records = refusals()
    _assert_within_budget(records, 61, time.monotonic() - started, f"key gvk_{key_id}")


def _assert_within_budget(
    records: list[dict[str, Any]], sent: int, seconds: float, caller: str
) -> None:
    """At most the budget's burst (20) and its rate (5 a second) over ``seconds`` of the
    ``sent`` refusals are records of their own; the others are counted in the next one."""
    assert 0 < len(records) <= min(sent, 20 + 5 * seconds + 1), (len(records), seconds)
    if len(records) < sent:  # some were not recorded one by one: the last record says so
        assert f"more from {caller} not recorded one by one" in records[-1]["reason"], records[-1]


def test_a_key_pasted_where_a_name_goes_is_neither_logged_nor_recorded(
    demo_node: NodeProcess,
) -> None:
    secret = "gvk_abcdefgh_" + "S3cretPart" * 4
    retail = demo_node.auth(demo_node.tenant_key("retail"))
    for path in (f"/api/v1/deployments/{secret}", f"/api/v1/deployments?tenant={secret}"):
        answer = httpx.get(f"{demo_node.url}{path}", headers=retail, timeout=30)
        assert answer.status_code == 404, answer.text
    records = _audit(demo_node, demo_node.admin_key, limit=1000)
    assert "S3cretPart" not in str(records)
    assert any("gvk_abcdefgh_…" in r["tenant"] for r in records), records[-3:]
    assert "S3cretPart" not in (demo_node.state_dir / "node.log").read_text()


def test_a_full_disk_and_a_database_error_say_what_happened_and_no_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk is a 503 that says so; another database error is a 500 without the SQL
    statement and its parameters (a new key's hash, say), in the answer and the record."""
    from sqlalchemy.exc import IntegrityError, OperationalError

    async def scenario() -> None:
        async with node_in_this_process(tmp_path / "state") as (node, c, auth):
            assert node.store is not None

            def full(*_: object, **__: object) -> None:
                raise OperationalError(
                    "INSERT INTO objects", {}, Exception("database or disk is full")
                )

            monkeypatch.setattr(node.store, "apply", full)
            answer = await c.post("/api/v1/apply", content=PROFILE, headers=auth)
            assert answer.status_code == 503, answer.text
            assert "the disk that holds the node's database is full" in answer.json()["error"]

            def refused(*_: object, **__: object) -> None:
                raise IntegrityError(
                    "INSERT INTO api_keys (secret_hash) VALUES (%(secret_hash)s)",
                    {"secret_hash": "a324eb-secret-hash"},
                    ValueError("text fields cannot contain NUL"),
                )

            monkeypatch.setattr(node.store, "apply", refused)
            answer = await c.post("/api/v1/apply", content=PROFILE, headers=auth)
            assert answer.status_code == 500
            assert answer.json()["error"] == (
                "internal error: IntegrityError: ValueError: text fields cannot contain NUL"
            )
            # a NUL in a key's text, or in a path, is the caller's error before any store
            nul = await c.post(
                "/api/v1/keys", json={"role": "operator", "description": "a\x00b"}, headers=auth
            )
            assert nul.status_code == 400 and "NUL character" in nul.json()["error"], nul.text
            path = await c.get("/api/v1/tenants/x%00", headers=auth)
            assert path.status_code == 400 and "NUL character" in path.json()["error"]
            records = node.store.audit.list(limit=1000)
            assert "a324eb" not in str(records) and "INSERT" not in str(records)
            assert node.store.audit.verify().ok

    asyncio.run(scenario())


def test_a_request_id_too_long_to_keep_is_replaced_not_echoed_or_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Any client may send an X-Request-ID: one of megabytes was written whole into a log
    line per request, and echoed back. Past 128 characters it is replaced by a generated id
    (as the audit log would have cut it); a usable one is kept."""
    huge = "C" * (1 << 20)

    async def scenario() -> list[str]:
        async with node_in_this_process(tmp_path / "state") as (_, client, admin):
            ids = []
            for given in (huge, "ok-id_7", "two words"):  # a log line quotes the last
                for url, headers in (
                    ("/api/v1/status", {"X-Request-ID": given}),  # refused: no key
                    ("/api/v1/status", {**admin, "X-Request-ID": given}),
                    ("/v2/models/nosuch/infer", {**admin, "X-Request-ID": given}),
                ):
                    answer = await client.request(
                        "GET" if "status" in url else "POST", url, headers=headers
                    )
                    ids.append(answer.headers.get("X-Request-ID", ""))
            return ids

    with caplog.at_level(logging.INFO):
        ids = asyncio.run(scenario())
    too_long, usable, spaced = ids[0:3], ids[3:6], ids[6:9]
    # generated where the node makes one (refusals, inference; a plain read needs none)
    assert [len(i) for i in too_long] == [32, 0, 32] and huge[:32] not in too_long, too_long
    assert usable == ["ok-id_7"] * 3
    assert spaced == ["two words"] * 3
    assert all(len(r.getMessage()) < 10_000 for r in caplog.records)
    assert not any(huge[:200] in str(getattr(r, "request_id", "")) for r in caplog.records)


def test_repeated_unloads_and_loads_record_each_change_once(demo_node: NodeProcess) -> None:
    """A tenant key may unload its own model as often as it likes: only what changes is
    recorded, so it cannot fill the audit log with a loop of calls that change nothing."""
    analytics = demo_node.auth(demo_node.tenant_key("analytics"))

    def records(verb: str) -> int:
        return len(_audit(demo_node, demo_node.admin_key, action=f"model.{verb}", limit=1000))

    before = {verb: records(verb) for verb in ("unload", "load")}
    with httpx.Client(base_url=demo_node.url, headers=analytics, timeout=60) as http:
        for verb in ("unload", "unload", "unload", "load", "load"):
            answer = http.post(f"/v2/repository/models/basket-scorer/{verb}")
            assert answer.status_code == 200, answer.text
    assert {verb: records(verb) - before[verb] for verb in before} == {"unload": 1, "load": 1}
