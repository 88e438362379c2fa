"""Options and output shared by the CLI's commands: node address, key, tenant, output format,
and how data and errors are printed.

Everything printed here comes from somewhere else (the node, a manifest, the user), so it is
never read as rich markup: ``[old]`` in a path or ``gpuvisor[bench]`` in a message stays.
Kept light to import: ``gpuvisor --help`` and ``gpuvisor version`` load this module.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.text import Text

from gpuvisor.errors import GpuvisorError, NotFound
from gpuvisor.quoting import printable

if TYPE_CHECKING:
    from gpuvisor.client import NodeClient

__all__ = [
    "KeyOpt",
    "OutputFormat",
    "OutputOpt",
    "PlainUsageError",
    "StateOpt",
    "TenantOpt",
    "UrlOpt",
    "check_tenant_exists",
    "choice_parser",
    "count_option",
    "expand_home",
    "fail",
    "node_client",
    "print_data",
    "run_bench",
    "stdout_console",
    "tenant_option",
]


def expand_home(value: Any) -> Any:
    """A path option (or each of a repeated one) with ``~`` expanded where the shell left it
    as it is: ``--out=~/keys``, a quoted path, a service file. ``-`` (stdin) stays."""
    if isinstance(value, list):
        return [expand_home(v) for v in value]
    if isinstance(value, Path):
        return value.expanduser()
    if isinstance(value, str) and value.startswith("~"):
        return os.path.expanduser(value)
    return value


def count_option(help: str, minimum: int = 1, maximum: int | None = None) -> Any:
    """A whole-number option shown as ``N``, at least ``minimum`` (and at most ``maximum``):
    use as ``Annotated[int, count_option("requests per run")] = 4000``."""
    return typer.Option(metavar="N", min=minimum, max=maximum, help=help)


UrlOpt = Annotated[
    str | None,
    typer.Option(
        "--url",
        metavar="URL",
        help="node URL [env GPUVISOR_URL; default http://127.0.0.1:8700]",
    ),
]
KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--key",
        metavar="KEY",
        help="API key [env GPUVISOR_KEY; default the state dir's admin key]",
    ),
]
StateOpt = Annotated[
    str | None,
    typer.Option(
        "--state",
        metavar="DIR",
        help="state directory [env GPUVISOR_STATE; default ~/.gpuvisor]",
    ),
]


class PlainUsageError(typer.BadParameter):
    """A usage error (exit status 2) whose message is printed as it is written: typer would
    put ``Invalid value for '--output' / '-o':`` and its validator's wording around it."""

    def format_message(self) -> str:
        return self.message


def choice_parser(flag: str, choices: tuple[str, ...], *, case_sensitive: bool = True) -> Any:
    """Return a ``parser=`` for an option that takes one of ``choices``: it returns the
    choice as written in ``choices`` and refuses anything else with the usage error
    ``FLAG must be one of A, B, C``."""
    by_key = {(c if case_sensitive else c.casefold()): c for c in choices}

    def parse(value: Any) -> Any:
        text = str(value.value if isinstance(value, StrEnum) else value)
        found = by_key.get(text if case_sensitive else text.casefold())
        if found is None:
            raise PlainUsageError(f"{flag} must be one of {', '.join(choices)} (not {text!r})")
        return found

    return parse


class OutputFormat(StrEnum):
    """What ``-o`` accepts."""

    table = "table"
    yaml = "yaml"
    json = "json"


_parse_output_name = choice_parser("-o", tuple(OutputFormat))


def _parse_output(value: Any) -> OutputFormat:
    return OutputFormat(_parse_output_name(value))


OutputOpt = Annotated[
    OutputFormat,
    typer.Option(
        "--output",
        "-o",
        metavar="[table|yaml|json]",
        parser=_parse_output,
        help="how to print; one object prints as yaml or json",
    ),
]


def tenant_option(help: str) -> Any:
    """A ``--tenant/-t TENANT`` option whose help says what it does for this command."""
    return typer.Option("--tenant", "-t", metavar="TENANT", help=help)


TenantOpt = Annotated[
    str | None, tenant_option("the tenant of models and deployments; also filters slices")
]

# Wider than any row: rich folds a table to the console's width, 80 columns when stdout is a
# pipe, and `gpuvisor get slices | grep ID` must see each row on one line.
_UNWRAPPED_WIDTH = 1 << 16

# The admin API names its query parameter; a CLI user passes the option instead.
_API_TENANT_HINT = "add ?tenant=NAME"
_CLI_TENANT_HINT = "pass -t TENANT"

_err_console = Console(stderr=True)

# The first 16 bytes of every SQLite 3 database file.


def stdout_console() -> Console:
    """Return a console for what a command prints on stdout: no markup, and no wrapping when
    stdout is not a terminal (a terminal keeps its width)."""
    console = Console(markup=False)
    if not console.is_terminal:
        console.width = _UNWRAPPED_WIDTH
    return console


def print_data(data: Any, output: OutputFormat) -> None:
    """Print ``data`` as JSON, or as YAML for any other format (one object has no table)."""
    if output == OutputFormat.json:
        stdout_console().print_json(json.dumps(data, default=str))
        return
    import yaml  # only the commands that print YAML pay for it

    # verbatim: the YAML is data, and must read back as what the node sent
    sys.stdout.write(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))


def cli_message(message: str) -> str:
    """Return an error message with the API's advice put in the CLI's terms."""
    return message.replace(_API_TENANT_HINT, _CLI_TENANT_HINT)


def fail(error: GpuvisorError | str) -> NoReturn:
    """Print ``error: MESSAGE`` on stderr and exit with status 1."""
    message = error if isinstance(error, str) else error.message
    line = Text.assemble(("error:", "red"), " ", printable(cli_message(message), newlines=True))
    _err_console.print(line, highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def check_tenant_exists(client: NodeClient, tenant: str) -> None:
    """Raise NotFound ``unknown tenant 'NAME'`` when the node has no such tenant.

    For a list whose route does not check the tenant (slices, keys) that came back empty: none of
    an unknown tenant's is not "none". Any other answer (a key that may not read the tenant)
    leaves the empty list as the answer."""
    from urllib.parse import quote

    try:
        client.request("GET", f"/api/v1/tenants/{quote(tenant, safe='')}")
    except NotFound:
        raise NotFound(f"unknown tenant '{tenant}' (`gpuvisor get tenants` lists them)") from None
    except GpuvisorError:
        pass


def node_client(url: str | None, key: str | None, state: str | None) -> NodeClient:
    """Return a client of the node at ``url`` (or the one whose state is ``state``); exit
    with the reason when there is none to talk to."""
    from gpuvisor.client import NodeClient

    try:
        return NodeClient(url, key, state)
    except GpuvisorError as exc:
        fail(exc)


def run_bench(command: Callable[[], int], output: Path) -> None:
    """Run a benchmark once its results file is known to be writable; a GpuvisorError ends it
    cleanly, with its message."""
    from gpuvisor.bench.loadgen import check_results_path

    try:
        check_results_path(output)
        code = command()
    except GpuvisorError as exc:
        fail(exc)
    raise typer.Exit(code)
