"""The CLI against a running demo node: an unknown tenant is an error rather than an empty
list, a directory applies its manifests in name order, a failing file stops the files after
it, and a Pool's selector reads as labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpuvisor.cli import app
from gpuvisor.launch import NodeProcess

runner = CliRunner()


@pytest.mark.parametrize(
    "command",
    [
        ["get", "deployments", "-t", "nosuch"],
        ["get", "models", "-t", "nosuch", "-o", "json"],
        ["get", "slices", "-t", "nosuch"],
        ["keys", "list", "-t", "nosuch"],
    ],
)
def test_an_unknown_tenant_is_an_error_not_an_empty_list(
    command: list[str], env: dict[str, str]
) -> None:
    result = runner.invoke(app, command, env=env)
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: unknown tenant 'nosuch'")
    assert result.output.count("\n") == 1


def test_a_tenant_with_nothing_lists_nothing(env: dict[str, str], tmp_path: Path) -> None:
    manifest = tmp_path / "quiet.yaml"
    manifest.write_text("apiVersion: gpuvisor/v1\nkind: Tenant\nmetadata: {name: quiet}\n")
    assert runner.invoke(app, ["apply", "-f", str(manifest)], env=env).exit_code == 0
    try:
        for command in (["get", "deployments"], ["get", "slices"], ["keys", "list"]):
            result = runner.invoke(app, [*command, "-t", "quiet", "-o", "json"], env=env)
            assert result.exit_code == 0, (command, result.output)
            assert json.loads(result.output)["items"] == []
    finally:
        runner.invoke(app, ["delete", "tenant", "quiet"], env=env)


def test_a_tenant_key_lists_its_own_tenant(env: dict[str, str], demo_node: NodeProcess) -> None:
    key = demo_node.tenant_key("retail")
    mine = runner.invoke(app, ["get", "deployments", "-t", "retail", "--key", key], env=env)
    assert mine.exit_code == 0 and "shelf-detector" in mine.output
    other = runner.invoke(app, ["get", "deployments", "-t", "nosuch", "--key", key], env=env)
    assert other.exit_code == 1 and "not found" in other.output


def _tenant(name: str) -> str:
    return f"apiVersion: gpuvisor/v1\nkind: Tenant\nmetadata: {{name: {name}}}\n"


def test_a_directory_applies_its_manifests_in_name_order(
    env: dict[str, str], tmp_path: Path
) -> None:
    folder = tmp_path / "manifests"
    folder.mkdir()
    (folder / "b.yml").write_text(
        "apiVersion: gpuvisor/v1\nkind: Pool\nmetadata: {name: cpus}\n"
        "spec: {selector: {kind: cpu}}\n"
    )
    (folder / "a.yaml").write_text(_tenant("dir-a"))
    (folder / "notes.txt").write_text("not a manifest")
    (folder / "sub").mkdir()
    (folder / "sub" / "c.yaml").write_text(_tenant("dir-c"))
    try:
        result = runner.invoke(app, ["apply", "-f", str(folder)], env=env)
        assert result.exit_code == 0, result.output
        assert result.output.splitlines() == ["tenant/dir-a created", "pool/cpus created"]
        pools = runner.invoke(app, ["get", "pools"], env=env)
        row = next(line for line in pools.output.splitlines() if line.startswith("cpus "))
        assert "kind=cpu" in row and "{" not in row
    finally:
        runner.invoke(app, ["delete", "tenant", "dir-a"], env=env)
        runner.invoke(app, ["delete", "pool", "cpus"], env=env)


def test_the_first_failing_file_stops_the_rest(env: dict[str, str], tmp_path: Path) -> None:
    first, bad, last = tmp_path / "1.yaml", tmp_path / "2.yaml", tmp_path / "3.yaml"
    first.write_text(_tenant("file-one"))
    bad.write_text(_tenant("file-two") + "spec: {weight: heavy}\n")
    last.write_text(_tenant("file-three"))
    try:
        args = ["apply", "-f", str(first), "-f", str(bad), "-f", str(last)]
        result = runner.invoke(app, args, env=env)
        assert result.exit_code == 1
        # named as given: several -f folders may each hold a 2.yaml
        output = " ".join(result.output.split())
        assert output.startswith(f"tenant/file-one created error: {bad} doc 1"), output
        assert f"nothing from {bad} or the files after it was applied" in output
        tenants = runner.invoke(app, ["get", "tenants", "-o", "json"], env=env)
        names = {t["metadata"]["name"] for t in json.loads(tenants.output)["items"]}
        assert "file-one" in names and not {"file-two", "file-three"} & names
    finally:
        runner.invoke(app, ["delete", "tenant", "file-one"], env=env)


def test_a_manifest_over_the_nodes_limit_is_named(env: dict[str, str], tmp_path: Path) -> None:
    small = tmp_path / "small.yaml"
    small.write_text("apiVersion: gpuvisor/v1\nkind: Tenant\nmetadata: {name: cli-small}\n")
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 500_000 + small.read_text())  # 5 MB, over the 4Mi limit
    result = runner.invoke(app, ["apply", "-f", str(small), "-f", str(big)], env=env)
    assert result.exit_code == 1
    output = " ".join(result.output.split())
    assert f"error: {big}: request body is over the limit of 4Mi" in output, output
    assert f"nothing from {big} or the files after it was applied" in output


def test_an_admin_key_of_another_node_says_where_it_was_read(
    env: dict[str, str], demo_node: NodeProcess, tmp_path: Path
) -> None:
    """--state of one node and --url of another: the node does not know the key, and the
    error says which file the key came from."""
    other = tmp_path / "other-state"
    other.mkdir()
    (other / "admin.key").write_text("gvk_abcdefgh_notthisnodessecret\n")
    plain = {k: v for k, v in env.items() if k not in ("GPUVISOR_KEY", "GPUVISOR_STATE")}
    result = runner.invoke(
        app, ["get", "slices", "--state", str(other), "--url", demo_node.url], env=plain
    )
    assert result.exit_code == 1
    output = " ".join(result.output.split())
    assert output.startswith("error: unknown API key (no key gvk_abcdefgh with this secret)")
    assert (
        f"the key is the admin key in {other / 'admin.key'}: is {demo_node.url} the node" in output
    )
    # a key given on the command line is the operator's own choice: nothing to add
    given = runner.invoke(
        app, ["get", "slices", "--key", "gvk_abcdefgh_x", "--url", demo_node.url], env=plain
    )
    assert given.exit_code == 1 and "admin key in" not in given.output
