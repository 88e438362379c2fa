"""Every error gpuvisor raises, each with a stable code and the HTTP status it maps to.

The tree::

    GpuvisorError                   500 internal
    ├── SpecError                   400 invalid_spec       a manifest or config document is invalid
    ├── ConfigError                 400 invalid_config     node configuration or CLI usage is wrong
    ├── InvalidRequest              400 invalid_request    a malformed inference or admin request
    ├── Unauthenticated             401 unauthenticated    no key, unknown key, revoked or expired key
    ├── Forbidden                   403 forbidden          the key's role may not do this
    │   └── QuotaExceeded           403 quota_exceeded     an apply would take a tenant over its quota
    ├── NotFound                    404 not_found          no such object visible to the caller
    ├── Conflict                    409 conflict           the object exists or is in use
    ├── PayloadTooLarge             413 payload_too_large  a body over the configured limit
    ├── TooManyRequests             429 too_many_requests  rate limit or queue cap; carries retry_after
    ├── ModelError                  400 model_error        a model cannot be loaded or verified
    │   └── IntegrityError          400 integrity_error    sha256 or signature does not match
    ├── ExecutionError              500 execution_error    the model failed while running a request
    ├── ClientGone                  499 client_closed      the client left while its request was queued
    └── Unavailable                 503 unavailable        not ready, worker crashed, deadline cannot be met
        ├── WorkerCrashed           503 worker_crashed
        └── DeadlineExceeded        503 deadline_exceeded

Each error carries a human message (what was wrong and, where possible, how to fix
it) plus structured context in ``fields``, which the API and the logs render.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ClientGone",
    "ConfigError",
    "Conflict",
    "DeadlineExceeded",
    "ExecutionError",
    "Forbidden",
    "GpuvisorError",
    "IntegrityError",
    "InvalidRequest",
    "ModelError",
    "NotFound",
    "PayloadTooLarge",
    "QuotaExceeded",
    "RequestTimeout",
    "SpecError",
    "TooManyRequests",
    "Unauthenticated",
    "Unavailable",
    "WorkerCrashed",
    "error_from_code",
    "is_out_of_memory",
]


class GpuvisorError(Exception):
    """Base of every gpuvisor error: a message, a code, an HTTP status and context fields."""

    code: str = "internal"
    http_status: int = 500

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields

    def to_dict(self) -> dict[str, Any]:
        """Return the error as a JSON-ready dict: ``{"error", "code", **fields}``."""
        body: dict[str, Any] = {"error": self.message, "code": self.code}
        body.update({k: v for k, v in self.fields.items() if v is not None})
        return body


class SpecError(GpuvisorError):
    code = "invalid_spec"
    http_status = 400


class ConfigError(GpuvisorError):
    code = "invalid_config"
    http_status = 400


class InvalidRequest(GpuvisorError):
    code = "invalid_request"
    http_status = 400


class Unauthenticated(GpuvisorError):
    code = "unauthenticated"
    http_status = 401


class Forbidden(GpuvisorError):
    code = "forbidden"
    http_status = 403


class QuotaExceeded(Forbidden):
    """An apply would take a tenant over ``quota.memory``, ``quota.compute`` or
    ``quota.deployments``; a Forbidden (403) so that it is audited as ``denied``, like a
    refused key: the request is well formed, the tenant's policy refuses it."""

    code = "quota_exceeded"


class NotFound(GpuvisorError):
    code = "not_found"
    http_status = 404


class Conflict(GpuvisorError):
    code = "conflict"
    http_status = 409


class PayloadTooLarge(GpuvisorError):
    code = "payload_too_large"
    http_status = 413


class RequestTimeout(GpuvisorError):
    """The client stopped sending its request's body."""

    code = "request_timeout"
    http_status = 408


class TooManyRequests(GpuvisorError):
    """Rate limit or queue cap reached; ``retry_after`` (seconds) says when to try again
    (None: a retry cannot succeed until the limit itself changes)."""

    code = "too_many_requests"
    http_status = 429

    def __init__(self, message: str, *, retry_after: float | None = 1.0, **fields: Any) -> None:
        super().__init__(message, retry_after=retry_after, **fields)
        self.retry_after = retry_after


class ModelError(GpuvisorError):
    code = "model_error"
    http_status = 400


class IntegrityError(ModelError):
    code = "integrity_error"


class ExecutionError(GpuvisorError):
    code = "execution_error"
    http_status = 500


class ClientGone(GpuvisorError):
    """The client closed its connection while its request waited in a queue: the request was
    dropped without running. Nobody receives this answer; 499 (a status no client is sent,
    by the convention of web servers' logs) marks it in the node's logs and metrics."""

    code = "client_closed"
    http_status = 499


class Unavailable(GpuvisorError):
    """The target cannot serve now; ``retry_after`` (seconds) is a hint, when known."""

    code = "unavailable"
    http_status = 503

    def __init__(self, message: str, *, retry_after: float | None = None, **fields: Any) -> None:
        super().__init__(message, retry_after=retry_after, **fields)
        self.retry_after = retry_after


class WorkerCrashed(Unavailable):
    code = "worker_crashed"


class DeadlineExceeded(Unavailable):
    code = "deadline_exceeded"


_BY_CODE: dict[str, type[GpuvisorError]] = {
    cls.code: cls
    for cls in (
        GpuvisorError,
        SpecError,
        ConfigError,
        InvalidRequest,
        Unauthenticated,
        Forbidden,
        QuotaExceeded,
        NotFound,
        Conflict,
        PayloadTooLarge,
        RequestTimeout,
        TooManyRequests,
        ModelError,
        IntegrityError,
        ExecutionError,
        ClientGone,
        Unavailable,
        WorkerCrashed,
        DeadlineExceeded,
    )
}


def error_from_code(code: str, message: str, **fields: Any) -> GpuvisorError:
    """Rebuild an error from its code (errors cross process boundaries as code + message)."""
    cls = _BY_CODE.get(code, GpuvisorError)
    return cls(message, **fields)


# What onnxruntime's arena, CUDA and torch say when an allocation fails.
_OUT_OF_MEMORY_MARKERS = (
    b"out of memory",
    b"failed to allocate",
    b"cudaerrormemoryallocation",
    b"bad_alloc",
    b"memoryerror",
)


def is_out_of_memory(answer: bytes) -> bool:
    """Return True when an error message (a worker's answer, a framework's exception) says
    an allocation failed."""
    text = answer[:4096].lower()
    return any(marker in text for marker in _OUT_OF_MEMORY_MARKERS)
