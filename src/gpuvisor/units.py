"""Sizes ("512Mi", "2Gi") and durations ("500us", "2ms") to numbers and back."""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Literal

from gpuvisor.quoting import quoted

__all__ = ["format_duration", "format_size", "parse_duration", "parse_size"]

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?|B)?\s*$")
# a number with no unit is seconds, as text too ("0.05"; 1e-1, which YAML reads as text)
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)\s*(ns|us|µs|ms|s|m|h)?\s*$")
_MAX_DIGITS = 30
"""Digits a written size or duration may have: far more than any real one needs, few enough
that reading it stays exact and cheap (Python refuses to read integers of over 4300 digits)."""
_MAX_QUOTED = 80


def parse_size(value: str | int | float) -> int:
    """Return a size in bytes from ``"512Mi"``, ``"2Gi"``, ``"1G"``, ``1024``.

    Raises ValueError naming the accepted units when the value cannot be read, and for a
    negative, infinite or NaN number. Fractions of a byte are dropped; no upper bound is
    applied here (``gpuvisor.spec.types.Size`` has one).
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a size like '512Mi' or '2Gi', got {value!r}")
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"a size must be a finite number of bytes, got {value!r}")
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {quoted(value, _MAX_QUOTED)}")
        return int(value)
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError(
            "expected a size like '512Mi' or '2Gi' (units B, K, M, G, T, Ki, Mi, Gi, Ti), "
            f"got {quoted(value, _MAX_QUOTED)}"
        )
    number, unit = match.groups()
    if len(number) > _MAX_DIGITS:
        raise ValueError(
            f"size {quoted(value, _MAX_QUOTED)} has too many digits (at most {_MAX_DIGITS})"
        )
    # exact arithmetic: through a float, 99999999999999999999999999Ti became 1.0000000000000000476e26Ti
    return int(Fraction(number) * _SIZE_UNITS[unit or ""])


def parse_duration(value: str | int | float) -> float:
    """Return a duration in seconds from ``"500us"``, ``"2ms"``, ``"1.5s"``; bare numbers are seconds.

    Raises ValueError naming the accepted units when the value cannot be read, and for a
    negative, infinite or NaN duration; no upper bound is applied here (``gpuvisor.spec.types.
    Duration`` has one).
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like '2ms' or '500us', got {value!r}")
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"a duration must be a finite number of seconds, got {value!r}")
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {quoted(value, _MAX_QUOTED)}")
        try:
            return float(value)
        except OverflowError:  # an int beyond the largest float
            raise ValueError(f"duration {quoted(value, _MAX_QUOTED)} is too long") from None
    match = _DURATION_RE.match(str(value))
    if not match:
        raise ValueError(
            "expected a duration like '2ms' or '500us' (units ns, us, ms, s, m, h), "
            f"got {quoted(value, _MAX_QUOTED)}"
        )
    number, unit = match.groups()
    if len(number) > _MAX_DIGITS:
        raise ValueError(
            f"duration {quoted(value, _MAX_QUOTED)} has too many digits (at most {_MAX_DIGITS})"
        )
    seconds = float(number) * _DURATION_UNITS[unit or "s"]
    if not math.isfinite(seconds):  # 1e400
        raise ValueError(f"duration {quoted(value, _MAX_QUOTED)} is too long")
    return seconds


def format_size(
    n_bytes: int | float, rounding: Literal["nearest", "up", "down"] = "nearest"
) -> str:
    """Return the shortest exact binary form of a size (``1073741824`` → ``"1Gi"``), else one
    decimal (``"1.5Gi"``): the nearest, or rounded ``up`` (never less than the size: an
    amount to raise a limit to, what is asked for) or ``down`` (never more: what is free)."""
    n = math.ceil(n_bytes) if rounding == "up" else int(n_bytes)
    for unit in ("Ti", "Gi", "Mi", "Ki"):
        factor = _SIZE_UNITS[unit]
        if n >= factor:
            if n % factor == 0:
                return f"{n // factor}{unit}"
            if rounding == "up":
                return f"{math.ceil(n * 10 / factor) / 10:.1f}{unit}"
            if rounding == "down":
                return f"{math.floor(n * 10 / factor) / 10:.1f}{unit}"
            return f"{n / factor:.1f}{unit}"
    return f"{n}"


def format_duration(seconds: float) -> str:
    """Return a readable duration: ``0.0005`` → ``"500us"``, ``0.002`` → ``"2ms"``, ``1.5`` → ``"1.5s"``."""
    if seconds >= 1:
        return f"{seconds:g}s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:g}ms"
    return f"{seconds * 1e6:g}us"
