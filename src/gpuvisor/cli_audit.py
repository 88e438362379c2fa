"""`gpuvisor audit`: list a running node's audit records, and verify the hash chain straight
from the database (offline; registered on the app in cli.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from gpuvisor.cli_options import (
    KeyOpt,
    OutputFormat,
    OutputOpt,
    StateOpt,
    UrlOpt,
    fail,
    print_data,
    stdout_console,
)
from gpuvisor.errors import ConfigError, GpuvisorError
from gpuvisor.quoting import printable
from gpuvisor.units import parse_duration

# gpuvisor.store.audit.NODE_ROLE, written out: the CLI starts without the store
_NODE_ROLE = "node"

__all__ = ["audit_app", "parse_time", "verify_command"]

err_console = Console(stderr=True)

audit_app = typer.Typer(
    help="The tamper-evident audit log: list records, verify the hash chain.",
    no_args_is_help=True,
)


def parse_time(value: str, now: datetime | None = None) -> datetime:
    """Return the time ``value`` names: RFC 3339 (``2026-11-21T13:00:00Z``; no zone is UTC)
    or a duration ago (``90s``, ``15m``, ``2h``). Raises ConfigError otherwise."""
    text = value.strip()
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        pass
    else:
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    try:
        ago = parse_duration(text)
    except ValueError:
        raise ConfigError(
            f"{value!r} is neither a time like 2026-11-21T13:00:00Z nor a duration ago like 2h"
        ) from None
    try:
        return (now or datetime.now(UTC)) - timedelta(seconds=ago)
    except OverflowError:  # before the year 1 (or after 9999, for a negative duration)
        raise ConfigError(
            f"{value!r} is further back than a date can go: pass a time like "
            "2026-11-21T13:00:00Z, or a shorter duration"
        ) from None


@audit_app.command("list")
def list_command(
    actor: Annotated[
        str | None, typer.Option(metavar="KEY_ID", help="key id, e.g. gvk_ab12cd34")
    ] = None,
    tenant: Annotated[
        str | None,
        typer.Option("--tenant", "-t", metavar="TENANT", help="the tenant the action concerns"),
    ] = None,
    action: Annotated[
        str | None,
        typer.Option(
            help="apply, delete, key.create, key.revoke, device.cordon, device.uncordon, "
            "model.load, model.unload, authenticate or request"
        ),
    ] = None,
    result: Annotated[str | None, typer.Option(help="ok, denied or failed")] = None,
    since: Annotated[
        str | None, typer.Option(help="from this time (RFC 3339) or this long ago (2h)")
    ] = None,
    until: Annotated[str | None, typer.Option(help="before this time, or this long ago")] = None,
    limit: Annotated[
        int, typer.Option(min=1, max=1000, metavar="N", help="the newest this many")
    ] = 100,
    url: UrlOpt = None,
    key: KeyOpt = None,
    state: StateOpt = None,
    output: OutputOpt = OutputFormat.table,
) -> None:
    """List the node's audit records, oldest first (admin and operator keys only)."""
    from rich.table import Table

    from gpuvisor.client import NodeClient

    params: dict[str, Any] = {"limit": limit}
    for name, value in (("actor", actor), ("tenant", tenant), ("action", action)):
        if value:
            params[name] = value
    if result:
        params["result"] = result
    try:
        for name, value in (("since", since), ("until", until)):
            if value:
                params[name] = parse_time(value).isoformat()
        data = NodeClient(url, key, state).request("GET", "/api/v1/audit", params=params)
    except GpuvisorError as exc:
        fail(exc)
    if output != OutputFormat.table:
        print_data(data, output)
        return
    table = Table(box=None, header_style="bold")
    for column in ("SEQ", "TIME", "ACTOR", "ROLE", "TENANT", "ACTION", "OBJECT", "RESULT"):
        table.add_column(column)
    table.add_column("REASON", overflow="fold")
    for r in data["items"]:
        obj = "/".join(part for part in (r["object_kind"], r["object_name"]) if part)
        cells = (
            str(r["seq"]),
            r["at"][:19] + "Z",
            f"gvk_{r['actor']}" if r["actor"] else ("node" if r["role"] == _NODE_ROLE else "-"),
            r["role"] or "-",
            r["tenant"] or "-",
            r["action"],
            obj or "-",
            r["result"],
            r["reason"],
        )
        table.add_row(*(Text(printable(cell)) for cell in cells))  # text, never markup
    stdout_console().print(table)


@audit_app.command("verify")
def verify_command(
    state: StateOpt = None,
    db: Annotated[
        str | None,
        typer.Option(
            "--db", help="database URL (the node's --db); default sqlite in the state dir"
        ),
    ] = None,
    anchor: Annotated[
        str | None,
        typer.Option(help="SEQ:HASH of a head noted earlier, which must still be in the chain"),
    ] = None,
) -> None:
    """Check the audit log's hash chain in the database itself (no node needed).

    Exits 0 when the chain is intact, 1 naming the first bad record otherwise."""
    from sqlalchemy.exc import SQLAlchemyError

    from gpuvisor.store.audit import AuditLog
    from gpuvisor.store.db import check_database_url

    try:
        anchored = _parse_anchor(anchor) if anchor else None
        # opening a database creates what is missing: a wrong path must not make one
        url = check_database_url(db, must_exist=True) if db else _state_db_url(state)
        log = AuditLog.open(url)
        try:
            report = log.verify(anchor=anchored)
        finally:
            log.close()
    except GpuvisorError as exc:
        fail(exc)
    except SQLAlchemyError as exc:  # a server that does not answer, a damaged file
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        fail(ConfigError(f"cannot read the audit log from the database: {reason}"))
    if not report.ok:
        err_console.print(
            Text.assemble(
                ("audit log tampered:", "red"),
                f" {report.problem} "
                f"({report.records} record{'' if report.records == 1 else 's'} before it intact)",
            ),
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)
    checked = f"; anchor {anchored[0]} matches" if anchored else ""
    stdout_console().print(
        f"audit log intact: {report.records} record{'' if report.records == 1 else 's'}"
        f"{checked}; head "
        f"{report.head_seq}:{report.head_hash}\n"
        "(keep the head elsewhere and pass it as --anchor later to detect a cut tail)",
        highlight=False,
        soft_wrap=True,
    )


def _state_db_url(state: str | None) -> str:
    from gpuvisor.client import resolve_state_dir
    from gpuvisor.store.db import check_database_url, default_url

    state_dir = resolve_state_dir(state)
    path = Path(state_dir) / "gpuvisor.db"
    if not path.is_file():
        raise ConfigError(
            f"no database at {path}: pass the node's --state, or --db URL for PostgreSQL"
        )
    url = default_url(state_dir)
    try:
        return check_database_url(url, must_exist=True)
    except ConfigError:
        raise ConfigError(
            f"{path} is not a SQLite database: pass the node's --state, or its --db URL"
        ) from None


def _parse_anchor(text: str) -> tuple[int, str]:
    seq, _, digest = text.partition(":")
    if not seq.isdigit() or len(digest) != 64:
        raise ConfigError(
            f"--anchor {text!r}: expected SEQ:HASH as printed by 'gpuvisor audit verify'"
        )
    return int(seq), digest.lower()
