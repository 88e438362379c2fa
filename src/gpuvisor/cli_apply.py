"""`gpuvisor apply`: send manifests to a node, file by file (registered on the app in cli.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from gpuvisor.cli_options import (
    KeyOpt,
    PlainUsageError,
    StateOpt,
    UrlOpt,
    expand_home,
    fail,
    node_client,
    stdout_console,
)
from gpuvisor.errors import ConfigError, GpuvisorError, PayloadTooLarge

__all__ = ["apply_command"]


def apply_command(
    file: Annotated[
        list[str],
        typer.Option(
            "--filename",
            "-f",
            metavar="FILE",
            help="a YAML manifest, a directory (its *.yaml and *.yml files in name order, "
            "not its subdirectories) or '-' for stdin (once); repeat for more",
            callback=expand_home,
        ),
    ],
    url: UrlOpt = None,
    key: KeyOpt = None,
    state: StateOpt = None,
) -> None:
    """Apply manifests (Tenant, Profile, Pool, Model, Deployment): file by file, in the order
    given; each file is applied whole or not at all, and the first file that fails stops the
    rest (the files before it stay applied).

    A List document (what `get KIND -o yaml` or `-o json` prints) applies its items, in
    order."""
    if file.count("-") > 1:
        raise PlainUsageError("'-f -' is given more than once: stdin can be read only once")
    # every file is read before any is applied: a mistyped name applies nothing
    manifests = [_read_manifest(name, path) for name, path in _manifest_paths(file)]
    client, out = node_client(url, key, state), stdout_console()
    for index, (source, text, base) in enumerate(manifests):
        try:
            result = client.apply(text, source=source, base_dir=base)
        except GpuvisorError as exc:
            if isinstance(exc, PayloadTooLarge):  # the node cannot say which file it was
                exc = PayloadTooLarge(f"{source}: {exc.message}")
            if index == 0:
                fail(exc)
            fail(
                f"{exc.message} (nothing from {source} or the files after it was applied; "
                "the files before it were)"
            )
        for item in result["results"]:
            owner = f" (tenant {item['tenant']})" if item.get("tenant") else ""
            out.print(
                f"{item['kind'].lower()}/{item['name']}{owner} {item['outcome']}", highlight=False
            )
            for warning in item.get("warnings", ()):
                out.print(f"  warning: {warning}", highlight=False)
            for note in item.get("notes", ()):
                out.print(f"  {note}", highlight=False)


def _manifest_paths(names: list[str]) -> list[tuple[str, Path | None]]:
    """Return each ``-f`` as (name, path), a directory as its YAML files in name order and
    ``-`` as ("-", None); exit naming the first that is neither a file nor such a folder."""
    paths: list[tuple[str, Path | None]] = []
    for name in names:
        if name == "-":
            paths.append((name, None))
            continue
        path = Path(name)
        if path.is_dir():
            found = sorted(
                (p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()),
                key=lambda p: p.name,
            )
            if not found:
                fail(ConfigError(f"{name} is a directory with no *.yaml or *.yml file in it"))
            paths.extend((str(p), p) for p in found)
        elif path.is_file():
            paths.append((name, path))
        elif path.exists():
            fail(ConfigError(f"{name} is not a file: pass a YAML manifest, a directory or '-'"))
        else:
            fail(ConfigError(f"{name}: no such file"))
    return paths


def _read_manifest(name: str, path: Path | None) -> tuple[str, str, Path]:
    """Return (source, text, base directory) of one manifest (stdin when ``path`` is None)."""
    if path is None:
        return "stdin", sys.stdin.read(), Path.cwd()
    try:
        return name, path.read_text(), path.parent
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        fail(ConfigError(f"cannot read {name}: {reason}"))
