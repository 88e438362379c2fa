"""What the CLI refuses before it talks to a node or opens a database: each refusal is one
``error:`` line (status 1) or a usage error (status 2), never a traceback, and nothing is
written."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpuvisor import logs
from gpuvisor.cli import app
from gpuvisor.cli_audit import parse_time
from gpuvisor.cli_options import choice_parser
from gpuvisor.cli_tables import render_table
from gpuvisor.client import DEFAULT_STATE, DEFAULT_URL
from gpuvisor.errors import ConfigError
from gpuvisor.launch import free_port
from gpuvisor.logs import LOG_LEVELS, configure_logging
from gpuvisor.store.db import check_database_url

runner = CliRunner()
NO_NODE = ["--url", "http://127.0.0.1:9", "--key", "gvk_x_y"]  # refused before any request


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """`up` configures the root logger of the process it runs in: put it back."""
    root = logging.getLogger()
    handlers, level, settings = root.handlers[:], root.level, logs.worker_log_environment()
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logs._settings.update(settings)


def _one_error_line(output: str) -> str:
    """The output as one line, checked to be a single ``error:`` line and no traceback."""
    assert "Traceback" not in output, output
    text = " ".join(output.split())  # the console wraps long lines
    assert text.startswith("error: ") and text.count("error:") == 1, output
    return text


def _up(tmp_path: Path, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["up", "--port", str(free_port()), "--no-demo", *args])
    return result.exit_code, result.output


# ---------------------------------------------------------------- usage errors (status 2)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["up", "--log-level", "verbose"], "--log-level must be one of DEBUG, INFO, WARNING"),
        (["up", "--log-format", "xml"], "--log-format must be one of text, json"),
        (["up", "--port", "99999"], "less than or equal to 65535"),
        (["up", "--port", "0"], "greater than or equal to 1"),
        (["get", "deployments", "-o", "wide", *NO_NODE], "-o must be one of table, yaml, json"),
        (["drain", "cpu-0", "--timeout", "700", *NO_NODE], "less than or equal to 600"),
        (["drain", "cpu-0", "--timeout", "0", *NO_NODE], "greater than or equal to 1"),
        (["apply", "-f", "-", "-f", "-", *NO_NODE], "'-f -' is given more than once"),
        (["bench", "isolation", "--quantum-ms", "-1"], "greater than or equal to 0.01"),
        (["bench", "sampler", "--period", "0"], "greater than or equal to 0.001"),
        (
            ["keys", "create", "--role", "boss", *NO_NODE],
            "--role must be one of tenant, operator, admin (not 'boss')",
        ),
    ],
)
def test_a_value_out_of_its_range_is_a_usage_error(
    args: list[str], expected: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    if args[0] == "up":  # were it accepted, a node of its own (the later --port wins)
        args = ["up", "--state", str(state), "--no-demo", "--port", str(free_port()), *args[1:]]
    result = runner.invoke(app, args, input="")
    assert not state.exists()
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split())
    assert "Value error" not in result.output and "Traceback" not in result.output


def test_log_level_is_any_case_and_the_format_a_choice() -> None:
    parse = choice_parser("--log-level", LOG_LEVELS, case_sensitive=False)
    assert [parse(v) for v in ("debug", "Warning", "ERROR")] == ["DEBUG", "WARNING", "ERROR"]
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        configure_logging("INFO", "xml")
    with pytest.raises(ValueError, match="unknown log level 'verbose'"):
        configure_logging("verbose", "text")


def test_help_names_the_limits_and_choices() -> None:
    def help_of(*command: str) -> str:
        result = runner.invoke(app, [*command, "-h"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        return " ".join(result.output.split())

    assert "at most 600" in help_of("drain")
    up = help_of("up")
    assert "--log-format [text|json]" in up and "1<=x<=65535" in up
    assert "DEBUG, INFO, WARNING, ERROR or CRITICAL" in up
    apply = help_of("apply")
    assert "each file is applied whole or not at all" in apply
    assert "the first file that fails stops the rest" in apply
    assert "*.yaml and *.yml files in name order" in apply
    for command, says in (
        ("get", "also filters slices"),
        ("describe", "the tenant of the model or deployment to show"),
        ("delete", "the tenant of the model or deployment to delete"),
    ):
        text = help_of(command)
        assert says in text, command
        assert "get also filters" not in text, command


# ---------------------------------------------------------------- audit list --since


def test_a_duration_before_the_first_date_is_one_line() -> None:
    with pytest.raises(ConfigError, match="further back than a date can go"):
        parse_time("100000000h", now=datetime(2026, 11, 21, tzinfo=UTC))
    result = runner.invoke(app, ["audit", "list", "--since", "100000000h", *NO_NODE])
    assert result.exit_code == 1
    assert "'100000000h' is further back than a date can go" in _one_error_line(result.output)


# ---------------------------------------------------------------- databases


def _not_a_database(tmp_path: Path) -> Path:
    path = tmp_path / "notdb.db"
    path.write_text("this is not a database\n")
    return path


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("bogus://x", "gpuvisor keeps its state in SQLite or PostgreSQL"),
        ("postgresql+nosuch://u@h/d", "no such database driver"),
        ("not a url", "is not a database URL"),
    ],
)
def test_a_url_that_is_no_database_is_named(url: str, expected: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=expected):
        check_database_url(url)
    state = tmp_path / "state"
    code, output = _up(tmp_path, "--db", url, "--state", str(state))
    assert code == 1 and expected in _one_error_line(output)
    assert not state.exists()
    verified = runner.invoke(app, ["audit", "verify", "--db", url])
    assert verified.exit_code == 1 and expected in _one_error_line(verified.output)


def test_a_password_in_the_url_is_not_repeated() -> None:
    with pytest.raises(ConfigError) as refused:
        check_database_url("mysql://user:s3cret@db/x")
    assert "s3cret" not in refused.value.message


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = _not_a_database(tmp_path)
    before = path.read_bytes()
    url = f"sqlite:///{path}"
    state = tmp_path / "state"
    code, output = _up(tmp_path, "--db", url, "--state", str(state))
    assert code == 1 and f"{path} is not a SQLite database" in _one_error_line(output)
    verified = runner.invoke(app, ["audit", "verify", "--db", url])
    assert verified.exit_code == 1
    assert f"{path} is not a SQLite database" in _one_error_line(verified.output)
    # the state dir's own database, damaged the same way
    state.mkdir()
    (state / "gpuvisor.db").write_bytes(before)
    verified = runner.invoke(app, ["audit", "verify", "--state", str(state)])
    assert verified.exit_code == 1 and "is not a SQLite database" in verified.output
    assert path.read_bytes() == before


def test_up_refuses_a_database_whose_directory_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    state = tmp_path / "state"
    code, output = _up(tmp_path, "--db", f"sqlite:///{missing}/x.db", "--state", str(state))
    assert code == 1
    assert f"the directory {missing} does not exist; create it first" in _one_error_line(output)
    assert not (tmp_path / "no").exists() and not state.exists()


def test_verify_names_a_missing_database_and_creates_none(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    result = runner.invoke(app, ["audit", "verify", "--db", f"sqlite:///{missing}"])
    assert result.exit_code == 1
    assert f"there is no database at {missing}" in _one_error_line(result.output)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- state directories


def test_up_refuses_a_state_dir_that_is_a_file(tmp_path: Path) -> None:
    somefile = tmp_path / "somefile"
    somefile.write_text("x")
    code, output = _up(tmp_path, "--state", str(somefile))
    assert code == 1
    assert f"state directory {somefile} is a file, not a directory" in _one_error_line(output)
    assert somefile.read_text() == "x"


def test_up_refuses_a_state_dir_it_cannot_create(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("x")  # a file where a parent directory would have to be
    code, output = _up(tmp_path, "--state", str(blocker / "state"))
    assert code == 1
    assert f"cannot create the state directory {blocker / 'state'}" in _one_error_line(output)
    if Path("/proc/self").is_dir():
        # refused when it is made, after device discovery (whose log line comes first)
        code, output = _up(tmp_path, "--state", "/proc/nope")
        assert code == 1 and "Traceback" not in output
        last = " ".join(output[output.index("error:") :].split())
        assert last.startswith("error: cannot create the state directory /proc/nope (")


# ---------------------------------------------------------------- delete, apply


def test_a_device_is_cordoned_or_drained_not_deleted() -> None:
    result = runner.invoke(app, ["delete", "device", "cpu-0", *NO_NODE])
    assert result.exit_code == 1
    text = _one_error_line(result.output)
    assert "gpuvisor cordon cpu-0" in text and "gpuvisor drain cpu-0" in text
    sliced = runner.invoke(app, ["delete", "slice", "retail/x/0", *NO_NODE])
    assert sliced.exit_code == 1 and "delete deployment" in _one_error_line(sliced.output)


def test_delete_lists_only_the_kinds_it_deletes() -> None:
    result = runner.invoke(app, ["delete", "widget", "x", *NO_NODE])
    assert result.exit_code == 1
    text = _one_error_line(result.output)
    assert "(expected one of deployments, models, pools, profiles, tenants)" in text
    assert "devices" not in text and "slices" not in text


def test_apply_names_a_directory_without_manifests(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a manifest")
    result = runner.invoke(app, ["apply", "-f", str(tmp_path), *NO_NODE])
    assert result.exit_code == 1
    assert "is a directory with no *.yaml or *.yml file in it" in _one_error_line(result.output)


def test_apply_reads_every_file_before_applying_any(tmp_path: Path) -> None:
    """A mistyped second name is refused before the first file reaches the node (here there
    is none: reaching it would say so instead)."""
    first = tmp_path / "a.yaml"
    first.write_text("apiVersion: gpuvisor/v1\nkind: Tenant\nmetadata: {name: a}\n")
    result = runner.invoke(
        app, ["apply", "-f", str(first), "-f", str(tmp_path / "typo.yaml"), *NO_NODE]
    )
    assert result.exit_code == 1
    assert "typo.yaml: no such file" in _one_error_line(result.output)


# ---------------------------------------------------------------- what is shown


def test_a_pool_selector_reads_as_labels() -> None:
    pools = [
        {"metadata": {"name": "gpus"}, "spec": {"selector": {"kind": "gpu", "model": "H100*"}}},
        {"metadata": {"name": "any"}, "spec": {"selector": {}}},
    ]
    table = render_table("pools", pools)
    selector = next(c for c in table.columns if c.header == "SELECTOR")
    assert [str(cell) for cell in selector.cells] == ["kind=gpu,model=H100*", "all"]


def test_the_banner_commands_carry_url_and_state_when_not_the_defaults(tmp_path: Path) -> None:
    from gpuvisor.serve import _cli_flags

    default_state = Path(DEFAULT_STATE).expanduser()
    assert _cli_flags(DEFAULT_URL, default_state) == ""
    assert _cli_flags("http://127.0.0.1:18741", default_state) == " --url http://127.0.0.1:18741"
    spaced = tmp_path / "my state"
    assert _cli_flags(DEFAULT_URL, spaced) == f" --state '{spaced}'"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["bench", "batching", "--model", "nope"], "--model 'nope' is not a demo model; known:"),
        (["bench", "decisions", "-o", "/proc/nope/x.json"], "cannot write the results to"),
        (["bench", "overhead", "-o", "/proc/nope/x.json"], "Pass another --output"),
    ],
)
def test_a_benchmark_refuses_what_it_cannot_do_before_it_runs(
    args: list[str], expected: str
) -> None:
    """One error line at once, not a traceback after minutes of measuring."""
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert expected in _one_error_line(result.output)


def test_three_slashes_to_an_absolute_folder_get_the_four_slash_form(tmp_path: Path) -> None:
    """sqlite:///tmp/x.db is tmp/x.db in the current folder; the folder meant exists as
    /tmp: the refusal gives the URL that names it."""
    relative = str(tmp_path / "x.db").lstrip("/")
    with pytest.raises(ConfigError) as refused:
        check_database_url(f"sqlite:///{relative}")
    assert f"for /{relative}, write sqlite:////{relative})" in refused.value.message
    assert "sqlite:/// takes a path relative to the current folder" in refused.value.message


def test_a_folder_given_as_the_configuration_file_is_named_as_a_folder(tmp_path: Path) -> None:
    state = tmp_path / "state"
    code, output = _up(tmp_path, "-c", str(tmp_path), "--state", str(state))
    assert code == 1
    assert f"{tmp_path} is a folder: -c/--config takes the node configuration file" in (
        _one_error_line(output)
    )
    assert not state.exists()
