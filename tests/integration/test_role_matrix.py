"""Every admin API route, checked against every role in one table (issue 4: roles).

Roles: admin (everything), operator (reads everything; no keys, no tenant data changes),
a tenant reaching its own objects, the same tenant reaching another tenant's objects (404:
they do not exist for it, never 403 and never 200), and no key at all (401).

The table must name every route under /api/v1 that the node's OpenAPI document lists, so a
route added without a row fails ``test_table_covers_every_admin_route``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpuvisor.launch import NodeProcess

OWN, OTHER = "support", "retail"  # the tenant key used, and the tenant it must not reach
ROLES = ("admin", "operator", "tenant-own", "tenant-other", "no-key")


@dataclass
class Call:
    """One request: path (with query), optional body, and what to undo afterwards."""

    path: str
    content: str | None = None
    json: dict[str, Any] | None = None
    cleanup: list[Callable[[], None]] = field(default_factory=list)
    #: for a mutation of a Model: whether it existed after the request (set by cleanup)
    exists_after: bool | None = None


@dataclass
class Ctx:
    node: NodeProcess
    keys: dict[str, str]
    models_dir: Path

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(
            method,
            self.node.url + path,
            headers=self.node.auth(self.keys["admin"]),
            timeout=30,
            **kwargs,
        )

    def model_manifest(self, tenant: str, name: str) -> str:
        source = self.models_dir / "intent-router.onnx"
        return (
            "apiVersion: gpuvisor/v1\nkind: Model\n"
            f"metadata: {{name: {name}, tenant: {tenant}}}\n"
            f'spec: {{version: "1", format: onnx, source: "{source}"}}\n'
        )

    def throwaway_model(self, tenant: str, name: str) -> None:
        """Apply a Model only this test uses (the caller deletes it)."""
        applied = self.admin("POST", "/api/v1/apply", content=self.model_manifest(tenant, name))
        assert applied.status_code == 200, applied.text

    def throwaway_key(self, tenant: str) -> tuple[str, Callable[[], None]]:
        created = self.admin("POST", "/api/v1/keys", json={"role": "tenant", "tenant": tenant})
        assert created.status_code == 201, created.text
        key_id = created.json()["id"]
        return key_id, lambda: self._delete_quietly(f"/api/v1/keys/{key_id}")

    def _delete_quietly(self, path: str) -> int:
        status = self.admin("DELETE", path).status_code
        assert status in (200, 404), path
        return status


def _tenant(target: str) -> str:
    return OWN if target in ("tenant-own", "admin", "operator", "no-key") else OTHER


# ---- request builders: (ctx, role) -> Call -------------------------------------------------


def apply_call(ctx: Ctx, role: str) -> Call:
    tenant, name = _tenant(role), f"matrix-applied-{role}"
    undo = f"/api/v1/models/{name}?tenant={tenant}"
    call = Call("/api/v1/apply", content=ctx.model_manifest(tenant, name))

    def delete_and_note() -> None:
        call.exists_after = ctx._delete_quietly(undo) == 200

    call.cleanup.append(delete_and_note)
    return call


def delete_object_call(ctx: Ctx, role: str) -> Call:
    tenant, name = _tenant(role), f"matrix-victim-{role}"
    ctx.throwaway_model(tenant, name)
    query = f"?tenant={tenant}" if role != "tenant-own" else ""
    call = Call(f"/api/v1/models/{name}{query}")

    def delete_and_note() -> None:
        call.exists_after = ctx._delete_quietly(f"/api/v1/models/{name}?tenant={tenant}") == 200

    call.cleanup.append(delete_and_note)
    return call


def create_key_call(ctx: Ctx, role: str) -> Call:
    call = Call("/api/v1/keys", json={"role": "tenant", "tenant": _tenant(role)})

    def revoke_what_was_made() -> None:
        for info in ctx.admin("GET", f"/api/v1/keys?tenant={_tenant(role)}").json()["items"]:
            if info["revoked_at"] is None and info["id"] not in ctx.keys.values():
                if info["id"] in _KEYS_BEFORE:
                    continue
                ctx._delete_quietly(f"/api/v1/keys/{info['id']}")

    call.cleanup.append(revoke_what_was_made)
    return call


_KEYS_BEFORE: set[str] = set()


def revoke_key_call(ctx: Ctx, role: str) -> Call:
    key_id, undo = ctx.throwaway_key(_tenant(role))
    return Call(f"/api/v1/keys/{key_id}", cleanup=[undo])


def device_call(action: str) -> Callable[[Ctx, str], Call]:
    """Cordon, drain or uncordon the demo's CPU device; the cleanup leaves it uncordoned."""

    def build(ctx: Ctx, _: str) -> Call:
        undo = lambda: ctx.admin("POST", "/api/v1/devices/cpu-0/uncordon")  # noqa: E731
        query = "?timeout=1" if action == "drain" else ""
        return Call(f"/api/v1/devices/cpu-0/{action}{query}", json={}, cleanup=[undo])

    return build


def fixed(path_own: str, path_other: str | None = None) -> Callable[[Ctx, str], Call]:
    def build(_: Ctx, role: str) -> Call:
        if role == "tenant-other":
            assert path_other is not None
            return Call(path_other)
        return Call(path_own)

    return build


# ---- the table -----------------------------------------------------------------------------
# Expected status per role, in ROLES order; None where the route addresses no tenant's object
# (the tenant-own cell then also checks that the answer names nothing of the other tenant).


@dataclass(frozen=True)
class Row:
    method: str
    route: str
    build: Callable[[Ctx, str], Call]
    admin: int
    operator: int
    tenant_own: int
    tenant_other: int | None

    def expected(self, role: str) -> int | None:
        return {
            "admin": self.admin,
            "operator": self.operator,
            "tenant-own": self.tenant_own,
            "tenant-other": self.tenant_other,
            "no-key": 401,
        }[role]


TABLE = [
    Row("POST", "/api/v1/apply", apply_call, 200, 403, 200, 404),
    Row("GET", "/api/v1/devices", fixed("/api/v1/devices"), 200, 200, 200, None),
    Row("GET", "/api/v1/devices/{device_id}", fixed("/api/v1/devices/cpu-0"), 200, 200, 200, None),
    Row("GET", "/api/v1/slices", fixed("/api/v1/slices"), 200, 200, 200, None),
    # Devices are the operators' to cordon and drain; a tenant key may not, whatever it names.
    Row("POST", "/api/v1/devices/{device_id}/cordon", device_call("cordon"), 200, 200, 403, None),
    Row("POST", "/api/v1/devices/{device_id}/drain", device_call("drain"), 200, 200, 403, None),
    Row(
        "POST", "/api/v1/devices/{device_id}/uncordon", device_call("uncordon"), 200, 200, 403, None
    ),
    Row("GET", "/api/v1/status", fixed("/api/v1/status"), 200, 200, 200, None),
    Row("GET", "/api/v1/dashboard", fixed("/api/v1/dashboard"), 200, 200, 200, None),
    # Keys are the admin's alone; a tenant is refused for its own tenant and any other alike
    # (refused before any key or tenant is looked up, so the answer reveals nothing).
    Row("POST", "/api/v1/keys", create_key_call, 201, 403, 403, 403),
    Row(
        "GET",
        "/api/v1/keys",
        fixed(f"/api/v1/keys?tenant={OWN}", f"/api/v1/keys?tenant={OTHER}"),
        200,
        403,
        403,
        403,
    ),
    Row("DELETE", "/api/v1/keys/{key_id}", revoke_key_call, 200, 403, 403, 403),
    Row(
        "GET",
        "/api/v1/audit",
        fixed(f"/api/v1/audit?tenant={OWN}", f"/api/v1/audit?tenant={OTHER}"),
        200,
        200,
        403,
        403,
    ),
    Row(
        "GET",
        "/api/v1/{plural}",
        fixed(f"/api/v1/deployments?tenant={OWN}", f"/api/v1/deployments?tenant={OTHER}"),
        200,
        200,
        200,
        404,
    ),
    Row(
        "GET",
        "/api/v1/{plural}/{name}",
        fixed(
            f"/api/v1/deployments/intent-router?tenant={OWN}",
            f"/api/v1/deployments/shelf-detector?tenant={OTHER}",
        ),
        200,
        200,
        200,
        404,
    ),
    Row("DELETE", "/api/v1/{plural}/{name}", delete_object_call, 200, 403, 200, 404),
]

# Names that belong to the other tenant and must never reach the tenant-own key's answers.
OTHER_NAMES = (OTHER, "shelf-detector", "shelf-classifier", "sku-lookup")

CASES = [
    pytest.param(row, role, id=f"{row.method} {row.route} as {role}")
    for row, role in itertools.product(TABLE, ROLES)
    if row.expected(role) is not None
]


@pytest.fixture(scope="module")
def ctx(demo_node: NodeProcess, models_dir: Path) -> Iterator[Ctx]:
    admin = demo_node.admin_key
    operator = httpx.post(
        f"{demo_node.url}/api/v1/keys",
        headers=demo_node.auth(admin),
        json={"role": "operator", "description": "role matrix"},
        timeout=30,
    )
    assert operator.status_code == 201, operator.text
    keys = {
        "admin": admin,
        "operator": operator.json()["key"],
        "tenant-own": demo_node.tenant_key(OWN),
        "tenant-other": demo_node.tenant_key(OWN),  # the same key, aimed at OTHER's objects
    }
    context = Ctx(demo_node, keys, models_dir)
    for tenant in (OWN, OTHER):
        items = context.admin("GET", f"/api/v1/keys?tenant={tenant}").json()["items"]
        _KEYS_BEFORE.update(i["id"] for i in items)
    yield context
    context._delete_quietly(f"/api/v1/keys/{operator.json()['id']}")


def test_table_covers_every_admin_route(demo_node: NodeProcess) -> None:
    schema = httpx.get(f"{demo_node.url}/openapi.json", timeout=30).json()
    served = {
        (method.upper(), path)
        for path, operations in schema["paths"].items()
        if path.startswith("/api/v1/")
        for method in operations
    }
    assert served == {(row.method, row.route) for row in TABLE}


@pytest.mark.parametrize(("row", "role"), CASES)
def test_role_matrix(ctx: Ctx, row: Row, role: str) -> None:
    call = row.build(ctx, role)
    headers = ctx.node.auth(ctx.keys[role]) if role != "no-key" else {}
    try:
        response = httpx.request(
            row.method,
            ctx.node.url + call.path,
            headers=headers,
            content=call.content,
            json=call.json,
            timeout=60,
        )
    finally:
        for undo in call.cleanup:
            undo()
    expected = row.expected(role)
    assert response.status_code == expected, f"{row.method} {call.path}: {response.text}"
    body = response.json()
    if expected >= 400:
        assert set(body) >= {"error"}, body
    if call.exists_after is not None:
        # a refused mutation changed nothing; an allowed one took effect
        applied_or_kept = (row.method == "POST") == (expected < 400)
        assert call.exists_after == applied_or_kept, f"{row.method} {call.path} as {role}"
    if role == "tenant-other":
        # the same answer as for a tenant that does not exist: nothing tells them apart
        ghost = httpx.request(
            row.method,
            ctx.node.url + call.path.replace(OTHER, "nobody"),
            headers=headers,
            content=call.content.replace(OTHER, "nobody") if call.content else None,
            json=call.json and {k: v.replace(OTHER, "nobody") for k, v in call.json.items()},
            timeout=60,
        )
        assert ghost.status_code == expected
        assert ghost.json()["error"].replace("nobody", OTHER) == body["error"]
    if role == "tenant-own" and expected < 400:
        leaked = [name for name in OTHER_NAMES if name in response.text]
        assert not leaked, f"{call.path} shows {OTHER}'s {leaked} to {OWN}'s key"
