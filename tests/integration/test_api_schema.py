"""schemathesis against the node's own /openapi.json (control-plane issue, acceptance point 7).

Every operation the document lists, the inference protocol's (/v2/...) and the admin API's
(/api/v1/...), is called with generated requests, once with an admin key and once with a
tenant key. Each response must be:

- no server error (5xx);
- a status code the document declares for the operation (so every refusal is documented);
- of a content type the document declares for that status;
- a body that validates against the schema the document declares for that status;
- for a success, refused without a key and with a wrong one (401), as the document's
  security requirement says;
- for a request the document says is invalid (negative mode), refused with a 4xx.

Not checked: that every schema-valid request succeeds (``positive_data_acceptance``): generated
names are rarely those of existing objects (404), and some rules are not in the schema (a
tenant key needs a tenant: 400). ``unsupported_method`` only runs in schemathesis's coverage
phase, which this test does not run. The stateful checks need links between operations, which
the document does not declare.

Each operation gets generated requests that fit the document (positive), that break it
(negative), and for reads, ones with real names (a deployment, a device, a tenant) so that
success bodies are validated too.

The run is bounded and reproducible: Hypothesis's derandomized generation (the same requests
on every run, on a developer's machine and in CI), no example database, no shrinking,
MAX_EXAMPLES per operation and mode, and a deadline per request. About 30 s on two cores.

Side effects: the admin run uses an admin key created for it (not the node's own admin key),
so a generated request cannot revoke the key the rest of the suite uses. Generated requests
that would revoke a key, or delete an object, that existed before the run are not sent (their
random names essentially never match, but a run must not depend on that); keys and objects the
generated requests create are removed afterwards. At the end the node must still be ready and
still hold everything it held before the run.

The inference route (``POST /v2/models/{name}/infer``) is served ahead of FastAPI, but the
document declares it like every other route; the run sends it generated requests, with the
tenant's real deployment too, which its worker then decodes and refuses (a generated body is
not a valid input for the model). tests/integration/test_bad_input.py covers it case by case.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, Verbosity, assume, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import APIOperation, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from gpuvisor.launch import NodeProcess

TENANT = "support"  # a demo tenant with a deployment of its own
MODEL = "intent-router"  # that deployment
MAX_EXAMPLES = 25  # per operation, mode and key
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    ignored_auth,
    negative_data_rejection,
]


class Run:
    """What one schemathesis run needs: the node, its keys, and what existed before."""

    def __init__(self, node: NodeProcess) -> None:
        self.node = node
        self.root = node.auth(node.admin_key)
        self.keys_before = {k["id"] for k in self._get("/api/v1/keys")["items"]}
        self.objects_before = self._objects()
        created = httpx.post(
            f"{node.url}/api/v1/keys",
            headers=self.root,
            json={"role": "admin", "description": "schemathesis run"},
            timeout=30,
        )
        assert created.status_code == 201, created.text
        self.admin_key_id = created.json()["id"]
        self.keys = {"admin": created.json()["key"], "tenant": node.tenant_key(TENANT)}
        devices = sorted(d["id"] for d in self._get("/api/v1/devices")["items"])
        index = httpx.post(
            f"{node.url}/v2/repository/index", headers=node.auth(self.keys["tenant"]), timeout=30
        ).json()
        model = next(entry for entry in index if entry["name"] == MODEL)
        #: real values for path and query parameters, for a pass that reaches the success
        #: answers (random names are mostly not found)
        self.known = {
            "name": MODEL,
            "version": model["version"],
            "plural": "deployments",
            "device_id": devices[0],
            "tenant": TENANT,
        }
        #: what a generated request must not change: keys, objects and devices of the node
        self.names = (
            self.keys_before
            | {self.admin_key_id}
            | {key_id.removeprefix("gvk_") for key_id in self.keys_before | {self.admin_key_id}}
            | {name for _, _, name in self.objects_before}
            | set(devices)
        )

    def _get(self, path: str) -> Any:
        response = httpx.get(self.node.url + path, headers=self.root, timeout=30)
        assert response.status_code == 200, f"{path}: {response.text}"
        return response.json()

    def _objects(self) -> dict[tuple[str, str, str], Any]:
        """Every stored object's manifest (without status), by (plural, tenant, name)."""
        found = {}
        for plural in ("tenants", "profiles", "pools", "models", "deployments"):
            for item in self._get(f"/api/v1/{plural}")["items"]:
                meta = item["metadata"]
                key = (plural, meta.get("tenant") or "", meta["name"])
                found[key] = {k: v for k, v in item.items() if k != "status"}
        return found

    def protects(self, case: schemathesis.Case) -> bool:
        """Whether ``case`` would change something that predates the run: a request other than
        a read or an inference that names an existing key, object or device in its path, or an apply of a
        manifest named like an existing object."""
        if case.method.upper() in ("GET", "HEAD", "OPTIONS") or case.path.endswith("/infer"):
            return False  # reads and inference change nothing
        named = {str(value) for value in (case.path_parameters or {}).values()}
        if isinstance(case.body, dict):
            metadata = case.body.get("metadata")
            if isinstance(metadata, dict):
                named.add(str(metadata.get("name")))
        return bool(named & self.names)

    def clean_up(self) -> None:
        """Revoke the keys and delete the objects the generated requests created."""
        for key in self._get("/api/v1/keys")["items"]:
            if key["id"] not in self.keys_before and key["revoked_at"] is None:
                httpx.delete(
                    f"{self.node.url}/api/v1/keys/{key['id']}", headers=self.root, timeout=30
                )
        # deployments before models, tenants last (what is in use cannot be deleted)
        order = ("deployments", "models", "profiles", "pools", "tenants")
        created = sorted(
            set(self._objects()) - set(self.objects_before), key=lambda o: order.index(o[0])
        )
        for plural, tenant, name in created:
            httpx.delete(
                f"{self.node.url}/api/v1/{plural}/{name}",
                params={"tenant": tenant} if tenant else None,
                headers=self.root,
                timeout=30,
            )


@pytest.fixture(scope="module")
def run(demo_node: NodeProcess) -> Iterator[Run]:
    state = Run(demo_node)
    try:
        yield state
    finally:
        state.clean_up()


def _operations(run: Run, role: str) -> list[APIOperation]:
    """The document's operations, read from the running node, sending ``role``'s key.

    Operations that delete or revoke go last, so that what they might remove cannot hide a
    defect of another operation.
    """
    config = schemathesis.Config.from_dict(
        {
            # the key is sent by the test (below), not generated
            "generation": {"with-security-parameters": False},
            "request-timeout": 30,
        }
    )
    schema = schemathesis.openapi.from_url(f"{run.node.url}/openapi.json", config=config)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20, [op.label for op in operations]
    return sorted(operations, key=lambda op: op.method.upper() == "DELETE")


def _fuzz(
    run: Run, operation: APIOperation, role: str, mode: GenerationMode, known: bool = False
) -> set[int]:
    """Send generated requests for one operation and return the statuses of the answers; raise
    on the first response that fails a check.

    With ``known``, the path and query parameters that name something on the node (a model,
    a kind, a device, a tenant) are given real values; the rest is generated.
    """
    fixed: dict[str, dict[str, Any]] = {"path_parameters": {}, "query": {}}
    if known:
        for parameter in operation.iter_parameters():
            where = {"path": "path_parameters", "query": "query"}.get(parameter.location)
            if where is not None and parameter.name in run.known:
                fixed[where][parameter.name] = run.known[parameter.name]
    strategy = operation.as_strategy(
        generation_mode=mode,
        path_parameters=fixed["path_parameters"] or None,
        query=fixed["query"] or None,
    )

    statuses: set[int] = set()
    inference = operation.path.endswith("/infer")
    checks = [check for check in CHECKS if not (inference and check is not_a_server_error)]

    @given(case=strategy)
    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,  # the same requests on every run, here and in CI
        database=None,
        deadline=10_000,  # ms for one request, its response and the checks
        phases=[Phase.explicit, Phase.generate],  # no shrinking: it would multiply the requests
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
    )
    def fuzz(case: schemathesis.Case) -> None:
        assume(not run.protects(case))
        response = case.call_and_validate(headers=run.node.auth(run.keys[role]), checks=checks)
        if inference and response.status_code >= 500:
            # a generated request with many rows may not fit its deployment's latency SLO:
            # refused before it queues with 503 (declared); any other 5xx is a failure
            assert response.status_code == 503, response.text
            assert response.json()["code"] in ("deadline_exceeded", "unavailable"), response.text
        statuses.add(response.status_code)

    fuzz()
    return statuses


@pytest.mark.parametrize("role", ["admin", "tenant"])
def test_api_conforms_to_its_schema(run: Run, role: str) -> None:
    failures = []
    succeeded = set()
    answered_known: dict[str, set[int]] = {}
    for operation in _operations(run, role):
        passes = [(GenerationMode.POSITIVE, False), (GenerationMode.NEGATIVE, False)]
        if operation.method.upper() == "GET" or operation.path.endswith("/infer"):
            # reads and inference: real names change nothing
            passes.append((GenerationMode.POSITIVE, True))
            passes.append((GenerationMode.NEGATIVE, True))
        for mode, known in passes:
            try:
                statuses = _fuzz(run, operation, role, mode, known)
                if any(200 <= status < 300 for status in statuses):
                    succeeded.add(operation.label)
                if known:
                    answered_known.setdefault(operation.label, set()).update(statuses)
            except Unsatisfiable:
                # nothing about this operation's request can be made invalid (no parameters,
                # or only free-form strings): there are no negative cases to send
                assert mode is GenerationMode.NEGATIVE, operation.label
            except (FailureGroup, Exception) as exc:  # failed checks, reported all together
                label = f"{mode.value}{', real names' if known else ''}"
                failures.append(f"--- {operation.label} ({label}) ---\n{exc}")
    assert not failures, f"{len(failures)} operations failed:\n" + "\n".join(failures)
    # the key was accepted, and success bodies (not only refusals) were checked
    reached = {"GET /api/v1/status", "GET /api/v1/{plural}/{name}", "POST /v2/repository/index"}
    if role == "tenant":
        reached |= {"GET /v2/models/{name}", "GET /v2/models/{name}/ready"}
    else:
        reached |= {"GET /api/v1/keys", "GET /api/v1/audit"}
    assert reached <= succeeded, sorted(reached - succeeded)
    if role == "tenant":  # generated inference requests got past routing to the deployment
        assert 400 in answered_known["POST /v2/models/{name}/infer"], answered_known


def test_document_declares_keys_and_error_bodies(run: Run) -> None:
    """What the checks above lean on: every operation that takes a key says so (else
    ``ignored_auth`` checks nothing), and every 4xx it declares has an ``{"error": ...}`` body
    (FastAPI's own 422 body, which this node never sends, is gone)."""
    document = httpx.get(f"{run.node.url}/openapi.json", timeout=30).json()
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearerKey"] == {**schemes["bearerKey"], "type": "http", "scheme": "bearer"}
    assert schemes["headerKey"]["name"] == "X-API-Key"
    assert "HTTPValidationError" not in document["components"]["schemas"]
    open_routes = {"/v2/health/live", "/v2/health/ready", "/v2"}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            label = f"{method.upper()} {path}"
            responses = operation["responses"]
            assert "422" not in responses, label
            if path not in open_routes:
                assert "401" in responses, label
                assert operation["security"] == [{"bearerKey": []}, {"headerKey": []}], label
            for status, response in responses.items():
                if status.startswith("4") and label not in _OWN_4XX_BODIES:
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorBody"}, label


# 4xx answers that are not errors but the protocol's own bodies with an "error" field
_OWN_4XX_BODIES = {
    "GET /v2/models/{name}/ready",
    "GET /v2/models/{name}/versions/{version}/ready",
}


def test_node_unharmed_after_the_runs(run: Run, demo_node: NodeProcess) -> None:
    """After both runs: the node is ready, and every key and object from before is intact."""
    ready = httpx.get(f"{demo_node.url}/v2/health/ready", timeout=30)
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"ready": True}
    keys = {k["id"]: k for k in run._get("/api/v1/keys")["items"]}
    for key_id in run.keys_before:
        assert keys[key_id]["revoked_at"] is None, f"{key_id} was revoked by the run"
    objects = run._objects()
    for key, manifest in run.objects_before.items():
        assert objects.get(key) == manifest, f"{key} was changed or deleted by the run"
    run.clean_up()
    assert set(run._objects()) == set(run.objects_before), "objects the run made are left"
