"""What the CLI accepts before it talks to a node: kinds, output formats, tenants, URLs, help;
and that starting it does not import the node's heavy dependencies."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import typer
from typer.testing import CliRunner

from gpuvisor import __version__
from gpuvisor.api.admin import PLURALS
from gpuvisor.cli import app
from gpuvisor.cli_objects import TENANT_SCOPED
from gpuvisor.client import NodeClient
from gpuvisor.errors import ConfigError, GpuvisorError
from gpuvisor.launch import free_port
from gpuvisor.spec.kinds import TENANT_SCOPED as SPEC_TENANT_SCOPED

runner = CliRunner()
NO_NODE = ["--url", "http://127.0.0.1:9", "--key", "gvk_x_y"]  # refused before any request


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["get", "deploymnets"], "unknown kind 'deploymnets': did you mean 'deployments'?"),
        (["get", "tenent"], "did you mean 'tenant'?"),
        (["describe", "modle", "x"], "did you mean 'model'?"),
        (["delete", "profiel", "x"], "did you mean 'profile'?"),
        (["get", "widgets"], "unknown kind 'widgets' (expected one of deployments, devices,"),
    ],
)
def test_an_unknown_kind_names_the_closest(args: list[str], expected: str) -> None:
    result = runner.invoke(app, [*args, *NO_NODE])
    assert result.exit_code == 1
    assert expected in result.output


@pytest.mark.parametrize("command", [["get", "slices"], ["status"], ["keys", "list"]])
@pytest.mark.parametrize("value", ["foo", "wide"])
def test_output_is_one_of_table_yaml_json(command: list[str], value: str) -> None:
    result = runner.invoke(app, [*command, "-o", value, *NO_NODE])
    assert result.exit_code == 2
    assert f"-o must be one of table, yaml, json (not '{value}')" in result.output


@pytest.mark.parametrize("kind", ["tenants", "profile", "pools", "devices"])
def test_tenant_is_refused_for_kinds_that_belong_to_no_tenant(kind: str) -> None:
    result = runner.invoke(app, ["get", kind, "-t", "retail", *NO_NODE])
    assert result.exit_code == 1
    assert "--tenant does not apply to" in result.output
    deleted = runner.invoke(app, ["delete", kind, "x", "-t", "retail", *NO_NODE])
    assert deleted.exit_code == 1


def test_the_cli_knows_which_kinds_belong_to_a_tenant() -> None:
    """cli_objects.TENANT_SCOPED repeats spec.kinds.TENANT_SCOPED (importing that costs pydantic)."""
    assert {plural for plural, kind in PLURALS.items() if kind in SPEC_TENANT_SCOPED} == set(
        TENANT_SCOPED
    )


def _help_texts() -> Iterator[tuple[str, str]]:
    root = typer.main.get_command(app)

    def walk(command: object, path: list[str]) -> Iterator[tuple[str, str]]:
        result = runner.invoke(app, [*path, "-h"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (path, result.output)
        yield " ".join(path), result.output
        for name, sub in getattr(command, "commands", {}).items():  # a group's commands
            yield from walk(sub, [*path, name])

    yield from walk(root, [])


def test_every_help_takes_h_and_names_values_plainly() -> None:
    seen = 0
    for path, text in _help_texts():
        seen += 1
        assert "Usage" in text and "-h, --help" in text, path
        for machine_word in ("<list[", "range>"):
            assert machine_word not in text, (path, machine_word)
    assert seen > 25
    keys = runner.invoke(app, ["keys", "list", "-h"], env={"COLUMNS": "200"})
    assert "only the keys of this tenant" in keys.output


def test_version_is_an_option_too() -> None:
    for args in (["--version"], ["version"]):
        result = runner.invoke(app, args)
        assert (result.exit_code, result.output) == (0, f"gpuvisor {__version__}\n")


def test_starting_the_cli_leaves_the_node_code_unloaded() -> None:
    """`gpuvisor version`, `--help`, `get` and `status` start without the store, the spec or
    the signing code: each of those took tenths of a second to import."""
    probe = (
        "import sys, gpuvisor.cli, gpuvisor.client\n"
        "heavy = ('sqlalchemy', 'alembic', 'pydantic', 'cryptography', 'numpy', 'asyncio',\n"
        "         'gpuvisor.store', 'gpuvisor.security.keys', 'gpuvisor.security.signing',\n"
        "         'gpuvisor.spec', 'gpuvisor.partition')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m.startswith(heavy)))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert loaded.strip() == "[]"


def test_a_url_without_a_scheme_is_plain_http() -> None:
    assert NodeClient("127.0.0.1:8700", key="k").url == "http://127.0.0.1:8700"
    assert NodeClient("localhost:8700/", key="k").url == "http://localhost:8700"
    assert NodeClient("https://node.example:443", key="k").url == "https://node.example:443"


def test_a_wrong_url_is_one_line_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"cannot use ftp://127\.0\.0\.1:9 as a node URL"):
        NodeClient("ftp://127.0.0.1:9", key="k").request("GET", "/api/v1/status")
    result = runner.invoke(app, ["status", "--url", "ftp://127.0.0.1:9", "--key", "k"])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "--url or GPUVISOR_URL" in result.output


class _NotANode(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<html>hello</html>"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_server_that_is_not_a_node_is_named() -> None:
    server = HTTPServer(("127.0.0.1", free_port()), _NotANode)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        with pytest.raises(GpuvisorError, match="not with JSON: is it a gpuvisor node"):
            NodeClient(f"127.0.0.1:{port}", key="k").request("GET", "/api/v1/status")
    finally:
        server.shutdown()
        server.server_close()


def test_the_cli_names_the_nodes_own_audit_role_as_the_store_does() -> None:
    from gpuvisor import cli_audit
    from gpuvisor.store.audit import NODE_ROLE

    assert cli_audit._NODE_ROLE == NODE_ROLE
