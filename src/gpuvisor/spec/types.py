"""Field types shared by every kind: sizes, durations, names, and the base model config."""

from __future__ import annotations

import re
from datetime import date
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from gpuvisor.units import parse_duration, parse_size

__all__ = [
    "FIELD_ERROR",
    "AutoFlag",
    "DnsLabel",
    "Duration",
    "ModelVersion",
    "Sha256Digest",
    "Size",
    "SpecModel",
    "field_error",
]

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
    """Read ``"500us"``, ``"2ms"`` or a number of seconds; leave other types to pydantic's error."""
    if isinstance(value, (str, int, float)):
        return parse_duration(value)
    return value


def _check_dns_label(value: str) -> str:
    """Refuse names that are not DNS-1123 labels, saying what a valid name looks like."""
    if len(value) > _DNS_LABEL_MAX or not _DNS_LABEL_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid name: use lowercase letters, digits and '-', "
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
    raise ValueError(f"expected true, false or auto, got {value!r}")


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
            f"invalid version {value!r}: use letters, digits, '.', '_' or '-' "
            "(e.g. '3' or '2024.06'), starting with a letter or digit"
        )
    return value


def _check_sha256(value: str) -> str:
    digest = value.strip().lower()
    if not _SHA256_RE.match(digest):
        raise ValueError(
            f"expected 64 hexadecimal characters (the output of 'sha256sum'), got {value!r}"
        )
    return digest


Size = Annotated[int, BeforeValidator(_to_bytes)]
"""A size in bytes; YAML may say ``512Mi``, ``2Gi``, ``1G`` or a plain number of bytes."""

Duration = Annotated[float, BeforeValidator(_to_seconds)]
"""A duration in seconds; YAML may say ``500us``, ``2ms``, ``1.5s`` or a plain number of seconds."""

DnsLabel = Annotated[str, AfterValidator(_check_dns_label)]
"""An object name: a DNS-1123 label (lowercase alphanumerics and '-', at most 63 characters)."""

AutoFlag = Annotated[Literal["auto"] | bool, BeforeValidator(_to_auto_flag)]
"""``auto`` (decide from what is found), ``true`` or ``false``."""

ModelVersion = Annotated[str, BeforeValidator(_version_as_text), AfterValidator(_check_version)]
"""A model version: "3", "2024.06", "v2-beta"; integers in YAML are accepted as text."""

Sha256Digest = Annotated[str, AfterValidator(_check_sha256)]
"""A SHA-256 digest as 64 lowercase hexadecimal characters (upper case is lowered)."""
