"""What the node reads from an inference request without decoding its tensors: its rows, the
largest first dimension among its inputs (the dispatcher counts batches, quanta and deadlines
in rows), and the OIP ``priority`` and ``timeout`` parameters.

The node never decodes tensors (DESIGN §5): a JSON request of 64 MiB would hold the shared
event loop for seconds. msgspec reads the request's outline against a schema that names only
these fields and skips every other value (tensor data, strings, other parameters) in C,
without building it: about 0.1 s for 64 MiB of JSON numbers, under a microsecond for a binary
request's header. Keys are matched where they belong (``parameters`` at the top level,
``shape`` in an input), whatever their order and whatever a request's other values hold.

A body that is not JSON, or whose ``inputs`` is not a list of objects, is left to the worker,
which answers it with a clear 400; the outline is then one row and no parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from gpuvisor.errors import InvalidRequest

__all__ = ["RequestOutline", "request_outline"]

_MAX_SCALAR = 64  # bytes of JSON a priority, a timeout or a shape's first size may take


class _Input(msgspec.Struct):
    shape: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)


class _Request(msgspec.Struct):
    inputs: list[_Input] = msgspec.field(default_factory=list)
    parameters: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)


class _Loose(msgspec.Struct):  # when ``inputs`` is malformed: the parameters still count
    parameters: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)


class _Parameters(msgspec.Struct):
    priority: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)
    timeout: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)


_REQUEST = msgspec.json.Decoder(_Request)
_LOOSE = msgspec.json.Decoder(_Loose)
_PARAMETERS = msgspec.json.Decoder(_Parameters)
_SHAPE = msgspec.json.Decoder(list[msgspec.Raw])
_VALUE = msgspec.json.Decoder()


@dataclass(frozen=True, slots=True)
class RequestOutline:
    """What the dispatcher needs before any worker has seen the request."""

    rows: int = 1  # the largest shape[0] of its inputs; what the worker decodes is charged
    priority: int | None = None  # 1 is the highest; None: the default (0)
    timeout: float | None = None  # seconds


def request_outline(head: bytes) -> RequestOutline:
    """Return the outline of an inference request; ``head`` is its JSON (the header of a
    binary request). Raises InvalidRequest for a ``priority`` or ``timeout`` of the wrong
    kind, or for JSON nested too deeply to read."""
    try:
        try:
            request = _REQUEST.decode(head)
        except msgspec.ValidationError:
            try:
                loose = _LOOSE.decode(head)
            except msgspec.DecodeError:
                return RequestOutline()
            return RequestOutline(1, *_parameters(loose.parameters))
        except msgspec.DecodeError:  # not JSON
            return RequestOutline()
        # A model that broadcasts runs a 1-row input against a 20-row one as 20 rows: the
        # largest first dimension is the work, whatever the inputs' order.
        rows = max((_rows(i.shape) for i in request.inputs), default=1)
        return RequestOutline(rows, *_parameters(request.parameters))
    except RecursionError:
        raise InvalidRequest(
            "the request's JSON nests arrays or objects too deeply to read: send tensor data "
            "as a flat list, or nested only as deep as the tensor's shape"
        ) from None


def _rows(shape: msgspec.Raw) -> int:
    try:
        sizes = _SHAPE.decode(shape) if len(shape) else []
        first = _VALUE.decode(sizes[0]) if sizes and len(sizes[0]) <= _MAX_SCALAR else None
    except msgspec.DecodeError:
        return 1
    if isinstance(first, bool) or not isinstance(first, int):
        return 1
    return max(first, 1)


def _parameters(raw: msgspec.Raw) -> tuple[int | None, float | None]:
    if not len(raw):
        return None, None
    try:
        parameters = _PARAMETERS.decode(raw)
    except msgspec.DecodeError:  # not an object: the worker refuses it
        return None, None
    priority = _scalar(parameters.priority)
    timeout = _scalar(parameters.timeout)
    if priority is not None and (
        isinstance(priority, bool) or not isinstance(priority, int) or priority < 0
    ):
        raise InvalidRequest(
            f"parameter 'priority' must be a non-negative integer (1 is the highest, 0 the "
            f"default), got {priority!r}"
        )
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout >= 0
    ):
        raise InvalidRequest(
            f"parameter 'timeout' must be a number of microseconds ≥ 0 (0: none), got {timeout!r}"
        )
    # 0 is no timeout, as in Triton (a deployment's slo.latency still applies)
    return priority, float(timeout) / 1e6 if timeout else None


class _TooLong:
    """A parameter value too long to be a number, shown by its size in error messages."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __repr__(self) -> str:
        return f"a JSON value of {self.size} bytes"


class _Unreadable:
    """A parameter value that does not decode to a number, shown as the request wrote it."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _scalar(raw: msgspec.Raw) -> object:
    """The JSON value of ``raw`` (None when absent or null); a long one is not decoded."""
    if not len(raw):
        return None
    if len(raw) > _MAX_SCALAR:
        return _TooLong(len(raw))
    try:
        return _VALUE.decode(raw)
    except msgspec.ValidationError:  # a number beyond any float (1e400): shown as written
        return _Unreadable(bytes(raw).decode(errors="replace"))
