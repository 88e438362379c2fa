"""Command-line options shared by every command that talks to a running node."""

from __future__ import annotations

from typing import Annotated

import typer

__all__ = ["KeyOpt", "OutputOpt", "StateOpt", "TenantOpt", "UrlOpt"]

UrlOpt = Annotated[
    str | None,
    typer.Option("--url", help="node URL [env GPUVISOR_URL; default http://127.0.0.1:8700]"),
]
KeyOpt = Annotated[
    str | None,
    typer.Option("--key", help="API key [env GPUVISOR_KEY; default the state dir's admin key]"),
]
StateOpt = Annotated[
    str | None,
    typer.Option("--state", help="state directory [env GPUVISOR_STATE; default ~/.gpuvisor]"),
]
OutputOpt = Annotated[
    str, typer.Option("--output", "-o", help="table, yaml or json (one object: yaml or json)")
]
TenantOpt = Annotated[
    str | None, typer.Option("--tenant", "-t", help="tenant of tenant-scoped objects")
]
