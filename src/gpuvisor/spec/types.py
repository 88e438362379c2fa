"""Field types shared by every kind: sizes, durations, names, and the base model config."""

from __future__ import annotations

import math
import re
from datetime import date
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AllowInfNan, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from gpuvisor.quoting import quoted, shorten
from gpuvisor.units import parse_duration, parse_size

__all__ = [
    "FIELD_ERROR",
    "MAX_COUNT",
    "MAX_DURATION",
    "MAX_SIZE",
    "AutoFlag",
    "Count",
    "Dimension",
    "DnsLabel",
    "Duration",
    "ModelVersion",
    "Number",
    "Sha256Digest",
    "Size",
    "SpecModel",
    "field_error",
    "quoted",
    "shorten",
]

MAX_SIZE = 2**63 - 1
"""Largest size a field takes, in bytes (8Ei): what a signed 64-bit integer holds, as the
database, JSON readers and NVML's counters do; no real memory comes near it."""
MAX_DURATION = 30 * 24 * 3600.0
"""Longest duration a field takes: 30 days. Every duration in the spec is a delay, timeout,
period or objective that is useless beyond hours; a bound keeps deadlines and timers finite."""
MAX_COUNT = 1_000_000
"""Largest count a field takes (batch sizes, quotas, queue caps, devices, threads): far above
what one node holds, so a typo cannot make the node allocate per-item state until it dies."""
MAX_DIMENSION = 2**63 - 1
"""Largest tensor dimension: ONNX and torch store dimensions as 64-bit integers."""

FIELD_ERROR = "invalid_field"
"""Error type of :func:`field_error`; the loader appends ``ctx["field"]`` to the error's path."""

_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_LABEL_MAX = 63
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class SpecModel(BaseModel):
    """Base of every spec model: camelCase in YAML, snake_case in Python, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)


def field_error(field: str, message: str) -> PydanticCustomError:
    """Return an error a model validator raises to blame ``field`` (a camelCase path below it).

    Pydantic puts errors raised by a model validator on the model itself; the loader reads
    ``ctx["field"]`` to point the operator at the field that is actually wrong.
    """
    return PydanticCustomError(FIELD_ERROR, "{message}", {"field": field, "message": message})


def _to_bytes(value: Any) -> Any:
    """Read ``"512Mi"``, ``"2Gi"`` or a number of bytes; leave other types to pydantic's error."""
    if isinstance(value, (str, int, float)):
        return parse_size(value)
    return value


def _to_seconds(value: Any) -> Any:
    """Read ``"500us"``, ``"2ms"`` or a number of seconds; leave other types to pydantic's error.
    One beyond ``MAX_DURATION`` is refused here, in the words it was written in."""
    if isinstance(value, (str, int, float)):
        seconds = parse_duration(value)
        if isinstance(seconds, float) and math.isfinite(seconds) and seconds > MAX_DURATION:
            raise ValueError(
                f"{quoted(value)} is longer than the longest duration accepted, "
                f"{MAX_DURATION / 3600:g}h (30 days)"
            )
        return seconds
    return value


def _size_in_range(value: int) -> int:
    if value > MAX_SIZE:
        raise ValueError(
            f"{quoted(value)} bytes is more than the largest size accepted, "
            f"{MAX_SIZE} bytes (2^63 - 1)"
        )
    return value


def _duration_in_range(value: float) -> float:
    if value > MAX_DURATION:
        raise ValueError(
            f"{value:g}s is longer than the longest duration accepted, "
            f"{MAX_DURATION / 3600:g}h (30 days)"
        )
    return value


def _whole_number(value: Any) -> Any:
    """Refuse a boolean or text where a count belongs; pydantic would read true as 1, "2" as 2."""
    if isinstance(value, bool):
        raise ValueError(
            f"expected a whole number, got the boolean {str(value).lower()} "
            "(YAML reads true, false, yes, no, on and off as booleans)"
        )
    if isinstance(value, str):
        raise ValueError(
            f"expected a whole number, got the text {quoted(value)}: write it without quotes"
        )
    return value


def _count(value: Any) -> Any:
    """Refuse what is not a count, or a count above ``MAX_COUNT``, before pydantic reads it
    (a float as large as ``1.0e+30`` would get pydantic's message about parsing strings)."""
    value = _whole_number(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value}")
    if isinstance(value, (int, float)) and value > MAX_COUNT:
        raise ValueError(f"must be at most {MAX_COUNT}, got {quoted(value)}")
    return value


def _not_boolean(value: Any) -> Any:
    """Refuse a boolean where a number belongs; pydantic would read true as 1.0.

    Text is left to pydantic, which reads "1e-5": YAML 1.1 reads an exponent without a dot
    (``computeShare: 1e-2``) as text, not as a number.
    """
    if isinstance(value, bool):
        raise ValueError(
            f"expected a number, got the boolean {str(value).lower()} "
            "(YAML reads true, false, yes, no, on and off as booleans)"
        )
    number = value
    if isinstance(value, str):  # text pydantic would read as a number: "inf", "NaN", "1e-5"
        try:
            number = float(value)
        except ValueError:
            return value
    if isinstance(number, float) and not math.isfinite(number):
        # before the field's bounds, which would say "less than or equal to 1 (got nan)"
        raise ValueError(f"must be a finite number, got {value}")
    return value


def _check_dns_label(value: str) -> str:
    """Refuse names that are not DNS-1123 labels, saying what a valid name looks like."""
    if len(value) > _DNS_LABEL_MAX or not _DNS_LABEL_RE.match(value):
        raise ValueError(
            f"{quoted(value)} is not a valid name: use lowercase letters, digits and '-', "
            f"starting and ending with a letter or digit, at most {_DNS_LABEL_MAX} characters "
            "(e.g. 'shelf-detector')"
        )
    return value


_TRUE_WORDS = frozenset({"true", "yes", "on"})
_FALSE_WORDS = frozenset({"false", "no", "off"})


def _to_auto_flag(value: Any) -> Any:
    """Read ``auto``, ``true`` or ``false`` (any case); refuse anything else with one clear message."""
    if isinstance(value, bool):
        return value
    word = value.strip().lower() if isinstance(value, str) else None
    if word == "auto":
        return "auto"
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise ValueError(f"expected true, false or auto, got {quoted(value)}")


def _version_as_text(value: Any) -> Any:
    """Accept ``version: 3`` as "3"; refuse ``version: 1.10``, which YAML already turned into 1.1."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, date):
        raise ValueError(f'version {value} was read as a date: quote it, e.g. version: "{value}"')
    if isinstance(value, float):
        raise ValueError(
            f"version {value!r} was read as a decimal number, which can lose digits "
            '(1.10 becomes 1.1): quote it as written, e.g. version: "1.10"'
        )
    return value


def _check_version(value: str) -> str:
    if not _VERSION_RE.match(value):
        raise ValueError(
            f"invalid version {quoted(value)}: use letters, digits, '.', '_' or '-' "
            "(e.g. '3' or '2024.06'), starting with a letter or digit"
        )
    return value


def _check_sha256(value: str) -> str:
    digest = value.strip().lower()
    if not _SHA256_RE.match(digest):
        raise ValueError(
            f"expected 64 hexadecimal characters (the output of 'sha256sum'), got {quoted(value)}"
        )
    return digest


Size = Annotated[int, BeforeValidator(_to_bytes), AfterValidator(_size_in_range)]
"""A size in bytes, at most ``MAX_SIZE``; YAML may say ``512Mi``, ``2Gi``, ``1G`` or a plain
number of bytes."""

Duration = Annotated[
    float, BeforeValidator(_to_seconds), AllowInfNan(False), AfterValidator(_duration_in_range)
]
"""A finite duration in seconds, at most ``MAX_DURATION``; YAML may say ``500us``, ``2ms``,
``1.5s`` or a plain number of seconds."""

Count = Annotated[int, BeforeValidator(_count)]
"""A whole number, at most ``MAX_COUNT``; a boolean or text (``"2"``) is refused."""

Number = Annotated[float, BeforeValidator(_not_boolean), AllowInfNan(False)]
"""A finite number; a boolean, NaN and infinity are refused."""

Dimension = Annotated[int, BeforeValidator(_whole_number), Field(ge=-1, le=MAX_DIMENSION)]
"""A tensor dimension: a whole number >= 0, or -1 for a variable one."""

DnsLabel = Annotated[str, AfterValidator(_check_dns_label)]
"""An object name: a DNS-1123 label (lowercase alphanumerics and '-', at most 63 characters)."""

AutoFlag = Annotated[Literal["auto"] | bool, BeforeValidator(_to_auto_flag)]
"""``auto`` (decide from what is found), ``true`` or ``false``."""

ModelVersion = Annotated[str, BeforeValidator(_version_as_text), AfterValidator(_check_version)]
"""A model version: "3", "2024.06", "v2-beta"; integers in YAML are accepted as text."""

Sha256Digest = Annotated[str, AfterValidator(_check_sha256)]
"""A SHA-256 digest as 64 lowercase hexadecimal characters (upper case is lowered)."""
