"""The README's command overview stays what `gpuvisor --help` says: every command, each
with the start of its own help line."""

from __future__ import annotations

import re
from pathlib import Path

import typer
from typer.main import get_command

from gpuvisor.cli import app

README = Path(__file__).resolve().parents[2] / "README.md"
_LINE = re.compile(r"^  ([a-z]+)\s{2,}(.+?)(\.\.\.)?$")


def _readme_commands() -> dict[str, tuple[str, bool]]:
    block = README.read_text().split("$ gpuvisor --help\n", 1)[1].split("```", 1)[0]
    listed = block.split("Commands:\n", 1)[1]
    found = {}
    for line in listed.splitlines():
        match = _LINE.match(line)
        assert match, f"README: not a command line: {line!r}"
        found[match[1]] = (match[2], bool(match[3]))
    return found


def test_the_readme_lists_every_command_with_the_start_of_its_help() -> None:
    group = get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    live = {
        name: (command.get_short_help_str(limit=10_000), command.hidden)
        for name, command in group.commands.items()
    }
    readme = _readme_commands()
    assert sorted(readme) == sorted(name for name, (_, hidden) in live.items() if not hidden)
    for name, (text, cut) in readme.items():
        help_line = live[name][0]
        if cut:  # the terminal's width cut it short
            assert help_line.startswith(text), (name, text, help_line)
        else:
            assert help_line == text, (name, text, help_line)
