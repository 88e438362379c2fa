"""Turn pydantic validation errors into YAML field paths and messages an operator can act on."""

from __future__ import annotations

import difflib
import re
import types
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import ErrorDetails

from gpuvisor.spec.kinds import KIND_MODELS, KINDS
from gpuvisor.spec.types import FIELD_ERROR, quoted, shorten

__all__ = ["describe_error", "error_path", "format_path", "type_name"]

_MAX_INPUT_REPR = 60
_VALUE_ERROR_PREFIX = "Value error, "


def format_path(loc: tuple[int | str, ...]) -> str:
    """Return a location as written in YAML: ``spec.nodes[0].name``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{shorten(part)}" if text else shorten(part)
    return text


def error_path(loc: tuple[int | str, ...], error: ErrorDetails) -> str:
    """Return the YAML path an error is about; a model validator's error names its own field."""
    path = format_path(loc)
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        return "kind"
    if error["type"] == FIELD_ERROR:
        field = str(error.get("ctx", {}).get("field", ""))
        if field:
            path = f"{path}.{field}" if path and not field.startswith("[") else path + field
    return path


def _shorten(value: Any) -> str:
    """The value as YAML wrote it where Python's spelling differs (null, true, false)."""
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    return quoted(value, _MAX_INPUT_REPR)


def type_name(value: Any) -> str:
    """What a YAML value is, in YAML's words (a mapping, a string, null…)."""
    names = {dict: "mapping", list: "list", str: "string", bool: "boolean", type(None): "null"}
    numbers = {int: "whole number", float: "number"}
    return names.get(type(value)) or numbers.get(type(value)) or type(value).__name__


def describe_error(kind: str, loc: tuple[int | str, ...], error: ErrorDetails) -> str:
    """Return what was wrong with a value and what is accepted instead."""
    kind_type, value = error["type"], error.get("input")
    ctx = error.get("ctx", {})
    if kind_type == FIELD_ERROR:
        return str(ctx.get("message", error["msg"]))
    if kind_type == "missing":
        return "required field is missing"
    if kind_type == "extra_forbidden":
        return _unknown_field(kind, loc)
    if kind_type == "literal_error":
        accepted = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        hint = _did_you_mean(value, accepted) if isinstance(value, str) else ""
        return f"unknown value {_shorten(value)}{hint}; accepted: {', '.join(accepted)}"
    if kind_type == "value_error":
        return error["msg"].removeprefix(_VALUE_ERROR_PREFIX)
    if kind_type in ("model_type", "model_attributes_type", "dict_type"):
        return f"expected a mapping of fields, got a {type_name(value)} ({_shorten(value)})"
    if kind_type == "finite_number":
        return f"must be a finite number, got {_shorten(value)} (NaN and infinity are refused)"
    if kind_type == "list_type":
        return f"expected a list, got a {type_name(value)} ({_shorten(value)})"
    if kind_type == "union_tag_not_found":
        return f"required field is missing (expected one of {', '.join(KINDS)})"
    if kind_type == "union_tag_invalid":
        given = value.get("kind") if isinstance(value, dict) else value
        return f"unknown kind {_shorten(given)} (expected one of {', '.join(KINDS)})"
    message = error["msg"].replace("Input should be", "must be", 1)
    return f"{message} (got {_shorten(value)})"


def _unknown_field(kind: str, loc: tuple[int | str, ...]) -> str:
    field = shorten(str(loc[-1])) if loc else "?"
    model = _model_at(KIND_MODELS.get(kind), loc[:-1])
    if model is None:
        return f"unknown field {field!r}"
    accepted = [info.alias or name for name, info in model.model_fields.items()]
    hint = _did_you_mean(field, accepted)
    return f"unknown field {field!r}{hint}; accepted fields: {', '.join(accepted)}"


def _did_you_mean(value: str, accepted: list[str]) -> str:
    matches = difflib.get_close_matches(value, accepted, n=1)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def _strip(annotation: Any) -> Any:
    """Remove Annotated[...] and Optional[...] wrappers around a type."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in get_args(annotation) if a is not type(None)]
            models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
            if len(members) == 1:
                annotation = members[0]
            elif models:
                annotation = models[0]
            else:
                return annotation
        else:
            return annotation


def _model_at(root: type[BaseModel] | None, loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """Return the model class found by following ``loc`` (YAML keys) from ``root``, if any."""
    current: Any = root
    for part in loc:
        current = _strip(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            fields = current.model_fields
            info = next((f for n, f in fields.items() if part in (n, f.alias)), None)
            if info is None:
                return None
            current = info.annotation
        elif get_origin(current) in (list, dict):
            current = get_args(current)[-1]
        else:
            return None
    current = _strip(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None
