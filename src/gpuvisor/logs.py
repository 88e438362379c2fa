"""Structured logging: one line per event with time, level, component, message and the
tenant / request id when the event concerns one (``extra={"tenant": ..., "request_id": ...}``).

Workers log in the node's format and at its level (``worker_log_environment``), each line
naming its worker (``worker=w1-4242``), so one log shipper reads the node and its workers."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

import orjson

from gpuvisor.quoting import printable

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "configure_logging",
    "configure_worker_logging",
    "worker_log_environment",
]

_CONTEXT_FIELDS = ("tenant", "request_id", "deployment", "slice", "worker")
_LEVEL_VAR, _FORMAT_VAR = "GPUVISOR_LOG_LEVEL", "GPUVISOR_LOG_FORMAT"
LOG_FORMATS = ("text", "json")
"""What ``gpuvisor up --log-format`` accepts."""
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
"""What ``gpuvisor up --log-level`` accepts (in any case)."""
_settings = {_LEVEL_VAR: "INFO", _FORMAT_VAR: "text"}


class KeyValueFormatter(logging.Formatter):
    """``2026-11-21T10:00:00Z INFO gpuvisor.control slice retail/shelf-detector/0 ready tenant=retail``."""

    converter = time.gmtime  # type: ignore[assignment]

    def format(self, record: logging.LogRecord) -> str:
        stamp = self.formatTime(record, "%Y-%m-%dT%H:%M:%SZ")
        line = f"{stamp} {record.levelname} {record.name} {printable(record.getMessage())}"
        for name in _CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value:
                line += f" {name}={_field_value(value)}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _field_value(value: object) -> str:
    """``value`` as a key=value field: quoted (JSON string escapes) when it holds a space, an
    ``=``, a quote or a control character, so that a client's request id such as
    ``r1 tenant=retail`` cannot pass for a field of its own."""
    text = str(value)
    if text.isprintable() and not any(c in text for c in ' ="'):
        return text
    return orjson.dumps(text).decode()


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, object] = {
            "time": record.created,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value:
                body[name] = value
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(body).decode()


class _Stderr(logging.StreamHandler[TextIO]):
    """Writes each record to ``sys.stderr`` as it is when the record is emitted (not when the
    handler was made): a caller that swaps stderr, and closes the old one, loses nothing."""

    @property  # type: ignore[override,unused-ignore]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _: TextIO) -> None:
        pass


class _Fields(logging.Filter):
    """Adds fixed context fields (a worker's id) to every record that does not set them."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__()
        self.fields = fields

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in self.fields.items():
            if not getattr(record, name, None):
                setattr(record, name, value)
        return True


def configure_logging(
    level: str = "INFO", fmt: str = "text", fields: dict[str, str] | None = None
) -> None:
    """Send gpuvisor's logs to stderr as key=value text or JSON lines; ``fields`` are added
    to every line (a worker's id). Raises ValueError for a level not in LOG_LEVELS or a
    format not in LOG_FORMATS (rather than logging in a format nobody asked for)."""
    if level.upper() not in LOG_LEVELS:
        raise ValueError(f"unknown log level {level!r} (expected one of {', '.join(LOG_LEVELS)})")
    if fmt not in LOG_FORMATS:
        raise ValueError(f"unknown log format {fmt!r} (expected one of {', '.join(LOG_FORMATS)})")
    handler = _Stderr()
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    if fields:
        handler.addFilter(_Fields(fields))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    _settings.update({_LEVEL_VAR: level.upper(), _FORMAT_VAR: fmt})
    for noisy in ("uvicorn.access", "alembic.runtime.migration"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def worker_log_environment() -> dict[str, str]:
    """The environment variables that give a worker process this process's log level and
    format (``configure_worker_logging`` reads them)."""
    return dict(_settings)


def configure_worker_logging(worker_id: str, environ: dict[str, str]) -> None:
    """Log as the node that started this worker does, naming the worker on every line."""
    fmt, level = environ.get(_FORMAT_VAR, "text"), environ.get(_LEVEL_VAR, "INFO").upper()
    configure_logging(
        level if level in LOG_LEVELS else "INFO",
        fmt if fmt in LOG_FORMATS else "text",
        {"worker": worker_id},
    )
