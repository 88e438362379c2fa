"""Quoting what a user sent in an error message, cut short: a message must never carry (or
spend time rendering) a huge input, such as a value YAML aliases blew up or a number of
thousands of digits. Used by the units parser and the spec's validators alike."""

from __future__ import annotations

import reprlib
from typing import Any

__all__ = ["printable", "printable_data", "quoted", "shorten"]

_MAX_QUOTED = 200
"""The most characters of an input an error message quotes."""

_QUOTE = reprlib.Repr()
_QUOTE.maxlevel, _QUOTE.maxstring, _QUOTE.maxother = 3, _MAX_QUOTED, _MAX_QUOTED
_QUOTE.maxlist = _QUOTE.maxtuple = _QUOTE.maxdict = _QUOTE.maxset = 8


def quoted(value: Any, limit: int = _MAX_QUOTED) -> str:
    """Return ``repr(value)`` cut to ``limit`` characters, for error messages.

    Costs the same for a value of any size: nested containers are shown a few items and
    levels deep, so a value YAML aliases blew up cannot make the message huge or slow.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return "a huge number"  # str() refuses integers of over 4300 digits
    return shorten(_QUOTE.repr(value), limit)


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str, newlines: bool = False) -> str:
    """``text`` with its control characters escaped (a newline as ``\\n``, ESC as
    ``\\u001b``), for a log line or a terminal: a name a client chose (``x%0A…`` or
    ``\\e[2J`` in a URL) must not start a line of its own, nor clear or recolour the screen
    of the operator reading it. ``newlines``: keep newlines (a multi-line message)."""
    if text.isprintable():
        return text
    return "".join(
        c
        if c.isprintable() or c == " " or (newlines and c == "\n")
        else _ESCAPES.get(c, f"\\u{ord(c):04x}")
        for c in text
    )


def printable_data(data: Any) -> Any:
    """``data`` (decoded JSON) with every string in it ``printable``: for a view that shows
    what tenants named."""
    if isinstance(data, str):
        return printable(data)
    if isinstance(data, list):
        return [printable_data(v) for v in data]
    if isinstance(data, dict):
        return {k: printable_data(v) for k, v in data.items()}
    return data


def shorten(text: str, limit: int = 60) -> str:
    """Return ``text`` cut to ``limit`` characters, for a name or key of the input in a message."""
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."
