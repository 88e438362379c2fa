"""Error responses: every failure on every route is ``{"error": "..."}`` with a fitting status."""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Mapping
from typing import Annotated, Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from sqlalchemy.exc import StatementError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from gpuvisor.errors import GpuvisorError, InvalidRequest
from gpuvisor.security.keys import redact_secrets

__all__ = [
    "ErrorBody",
    "Text",
    "described_error",
    "error_response",
    "error_responses",
    "gpuvisor_error_response",
    "install_error_handlers",
    "refused_for_its_input",
    "request_id_of",
    "unexpected_error_response",
]

log = logging.getLogger("gpuvisor.api")


def _no_nul(text: str) -> str:
    if "\x00" in text:
        raise ValueError("must not contain a NUL character (\\u0000)")
    return text


#: Text of a request body that the store keeps: a NUL character is refused (400), as
#: PostgreSQL refuses it (SQLite would keep it).
Text = Annotated[str, AfterValidator(_no_nul)]

_MAX_RETRY_AFTER = 86_400  # seconds


class ErrorBody(BaseModel):
    """The body of every error response (any other fields add detail, e.g. ``limit``)."""

    model_config = ConfigDict(extra="allow")

    error: str = Field(description="what was wrong, and how to fix it")
    code: str = Field(
        "", description="a stable identifier of the kind of error, e.g. not_found, forbidden"
    )


_ERROR_DESCRIPTIONS = {
    400: "Invalid request: the message says which part is wrong and how to fix it",
    401: "No API key, or one that is unknown, expired or revoked",
    403: "The key's role may not do this",
    404: "Not found for this key (another tenant's objects are not found either)",
    409: "Conflicts with the node's current state",
    413: "Request body over the node's limit",
    429: "Too many requests; retry after the Retry-After header's seconds",
    503: "Not available now; retry after the Retry-After header's seconds",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """Return the OpenAPI ``responses`` entries of the given error statuses (for ``responses=``)."""
    return {
        status: {"model": ErrorBody, "description": _ERROR_DESCRIPTIONS[status]}
        for status in statuses
    }


def error_response(
    status: int, message: str, retry_after: float | None = None, **extra: object
) -> Response:
    """Return a JSON error response in the inference protocol's shape."""
    headers = {}
    if retry_after is not None and math.isfinite(retry_after):
        # whole seconds, at least 1; a day at most, whatever a slow rate limit works out to
        headers["Retry-After"] = str(max(1, min(_MAX_RETRY_AFTER, math.ceil(retry_after))))
    if status == 408:  # what is left of the body would be read as the next request
        headers["Connection"] = "close"
    if status == 401:  # RFC 9110 15.5.2: say how to authenticate
        headers["WWW-Authenticate"] = 'Bearer realm="gpuvisor"'
    body = {"error": message, **{k: v for k, v in extra.items() if v is not None}}
    return Response(
        orjson.dumps(body), status_code=status, headers=headers, media_type="application/json"
    )


MAX_REQUEST_ID = 128
"""The longest client ``X-Request-ID`` used as the request's id (the audit log keeps as many
characters); a longer one is replaced by a generated id, not logged and echoed whole."""


def client_request_id(given: str | None) -> str | None:
    """The client's ``X-Request-ID`` when it can be the request's id: 1 to ``MAX_REQUEST_ID``
    printable ASCII characters (a log line quotes one with spaces); None otherwise, for a
    generated one."""
    if given and len(given) <= MAX_REQUEST_ID and given.isascii() and given.isprintable():
        return given
    return None


def request_id_of(request: Request) -> str:
    """Return the request's id (the client's ``X-Request-ID`` if usable, else a new one),
    kept on the request so error responses and logs carry the same id."""
    current = getattr(request.state, "request_id", None)
    if not current:
        current = client_request_id(request.headers.get("x-request-id")) or uuid.uuid4().hex
        request.state.request_id = current
    return str(current)


def gpuvisor_error_response(request: Request, exc: GpuvisorError) -> Response:
    """Return the response for a refused request, and log the refusal with its request id."""
    retry_after = getattr(exc, "retry_after", None)
    fields = {k: v for k, v in exc.fields.items() if k != "retry_after" and _jsonable(v)}
    request_id = request_id_of(request)
    log.info(
        "%s %s -> %d %s: %s",
        request.method,
        redact_secrets(request.url.path),
        exc.http_status,
        exc.code,
        redact_secrets(exc.message),  # a key pasted where a name goes is not logged
        extra={"request_id": request_id, "tenant": getattr(request.state, "tenant", None)},
    )
    response = error_response(exc.http_status, exc.message, retry_after, code=exc.code, **fields)
    response.headers["X-Request-ID"] = request_id
    return response


async def _gpuvisor_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GpuvisorError)
    return gpuvisor_error_response(request, exc)


def _jsonable(value: object) -> bool:
    try:
        orjson.dumps(value)
    except TypeError:
        return False
    return True


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    message = str(exc.detail)
    code = None
    if exc.status_code == 404 and message == "Not Found":
        message = f"no such endpoint: {request.method} {redact_secrets(request.url.path)}"
        code = "not_found"
    elif exc.status_code == 413:
        code = "payload_too_large"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {redact_secrets(request.url.path)}"
        code = "method_not_allowed"
    headers = getattr(exc, "headers", None) or {}
    response = error_response(exc.status_code, message, code=code)
    if "Allow" in headers or "allow" in headers:  # what a 405 must say: the methods that are
        response.headers["Allow"] = headers.get("Allow") or headers["allow"]
    return response


async def _validation_error(request: Request, exc: Exception) -> Response:
    """Answer a request FastAPI refused for its parameters or body as the InvalidRequest it is,
    through the app's own GpuvisorError handler: logged, and on a node audited, like any other
    refusal (``refused_for_its_input`` tells it apart)."""
    assert isinstance(exc, RequestValidationError)
    content_type = request.headers.get("content-type", "")
    problems = [_problem(error, content_type) for error in exc.errors()]
    refusal = InvalidRequest("invalid request: " + "; ".join(problems))
    refusal.__cause__ = exc
    handle = request.app.exception_handlers.get(GpuvisorError, _gpuvisor_error)
    response: Response = await handle(request, refusal)
    return response


def refused_for_its_input(exc: GpuvisorError) -> bool:
    """Whether ``exc`` refused a request for its parameters or body as FastAPI read them (JSON
    that does not parse, a field of the wrong type), possibly before its route ran."""
    return isinstance(exc.__cause__, RequestValidationError)


# pydantic's error types for a value that is no JSON object where a model was expected
_NOT_AN_OBJECT = ("model_attributes_type", "model_type", "dict_type")


def _problem(error: Mapping[str, Any], content_type: str) -> str:
    """One of FastAPI's validation errors as the answer says it: where, and what is wrong."""
    loc = tuple(error.get("loc", ()))
    if error.get("type") == "json_invalid":
        detail = error.get("ctx", {}).get("error", "JSON decode error")
        at = f" at character {loc[1]}" if len(loc) > 1 else ""
        return f"the body is not valid JSON ({detail}{at}): send a JSON object"
    if loc == ("body",) and error.get("type") == "missing":
        return "the body is missing: send a JSON object"
    if loc == ("body",) and error.get("type") in _NOT_AN_OBJECT:
        if "json" in content_type:
            return "the body must be a JSON object"
        return "the body must be a JSON object, sent with 'Content-Type: application/json'"
    where = ".".join(str(part) for part in loc if part != "body")
    return f"{where}: {error.get('msg')}" if where else str(error.get("msg"))


def unexpected_error_response(request: Request, exc: Exception) -> Response:
    """Return a 500 for a bug, logged with its traceback (call from an ``except`` block).

    A client that hung up while its body was being read is no bug: one INFO line, and the
    answer goes nowhere."""
    if isinstance(exc, ClientDisconnect):
        log.info(
            "%s %s: the client disconnected before its request body was read",
            request.method,
            redact_secrets(request.url.path),
        )
        return error_response(400, "the client disconnected before its request body was read")
    request_id = request_id_of(request)
    # the exception, not sys.exc_info(): a handler runs outside the except block that caught it
    log.error(
        "unexpected error on %s %s",
        request.method,
        redact_secrets(request.url.path),
        exc_info=(type(exc), exc, exc.__traceback__),
        extra={"request_id": request_id, "tenant": getattr(request.state, "tenant", None)},
    )
    response = error_response(500, f"internal error: {described_error(exc)}")
    response.headers["X-Request-ID"] = request_id
    return response


def described_error(exc: Exception) -> str:
    """The type and message of an unexpected error, for its 500; a database error without
    the statement and parameters SQLAlchemy adds (a new key's hash, say)."""
    original = getattr(exc, "orig", None)
    if isinstance(exc, StatementError) and original is not None:
        return f"{type(exc).__name__}: {type(original).__name__}: {original}".strip()
    return f"{type(exc).__name__}: {exc}"


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    return unexpected_error_response(request, exc)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(GpuvisorError, _gpuvisor_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
