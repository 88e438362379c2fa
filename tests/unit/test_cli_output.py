"""What the CLI prints: data and messages as they are (never rich markup), tables one row per
line when piped, YAML that reads back as the data."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from gpuvisor.cli import app
from gpuvisor.cli_options import OutputFormat, cli_message, print_data, stdout_console
from gpuvisor.cli_tables import render_table
from gpuvisor.top import render_top

runner = CliRunner()

BRACKETED = "models/[old]/x.onnx"
LONG_ID = "retail/" + "a-deployment-with-a-long-name-" * 4 + "x/0"


def _model(source: str) -> dict[str, Any]:
    return {
        "kind": "Model",
        "metadata": {"name": "scorer", "tenant": "retail"},
        "spec": {"version": "1", "format": "onnx", "source": source},
    }


def _slice(slice_id: str, reason: str = "") -> dict[str, Any]:
    return {
        "id": slice_id,
        "tenant": slice_id.split("/")[0],
        "device": "cpu-0",
        "state": "Ready",
        "pid": 4242,
        "restarts": 0,
        "queued": 0,
        "reason": reason,
    }


@pytest.mark.parametrize(
    "console",
    [Console(width=200), Console(width=200, markup=False)],
    ids=["markup console", "plain console"],
)
def test_table_cells_are_text_not_markup(console: Console) -> None:
    with console.capture() as captured:
        console.print(render_table("models", [_model(BRACKETED)]))
        console.print(render_table("slices", [_slice("retail/x/0", reason="[bold]oom[/bold]")]))
    text = captured.get()
    assert BRACKETED in text
    assert "[bold]oom[/bold]" in text


@pytest.mark.parametrize("output", [OutputFormat.yaml, OutputFormat.table])
def test_yaml_is_printed_verbatim(output: OutputFormat, capsys: pytest.CaptureFixture[str]) -> None:
    data = {"items": [_model(BRACKETED)], "note": "[red]not a style[/red] " + "x" * 200}
    print_data(data, output)
    assert yaml.safe_load(capsys.readouterr().out) == data


def test_json_keeps_brackets(capsys: pytest.CaptureFixture[str]) -> None:
    print_data({"source": BRACKETED}, OutputFormat.json)
    assert BRACKETED in capsys.readouterr().out


def test_a_piped_table_keeps_each_row_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """Not a terminal (pytest captures stdout): rows are not folded at 80 columns, so that
    `gpuvisor get slices | grep ID` finds the whole row."""
    assert not sys.stdout.isatty()
    reason = "cannot be placed: cpu-0: cordoned by an operator for a kernel update"
    stdout_console().print(render_table("slices", [_slice(LONG_ID, reason), _slice("b/c/0")]))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3  # the header and one line per slice
    assert LONG_ID in lines[1] and reason in lines[1]
    assert max(len(line) for line in lines) < 400  # only as wide as the rows need


def test_a_terminal_keeps_its_width() -> None:
    console = Console(force_terminal=True, color_system=None, width=90, markup=False)
    with console.capture() as captured:
        console.print(render_table("slices", [_slice(LONG_ID)]))
    assert max(len(line) for line in captured.get().splitlines()) <= 90


def test_top_shows_names_and_reasons_as_they_are() -> None:
    data = {
        "generatedAt": 1_800_000_000.0,
        "viewer": {"role": "admin", "tenant": None},
        "node": {"version": "0.1.0", "cluster": "[lab]"},
        "attention": [],
        "devices": [],
        "tenants": [],
        "deployments": [],
        "pending": [{"slice": "retail/[old]/0", "state": "Pending", "reason": "[b]no fit[/b]"}],
    }
    console = stdout_console()
    with console.capture() as captured:
        console.print(render_top(data, 120))
    text = captured.get()
    assert "retail/[old]/0" in text and "[b]no fit[/b]" in text and "[lab]" in text


def test_an_error_message_keeps_its_brackets(tmp_path: Path) -> None:
    missing = tmp_path / "gpuvisor[bench].yaml"
    result = runner.invoke(app, ["apply", "-f", str(missing), "--key", "gvk_x_y"])
    assert result.exit_code == 1
    assert f"error: {missing}: no such file" in result.output


def test_the_api_tenant_advice_is_put_in_cli_terms() -> None:
    assert (
        cli_message("Deployment objects belong to a tenant: add ?tenant=NAME")
        == "Deployment objects belong to a tenant: pass -t TENANT"
    )
    assert cli_message("tenant 'x' not found") == "tenant 'x' not found"


ESCAPE = "\x1b[2J\x1b[31mFAKE"  # clear the screen, then red: in a name a tenant chose


def test_escape_sequences_from_the_node_are_shown_not_sent_to_the_terminal(
    tmp_path: Path,
) -> None:
    """Names, paths and reasons a tenant chose reach an admin's terminal in tables, top, a
    deployment's description and error messages: shown escaped, never obeyed."""
    console = Console(width=200, force_terminal=False)
    with console.capture() as captured:
        console.print(render_table("models", [_model(f"/models/{ESCAPE}.onnx")]))
        console.print(render_table("slices", [_slice("retail/x/0", reason=ESCAPE)]))
        pending = [{"slice": f"retail/{ESCAPE}/0", "state": "Pending", "reason": ESCAPE}]
        data = {
            "generatedAt": 1_800_000_000.0,
            "viewer": {"role": "admin", "tenant": None},
            "node": {"version": "0.1.0", "cluster": "lab"},
            "attention": [{"level": "warning", "text": ESCAPE}],
            "devices": [],
            "tenants": [],
            "deployments": [],
            "pending": pending,
        }
        console.print(render_top(data, 120))
    text = captured.get()
    assert "\x1b" not in text
    assert text.count("\\u001b[2J\\u001b[31mFAKE") == 5
    missing = tmp_path / "x\x1b[2J.yaml"
    result = runner.invoke(app, ["apply", "-f", str(missing), "--key", "gvk_x_y"])
    assert "\x1b" not in result.output and "x\\u001b[2J.yaml: no such file" in result.output
