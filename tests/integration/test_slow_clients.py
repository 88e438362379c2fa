"""A body that stops arriving is given up on every route: answered 408, with the connection
to be closed, and the node serves on. The node's app is called in this process with a
client no HTTP library would be (one that sends part of a body, then nothing)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
from in_process import node_in_this_process
from starlette.types import Message

from gpuvisor.api import timeouts
from gpuvisor.api.app import create_app
from gpuvisor.demo.models import build_demo_model, sample_inputs
from gpuvisor.runtime.tensors import json_infer_request


async def _call_stalling(app: object, path: str, authorization: str, first: bytes) -> list[Message]:
    """POST ``first`` as the start of a longer body to ``path``, then send nothing more;
    return what the app sent."""
    sent: list[Message] = []
    chunks = [{"type": "http.request", "body": first, "more_body": True}]

    async def receive() -> Message:
        if chunks:
            return chunks.pop()
        await asyncio.sleep(3600)  # the rest never comes
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"authorization", authorization.encode()),
            (b"content-length", b"100000"),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8700),
    }
    await asyncio.wait_for(app(scope, receive, send), 10)  # type: ignore[operator]
    return sent


def test_a_stalled_body_is_answered_408_on_inference_and_admin_routes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(timeouts, "BODY_STALL", 0.3)

    model = tmp_path / "scorer.onnx"
    model.write_bytes(build_demo_model("basket-scorer").SerializeToString())
    manifest = f"""
apiVersion: gpuvisor/v1
kind: Tenant
metadata: {{name: retail}}
---
apiVersion: gpuvisor/v1
kind: Profile
metadata: {{name: small}}
spec: {{memory: 512Mi}}
---
apiVersion: gpuvisor/v1
kind: Model
metadata: {{name: scorer, tenant: retail}}
spec: {{source: "{model}"}}
---
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {{name: scorer, tenant: retail}}
spec: {{model: scorer, profile: small}}
"""

    async def scenario() -> None:
        async with node_in_this_process(tmp_path / "state") as (node, client, admin):
            applied = await client.post("/api/v1/apply", headers=admin, content=manifest)
            assert applied.status_code == 200, applied.text
            created = await client.post(
                "/api/v1/keys", headers=admin, json={"role": "tenant", "tenant": "retail"}
            )
            tenant = {"Authorization": f"Bearer {created.json()['key']}"}
            for _ in range(600):
                if (await client.get("/v2/models/scorer/ready", headers=tenant)).is_success:
                    break
                await asyncio.sleep(0.1)
            app = create_app(node, manage_lifecycle=False)
            body = json_infer_request(sample_inputs("basket-scorer"))
            for path, headers in (("/v2/models/scorer/infer", tenant), ("/api/v1/apply", admin)):
                sent = await _call_stalling(app, path, headers["Authorization"], body[:10])
                start = sent[0]
                assert start["status"] == 408, (path, sent)
                assert dict(start["headers"])[b"connection"] == b"close"
                error = orjson.loads(b"".join(m.get("body", b"") for m in sent[1:]))["error"]
                assert "stopped arriving for 0.3s" in error, error
            # and the node serves on
            served = await client.post("/v2/models/scorer/infer", content=body, headers=tenant)
            assert served.status_code == 200, served.text

    asyncio.run(scenario())


def test_a_write_with_an_unknown_key_is_refused_before_its_body_is_read(tmp_path: Path) -> None:
    """A client without a valid key gets its 401 at once: the node does not wait for, nor
    hold, the body it announced (up to 8 MiB a connection on the admin API)."""

    async def scenario() -> None:
        async with node_in_this_process(tmp_path / "state") as (node, _, _):
            app = create_app(node, manage_lifecycle=False)
            for path in ("/api/v1/keys", "/api/v1/apply", "/v2/repository/models/x/load"):
                sent = await _call_stalling(app, path, "Bearer gvk_nosuchid_secret", b"{")
                assert sent[0]["status"] == 401, (path, sent)
                assert dict(sent[0]["headers"])[b"connection"] == b"close"

    asyncio.run(scenario())
