"""Which key a CLI command uses: --key, else GPUVISOR_KEY, else the state directory's admin
key; a key given but empty is refused rather than replaced by the admin key."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest

from gpuvisor.client import NodeClient
from gpuvisor.errors import ConfigError


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("GPUVISOR_KEY", raising=False)
    (tmp_path / "admin.key").write_text("gvk_admin_secret\n")
    return tmp_path


def test_the_key_given_wins_then_the_environment_then_the_admin_key(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert NodeClient(key="gvk_given", state=str(state)).key == "gvk_given"
    assert NodeClient(state=str(state)).key == "gvk_admin_secret"
    monkeypatch.setenv("GPUVISOR_KEY", "gvk_from_env")
    assert NodeClient(state=str(state)).key == "gvk_from_env"
    assert NodeClient(key="gvk_given", state=str(state)).key == "gvk_given"


@pytest.mark.parametrize("how", ["--key ''", "GPUVISOR_KEY=''", "--key '  '"])
def test_an_empty_key_is_refused_not_replaced_by_the_admin_key(
    state: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    key = None
    if how.startswith("GPUVISOR_KEY"):
        monkeypatch.setenv("GPUVISOR_KEY", "")
    else:
        key = how.split("'")[1]
    with pytest.raises(ConfigError) as caught:
        NodeClient(key=key, state=str(state))
    assert caught.value.message == (
        "the API key given (--key or GPUVISOR_KEY) is empty: pass the key itself, or neither "
        f"to use the admin key in {state / 'admin.key'}"
    )


def test_a_missing_admin_key_says_whether_a_node_ever_started_there(state: Path) -> None:
    (state / "admin.key").unlink()
    with pytest.raises(ConfigError, match="or start the node once so that"):
        NodeClient(state=str(state))
    (state / "gpuvisor.db").write_bytes(b"")
    with pytest.raises(ConfigError) as caught:
        NodeClient(state=str(state))
    assert "is missing, and a node has started on" in caught.value.message
    assert "start the node once" not in caught.value.message
    (state / "admin.key").write_text("\n")
    with pytest.raises(ConfigError, match=r"admin.key is empty\. Pass --key"):
        NodeClient(state=str(state))


@pytest.mark.parametrize(
    ("url", "sent"),
    [
        ("http://127.0.0.1:8700", True),
        ("http://localhost:8700", True),
        ("http://[::1]:8700", True),
        ("http://127.0.0.2:9000", True),
        ("http://192.0.2.1:8700", False),
        ("http://gpu-box.example:8700", False),
    ],
)
def test_the_local_admin_key_goes_to_a_node_on_this_machine_only(
    state: Path, url: str, sent: bool
) -> None:
    if sent:
        client = NodeClient(url=url, state=str(state))
        assert client.key == "gvk_admin_secret"
        # reached directly, whatever HTTP_PROXY says: the key never passes through a proxy
        assert client.http.trust_env is False
        return
    with pytest.raises(ConfigError) as caught:
        NodeClient(url=url, state=str(state))
    assert caught.value.message.startswith(f"no API key for {url}: the admin key in ")
    assert "is not sent to another machine" in caught.value.message
    # a key given for that node is used, through a proxy if the environment names one
    remote = NodeClient(url=url, key="gvk_remote", state=str(state))
    assert remote.key == "gvk_remote" and remote.http.trust_env is True


@pytest.mark.parametrize("api", ["/api/v1", "/v2", "/api/v1/"])
def test_an_api_address_given_as_the_node_url_says_which_to_give(state: Path, api: str) -> None:
    """The banner prints the admin API's address; pasted as --url it would become
    /api/v1/api/v1/... and answer 'no such endpoint'."""
    with pytest.raises(ConfigError) as refused:
        NodeClient(url=f"http://127.0.0.1:8700{api}", state=str(state))
    assert "not of the node: give --url (or GPUVISOR_URL) as http://127.0.0.1:8700," in str(
        refused.value
    )


def test_https_to_a_plain_http_node_says_so(state: Path) -> None:
    """A node serves plain HTTP: https:// to it fails in the TLS handshake, which is not a
    node that is down."""
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        client = NodeClient(url=f"https://127.0.0.1:{port}", state=str(state), timeout=10)
        with pytest.raises(ConfigError) as refused:
            client.request("GET", "/api/v1/status")
    finally:
        server.shutdown()
        server.server_close()
    assert "does not speak TLS" in str(refused.value)
    assert f"use http://127.0.0.1:{port}" in str(refused.value)
