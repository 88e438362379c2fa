"""Stop a node with SIGTERM or SIGKILL and start it on the same state: everything comes back."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from gpuvisor.launch import NodeProcess

INFER = (
    b'{"inputs":[{"name":"features","shape":[1,16],"datatype":"FP32","data":['
    + b",".join([b"1"] * 16)
    + b"]}]}"
)


def _deployments(node: NodeProcess) -> set[tuple[str, str, str]]:
    items = httpx.get(f"{node.url}/api/v1/deployments", headers=node.auth(node.admin_key)).json()[
        "items"
    ]
    return {(d["metadata"]["tenant"], d["metadata"]["name"], d["spec"]["model"]) for d in items}


def _worker_pids(node: NodeProcess) -> set[int]:
    items = httpx.get(f"{node.url}/api/v1/slices", headers=node.auth(node.admin_key)).json()[
        "items"
    ]
    return {int(s["pid"]) for s in items if s["pid"]}


@pytest.mark.parametrize(
    ("sig", "database"),
    [
        (signal.SIGTERM, "sqlite"),
        (signal.SIGKILL, "sqlite"),
        pytest.param(signal.SIGKILL, "postgres", marks=pytest.mark.postgres),
    ],
    ids=["sigterm", "sigkill", "sigkill-postgres"],
)
def test_state_survives_restart(
    tmp_path: Path, sig: int, database: str, request: pytest.FixtureRequest
) -> None:
    db = request.getfixturevalue("pg_url") if database == "postgres" else None
    node = NodeProcess(state_dir=tmp_path / "state", db=db).start()
    try:
        admin = node.auth(node.admin_key)
        created = httpx.post(
            f"{node.url}/api/v1/keys",
            headers=admin,
            json={"role": "tenant", "tenant": "analytics", "description": "restart test"},
        )
        assert created.status_code == 201, created.text
        extra_key = created.json()["key"]
        # An operator's change must survive too: delete one demo deployment.
        assert (
            httpx.delete(
                f"{node.url}/api/v1/deployments/sku-lookup?tenant=retail", headers=admin
            ).status_code
            == 200
        )
        before = _deployments(node)
        pids = _worker_pids(node)
        assert ("retail", "sku-lookup", "sku-lookup") not in before and len(before) == 3
        admin_key, analytics_key = node.admin_key, node.tenant_key("analytics")
        code = node.stop(sig)
        # uvicorn stops gracefully on SIGTERM, then re-raises it: the exit status is the signal's.
        assert code == -sig
        log = (tmp_path / "state" / "node.log").read_text()
        if sig == signal.SIGTERM:
            assert "node stopped: 3 worker(s) stopped" in log
        else:
            assert "node stopped" not in log
        deadline = time.monotonic() + 10  # workers must not outlive their node
        while time.monotonic() < deadline and any(
            psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids
        ):
            time.sleep(0.1)
        assert not [
            p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
        ]

        node = NodeProcess(state_dir=tmp_path / "state", db=db).start()
        assert node.admin_key == admin_key
        assert _deployments(node) == before
        for key in (analytics_key, extra_key):
            answer = httpx.post(
                f"{node.url}/v2/models/basket-scorer/infer", content=INFER, headers=node.auth(key)
            )
            assert answer.status_code == 200, answer.text
        assert (
            httpx.get(f"{node.url}/api/v1/deployments", headers=node.auth(admin_key)).status_code
            == 200
        )
    finally:
        node.stop()
