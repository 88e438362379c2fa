"""Open Inference Protocol v2 tensor codec: JSON and binary-extension bodies <-> numpy arrays."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import orjson

from gpuvisor.errors import ExecutionError, InvalidRequest

__all__ = [
    "DATATYPES",
    "InferRequest",
    "RequestedOutput",
    "TensorMeta",
    "decode_infer_request",
    "encode_error",
    "encode_infer_response",
    "json_infer_request",
]

Array = np.ndarray[Any, Any]

# Every dtype is little-endian, as the binary extension requires; BYTES are object arrays of bytes.
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}

_LENGTH_PREFIX = 4  # each binary BYTES element: 4-byte little-endian length, then the bytes
_MAX_BYTES = int(np.iinfo(np.intp).max)  # what numpy can address in one array


@dataclass(frozen=True)
class TensorMeta:
    """Name, OIP datatype and shape of a model input or output; -1 marks a variable dim."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        """Return ``{"name", "datatype", "shape": [...]}`` as model metadata shows it."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass
class RequestedOutput:
    """An output the request asks for; ``binary`` is its ``binary_data`` parameter, if given."""

    name: str
    binary: bool | None = None


@dataclass
class InferRequest:
    """A decoded, validated inference request; ``outputs`` None means every output."""

    id: str | None
    parameters: dict[str, Any]
    inputs: dict[str, Array]
    outputs: list[RequestedOutput] | None = None
    binary_output: bool = False


def json_infer_request(
    inputs: Mapping[str, Array], parameters: Mapping[str, Any] | None = None
) -> bytes:
    """Return an OIP request body with ``inputs`` as JSON tensors (flat ``data``), as a client
    that does not use the binary extension sends it; numeric and BOOL tensors only."""
    names = {dtype: name for name, dtype in DATATYPES.items()}
    body: dict[str, Any] = {
        "inputs": [
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": names[array.dtype],
                "data": array.ravel().tolist(),
            }
            for name, array in inputs.items()
        ]
    }
    if parameters:
        body["parameters"] = dict(parameters)
    return orjson.dumps(body)


def encode_error(message: str, code: str | None = None) -> bytes:
    """Return the OIP error body ``{"error": message}``, with the node's ``code`` field when
    given (as every error the node answers itself carries)."""
    return orjson.dumps({"error": message} if code is None else {"error": message, "code": code})


def decode_infer_request(
    body: bytes,
    header_length: int | None,
    inputs: Sequence[TensorMeta],
    outputs: Sequence[TensorMeta],
) -> InferRequest:
    """Decode and validate an OIP inference request body against the model's metadata.

    ``header_length`` is the Inference-Header-Content-Length header (None when absent): the
    body is then a JSON header followed by the binary tensors, in input order.
    Returns an InferRequest whose input arrays may be read-only views of ``body``.
    Raises InvalidRequest with a message naming the offending tensor.
    """
    view = memoryview(body)
    if not view:
        raise InvalidRequest("request body is empty: send the inference request as JSON")
    header_end = len(view) if header_length is None else header_length
    if header_end <= 0 or header_end > len(view):
        raise InvalidRequest(
            f"Inference-Header-Content-Length is {header_end} but the body has {len(view)} bytes"
        )
    try:
        doc = orjson.loads(view[:header_end])
    except orjson.JSONDecodeError as exc:
        hint = ""
        # JSON followed by bytes (content after the document, or bytes that are not UTF-8):
        # binary tensor data, most likely; invalid JSON alone gets no such hint
        problem = str(exc)
        if "byte order mark" in problem:
            hint = " (JSON has none: send the body without the 3 bytes it starts with)"
        elif header_length is None and (
            problem.startswith("unexpected content after document") or "UTF-8" in problem
        ):
            hint = (
                " (a JSON header followed by binary tensor data needs the "
                "Inference-Header-Content-Length header, the header's length in bytes)"
            )
        raise InvalidRequest(f"request body is not valid JSON: {exc}{hint}") from None
    if not isinstance(doc, dict):
        raise InvalidRequest("request body must be a JSON object")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidRequest("request 'id' must be a string")
    parameters = _object_field(doc, "parameters", "request")
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise InvalidRequest("request parameter 'binary_data_output' must be true or false")
    decoded = _decode_inputs(doc.get("inputs"), view, header_length, inputs)
    requested = _decode_requested_outputs(doc.get("outputs"), outputs)
    return InferRequest(request_id, parameters, decoded, requested, binary_output)


def _object_field(doc: dict[str, Any], key: str, owner: str) -> dict[str, Any]:
    value = doc.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{owner} '{key}' must be a JSON object")
    return value


def _known(metas: Sequence[TensorMeta], what: str) -> str:
    names = ", ".join(m.name for m in metas) or "none"
    return f"(the model {'expects' if what == 'inputs' else 'has'} {what} {names})"


def _decode_inputs(
    entries: Any, view: memoryview, header_length: int | None, metas: Sequence[TensorMeta]
) -> dict[str, Array]:
    if entries is None:
        raise InvalidRequest("request has no 'inputs'")
    if not isinstance(entries, list):
        raise InvalidRequest("request 'inputs' must be a list")
    by_name = {meta.name: meta for meta in metas}
    decoded: dict[str, Array] = {}
    offset = len(view) if header_length is None else header_length
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InvalidRequest("each request input must be an object with a string 'name'")
        name = entry["name"]
        meta = by_name.get(name)
        if meta is None:
            raise InvalidRequest(f"unknown input '{name}' {_known(metas, 'inputs')}")
        if name in decoded:
            raise InvalidRequest(f"input '{name}' is given more than once")
        shape = _checked_shape(entry, meta)
        size = _object_field(entry, "parameters", f"input '{name}'").get("binary_data_size")
        if size is None:
            if "data" not in entry:
                raise InvalidRequest(f"input '{name}' has neither 'data' nor binary_data_size")
            decoded[name] = _from_json_data(entry["data"], meta, shape)
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidRequest(f"input '{name}' has a bad binary_data_size: {size!r}")
        if header_length is None:
            raise InvalidRequest(
                f"input '{name}' has binary_data_size but the request has no "
                "Inference-Header-Content-Length header"
            )
        if "data" in entry:
            raise InvalidRequest(f"input '{name}' has both 'data' and binary_data_size")
        if offset + size > len(view):
            raise InvalidRequest(
                f"binary body is truncated: input '{name}' needs {size} bytes but only "
                f"{len(view) - offset} remain"
            )
        decoded[name] = _from_binary(view, offset, size, meta, shape)
        offset += size
    if offset != len(view):
        raise InvalidRequest(f"binary body has {len(view) - offset} bytes after the last input")
    if len(decoded) != len(metas):
        missing = ", ".join(f"'{meta.name}'" for meta in metas if meta.name not in decoded)
        raise InvalidRequest(f"missing input {missing} {_known(metas, 'inputs')}")
    return decoded


def _checked_shape(entry: dict[str, Any], meta: TensorMeta) -> tuple[int, ...]:
    datatype = entry.get("datatype")
    if datatype != meta.datatype:
        raise InvalidRequest(
            f"input '{meta.name}' has datatype {datatype} but the model expects {meta.datatype}"
        )
    raw = entry.get("shape")
    if not isinstance(raw, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw
    ):
        raise InvalidRequest(f"input '{meta.name}' has shape {raw!r}, not a list of sizes >= 0")
    shape = tuple(raw)
    if len(shape) != len(meta.shape) or any(
        want not in (-1, got) for got, want in zip(shape, meta.shape, strict=False)
    ):
        raise InvalidRequest(
            f"input '{meta.name}' has shape {list(shape)} but the model expects {list(meta.shape)}"
        )
    # numpy refuses a shape whose non-zero sizes overflow its index type, even with a 0 in it
    if math.prod(d for d in shape if d) * DATATYPES[meta.datatype].itemsize > _MAX_BYTES:
        raise InvalidRequest(
            f"input '{meta.name}' has shape {list(shape)}: its sizes multiply to more than any "
            "tensor can hold"
        )
    return shape


def _from_binary(
    view: memoryview, offset: int, size: int, meta: TensorMeta, shape: tuple[int, ...]
) -> Array:
    count = math.prod(shape)
    if meta.datatype == "BYTES":
        return _bytes_elements(view[offset : offset + size], count, meta.name).reshape(shape)
    dtype = DATATYPES[meta.datatype]
    if size != count * dtype.itemsize:
        raise InvalidRequest(
            f"input '{meta.name}' has binary_data_size {size} but shape {list(shape)} of "
            f"{meta.datatype} needs {count * dtype.itemsize} bytes"
        )
    if meta.datatype == "BOOL":
        # Any non-zero byte is true; comparing also yields a clean, writable bool array.
        flags: Array = np.frombuffer(view, np.uint8, count, offset) != 0
        return flags.reshape(shape)
    array = np.frombuffer(view, dtype, count, offset)
    if offset % dtype.itemsize:
        array = array.copy()  # keep kernels off misaligned memory
    return array.reshape(shape)


def _bytes_elements(chunk: memoryview, count: int, name: str) -> Array:
    if count * _LENGTH_PREFIX > len(chunk):  # checked before anything is allocated for them
        raise InvalidRequest(
            f"input '{name}' has binary_data_size {len(chunk)} but its shape asks for {count} "
            f"BYTES elements, which need at least {count * _LENGTH_PREFIX} bytes (a "
            f"{_LENGTH_PREFIX}-byte length before each)"
        )
    elements = np.empty(count, dtype=object)
    position, end = 0, len(chunk)
    for index in range(count):
        start = position + _LENGTH_PREFIX
        length = int.from_bytes(chunk[position:start], "little")
        if start > end or start + length > end:
            raise InvalidRequest(f"input '{name}' binary data ends inside BYTES element {index}")
        elements[index] = bytes(chunk[start : start + length])
        position = start + length
    if position != end:
        raise InvalidRequest(
            f"input '{name}' has binary_data_size {end} but its {count} BYTES elements "
            f"use {position} bytes"
        )
    return elements


def _from_json_data(data: Any, meta: TensorMeta, shape: tuple[int, ...]) -> Array:
    name, datatype, count = meta.name, meta.datatype, math.prod(shape)
    dtype = DATATYPES[datatype]
    expected = {"b": "true/false values", "f": "numbers", "O": "strings"}.get(
        dtype.kind, "integers"
    )
    problem = f"input '{name}' is {datatype}: its data must be {expected} in lists of equal lengths"
    if not isinstance(data, list):
        raise InvalidRequest(f"input '{name}' 'data' must be a list")
    try:
        parsed = np.array(data, dtype=object if datatype == "BYTES" else None)
    except (ValueError, TypeError):
        raise InvalidRequest(problem) from None
    if parsed.size and dtype.kind in "iuf":
        # integers accept floats here: _exact_integers tells a float from one out of range
        _numbers_only(data, int | float if dtype.kind in "iu" else float, problem)
    if parsed.size and datatype == "BYTES":
        flat = parsed.reshape(-1)  # a view: ragged nesting leaves lists here, rejected below
        for index, item in enumerate(flat):
            if not isinstance(item, str):
                raise InvalidRequest(problem)
            flat[index] = item.encode()
    elif parsed.size and dtype.kind in "iu":
        parsed = _exact_integers(data, parsed, datatype, problem, f"input '{name}' has values")
    elif parsed.size and parsed.dtype.kind not in ("b" if dtype.kind == "b" else "iuf"):
        raise InvalidRequest(problem)
    if parsed.size != count:
        raise InvalidRequest(
            f"input '{name}' has {parsed.size} data elements but shape {list(shape)} needs {count}"
        )
    return parsed.astype(dtype, copy=False).reshape(shape)


def _numbers_only(data: list[Any], number: Any, problem: str) -> None:
    """Refuse JSON true/false among numbers: numpy would read them as 1 and 0 (Triton refuses
    them too). Checked in C by msgspec, a fraction of what building the array costs."""
    depth, first = 0, data
    while isinstance(first, list) and first:
        depth, first = depth + 1, first[0]
    try:
        msgspec.convert(data, _nested_list(number, depth))
    except msgspec.ValidationError:
        raise InvalidRequest(problem) from None


@functools.cache
def _nested_list(number: Any, depth: int) -> Any:
    """``list[list[...number]]``, ``depth`` lists deep."""
    shape: Any = number
    for _ in range(depth):
        shape = list[shape]
    return shape


def _exact_integers(
    data: list[Any], parsed: Array, datatype: str, problem: str, subject: str
) -> Array:
    """Check JSON integers against ``datatype``'s range and return them in it."""
    dtype = DATATYPES[datatype]
    info = np.iinfo(dtype)
    out_of_range = f"{subject} outside the {datatype} range [{info.min}, {info.max}]"
    if parsed.dtype.kind in "iu":
        if parsed.dtype != dtype and not info.min <= parsed.min() <= parsed.max() <= info.max:
            raise InvalidRequest(out_of_range)
        return parsed
    # numpy turns ints beyond int64 mixed with smaller ones into floats: redo them exactly.
    exact = parsed if parsed.dtype == object else np.array(data, dtype=object)
    items = exact.reshape(-1).tolist()
    if any(type(item) is not int for item in items):
        # the JSON parser reads an integer beyond 64 bits as a float (rounded, perhaps to
        # -2**63 itself): out of range, not a float
        if any(type(item) is float and item.is_integer() and abs(item) >= 2**63 for item in items):
            raise InvalidRequest(out_of_range)
        raise InvalidRequest(problem)
    try:
        return np.array(items, dtype=dtype).reshape(exact.shape)
    except OverflowError:
        raise InvalidRequest(out_of_range) from None


# output parameters of protocol extensions gpuvisor does not serve: ignoring them would
# answer something other than what was asked (a whole tensor for its top classes, say)
_UNSERVED_OUTPUT_PARAMETERS = {
    "classification": "the classification extension",
    "shared_memory_region": "the result in shared memory",
    "shared_memory_byte_size": "the result in shared memory",
    "shared_memory_offset": "the result in shared memory",
}


def _decode_requested_outputs(
    raw: Any, metas: Sequence[TensorMeta]
) -> list[RequestedOutput] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise InvalidRequest("request 'outputs' must be a list")
    known = {meta.name for meta in metas}
    requested: dict[str, RequestedOutput] = {}
    for entry in raw:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InvalidRequest("each requested output must be an object with a string 'name'")
        name = entry["name"]
        if name not in known:
            raise InvalidRequest(f"unknown output '{name}' requested {_known(metas, 'outputs')}")
        if name in requested:
            raise InvalidRequest(f"output '{name}' is requested more than once")
        parameters = _object_field(entry, "parameters", f"output '{name}'")
        for parameter, extension in _UNSERVED_OUTPUT_PARAMETERS.items():
            if parameter in parameters:
                raise InvalidRequest(
                    f"output '{name}' asks for {extension} (parameter '{parameter}'), which "
                    "this server does not offer (it is not among the extensions GET /v2 "
                    "lists): request the output without it"
                )
        binary = parameters.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise InvalidRequest(f"output '{name}' parameter 'binary_data' must be true or false")
        requested[name] = RequestedOutput(name, binary)
    return list(requested.values()) or None


def encode_infer_response(
    model_name: str,
    model_version: str,
    request: InferRequest,
    results: dict[str, Array],
    outputs: Sequence[TensorMeta],
) -> tuple[bytes, int | None]:
    """Encode the model's results as an OIP response for ``request``.

    Returns ``(body, header_length)``: header_length is None for a pure JSON body, else the
    length of the JSON header that precedes the binary tensors (the HTTP layer sends it as
    Inference-Header-Content-Length). A BYTES output that is not valid UTF-8, or a floating-point
    output with an infinity or NaN, goes binary even when JSON was asked for, since JSON
    cannot carry it. Raises ExecutionError when the model
    did not produce a requested output or produced one that cannot take its datatype.
    """
    datatypes = {meta.name: meta.datatype for meta in outputs}
    if request.outputs is None:
        wanted = [(meta.name, request.binary_output) for meta in outputs]
    else:
        default = request.binary_output
        wanted = [(o.name, default if o.binary is None else o.binary) for o in request.outputs]
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, binary in wanted:
        if name not in results or name not in datatypes:
            raise ExecutionError(f"the model did not produce output '{name}'")
        datatype = datatypes[name]
        array = _as_datatype(results[name], datatype, name)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        entries.append(entry)
        if not binary:
            entry["data"] = _json_data(array, datatype)
            if entry["data"] is not None:
                continue
            del entry["data"]
        blob = _serialize_bytes(array) if datatype == "BYTES" else array.tobytes()
        entry["parameters"] = {"binary_data_size": len(blob)}
        blobs.append(blob)
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        response["id"] = request.id
    response["outputs"] = entries
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def _as_datatype(array: Array, datatype: str, name: str) -> Array:
    if datatype == "BYTES":
        return np.asarray(array, dtype=object)
    try:
        return np.asarray(array, dtype=DATATYPES[datatype])
    except (KeyError, ValueError, TypeError) as exc:
        raise ExecutionError(f"output '{name}' cannot be sent as {datatype}: {exc!r}") from None


def _json_data(array: Array, datatype: str) -> Any:
    """Return the flat JSON data of ``array`` (numeric arrays go to orjson as-is), or None
    when JSON cannot carry it: BYTES that are not UTF-8, or floats with an infinity or NaN
    (which JSON has no number for: orjson would write null)."""
    if datatype in ("FP16", "FP32", "FP64"):
        return array.reshape(-1) if np.isfinite(array).all() else None
    if datatype != "BYTES":
        return array.reshape(-1)
    try:
        return [_as_bytes(item).decode() for item in array.reshape(-1).tolist()]
    except UnicodeDecodeError:
        return None


def _as_bytes(item: Any) -> bytes:
    return item if isinstance(item, bytes) else str(item).encode()


def _serialize_bytes(array: Array) -> bytes:
    elements = [_as_bytes(item) for item in array.reshape(-1).tolist()]
    return b"".join(len(e).to_bytes(_LENGTH_PREFIX, "little") + e for e in elements)
