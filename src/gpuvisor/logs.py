"""Structured logging: one line per event with time, level, component, message and the
tenant / request id when the event concerns one (``extra={"tenant": ..., "request_id": ...}``)."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

import orjson

__all__ = ["configure_logging"]

_CONTEXT_FIELDS = ("tenant", "request_id", "deployment", "slice")


class KeyValueFormatter(logging.Formatter):
    """``2026-11-21T10:00:00Z INFO gpuvisor.control slice retail/shelf-detector/0 ready tenant=retail``."""

    converter = time.gmtime  # type: ignore[assignment]

    def format(self, record: logging.LogRecord) -> str:
        stamp = self.formatTime(record, "%Y-%m-%dT%H:%M:%SZ")
        line = f"{stamp} {record.levelname} {record.name} {record.getMessage()}"
        for name in _CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value:
                line += f" {name}={value}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


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


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Send gpuvisor's logs to stderr as key=value text or JSON lines."""
    handler = _Stderr()
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access", "alembic.runtime.migration"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
