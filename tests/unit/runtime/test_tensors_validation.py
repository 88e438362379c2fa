"""Tests for the OIP request decoder's field handling and every validation error it raises."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import orjson
import pytest

from gpuvisor.errors import InvalidRequest
from gpuvisor.runtime.tensors import DATATYPES, RequestedOutput, TensorMeta, decode_infer_request

OUTS = [TensorMeta("scores", "FP32", (-1,)), TensorMeta("label", "BYTES", (-1,))]
INS = [TensorMeta("image", "FP32", (-1, 2)), TensorMeta("ids", "INT64", (2,))]


def body_of(inputs: list[dict[str, Any]] | None = None, **fields: Any) -> bytes:
    doc: dict[str, Any] = dict(fields)
    doc["inputs"] = (
        inputs
        if inputs is not None
        else [
            {"name": "image", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.0]},
            {"name": "ids", "datatype": "INT64", "shape": [2], "data": [[3, 4]]},
        ]
    )
    return orjson.dumps(doc)


def test_requested_outputs_and_parameters_are_decoded() -> None:
    body = body_of(
        id="r1",
        parameters={"binary_data_output": True, "priority": 2},
        outputs=[{"name": "label", "parameters": {"binary_data": False}}, {"name": "scores"}],
    )
    request = decode_infer_request(body, None, INS, OUTS)
    assert request.id == "r1"
    assert request.parameters == {"binary_data_output": True, "priority": 2}
    assert request.binary_output is True
    assert request.outputs == [RequestedOutput("label", False), RequestedOutput("scores", None)]
    assert request.inputs["ids"].tolist() == [3, 4]
    assert request.inputs["image"].dtype == np.float32


@pytest.mark.parametrize(
    ("parameters", "what"),
    [
        ({"classification": 2}, "the classification extension (parameter 'classification')"),
        (
            {"shared_memory_region": "r", "shared_memory_byte_size": 8},
            "the result in shared memory",
        ),
    ],
)
def test_outputs_asking_for_an_extension_not_offered_are_refused(
    parameters: dict[str, Any], what: str
) -> None:
    """Triton's client sends these; answering the whole tensor in the body instead would be
    a different answer from the one asked for."""
    body = body_of(outputs=[{"name": "scores", "parameters": parameters}])
    with pytest.raises(InvalidRequest) as caught:
        decode_infer_request(body, None, INS, OUTS)
    assert caught.value.message.startswith(f"output 'scores' asks for {what}")
    assert "request the output without it" in caught.value.message


def test_omitted_outputs_mean_every_output_in_json() -> None:
    request = decode_infer_request(body_of(), None, INS, OUTS)
    assert request.outputs is None
    assert request.binary_output is False and request.id is None


def i(name: str, datatype: str, shape: Any, **extra: Any) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, **extra}


IMAGE = i("image", "FP32", [1, 2], data=[1.0, 2.0])
IDS = i("ids", "INT64", [2], data=[1, 2])


def binary_body(*entries: tuple[dict[str, Any], bytes], tail: bytes = b"") -> tuple[bytes, int]:
    header = orjson.dumps({"inputs": [entry for entry, _ in entries]})
    return header + b"".join(raw for _, raw in entries) + tail, len(header)


def sized(entry: dict[str, Any], size: Any) -> dict[str, Any]:
    return {**entry, "parameters": {"binary_data_size": size}}


F32x2 = np.array([[1.0, 2.0]], dtype=np.float32).tobytes()
I64x2 = np.array([1, 2], dtype=np.int64).tobytes()
IMAGE_BIN = i("image", "FP32", [1, 2])
IDS_BIN = i("ids", "INT64", [2])

INVALID: list[tuple[str, bytes, int | None, str]] = [
    ("not json", b"{inputs: ", None, "request body is not valid JSON"),
    ("not json at all", b"inputs", None, "request body is not valid JSON: unexpected character"),
    ("not an object", b"[1, 2]", None, "request body must be a JSON object"),
    ("no inputs", orjson.dumps({"id": "x"}), None, "request has no 'inputs'"),
    ("inputs not a list", orjson.dumps({"inputs": {}}), None, "request 'inputs' must be a list"),
    ("input without name", body_of([{"datatype": "FP32"}]), None, "string 'name'"),
    (
        "unknown input",
        body_of([IMAGE, IDS, i("imagee", "FP32", [1], data=[1])]),
        None,
        "unknown input 'imagee' (the model expects inputs image, ids)",
    ),
    (
        "missing input",
        body_of([IMAGE]),
        None,
        "missing input 'ids' (the model expects inputs image, ids)",
    ),
    (
        "duplicate input",
        body_of([IMAGE, IDS, IMAGE]),
        None,
        "input 'image' is given more than once",
    ),
    (
        "datatype mismatch",
        body_of([{**IMAGE, "datatype": "FP64"}, IDS]),
        None,
        "input 'image' has datatype FP64 but the model expects FP32",
    ),
    ("missing datatype", body_of([{**IMAGE, "datatype": None}, IDS]), None, "has datatype None"),
    (
        "rank mismatch",
        body_of([{**IMAGE, "shape": [2]}, IDS]),
        None,
        "input 'image' has shape [2] but the model expects [-1, 2]",
    ),
    (
        "fixed dim mismatch",
        body_of([IMAGE, {**IDS, "shape": [3], "data": [1, 2, 3]}]),
        None,
        "input 'ids' has shape [3] but the model expects [2]",
    ),
    (
        "negative dim",
        body_of([{**IMAGE, "shape": [-1, 2]}, IDS]),
        None,
        "input 'image' has shape [-1, 2], not",
    ),
    (
        "non-int dim",
        body_of([{**IMAGE, "shape": [1.5, 2]}, IDS]),
        None,
        "input 'image' has shape [1.5, 2], not",
    ),
    (
        "shape missing",
        body_of([{**IMAGE, "shape": None}, IDS]),
        None,
        "input 'image' has shape None",
    ),
    (
        "too few elements",
        body_of([{**IMAGE, "data": [1.0]}, IDS]),
        None,
        "input 'image' has 1 data elements but shape [1, 2] needs 2",
    ),
    (
        "too many nested elements",
        body_of([IMAGE, {**IDS, "data": [[1, 2], [3, 4]]}]),
        None,
        "input 'ids' has 4 data elements but shape [2] needs 2",
    ),
    (
        "ragged nesting",
        body_of([{**IMAGE, "shape": [2, 2], "data": [[1.0, 2.0], [3.0]]}, IDS]),
        None,
        "input 'image' is FP32: its data must be numbers in lists of equal lengths",
    ),
    (
        "strings for floats",
        body_of([{**IMAGE, "data": ["1", "2"]}, IDS]),
        None,
        "its data must be numbers",
    ),
    (
        "null for floats",
        body_of([{**IMAGE, "data": [None, 1.0]}, IDS]),
        None,
        "its data must be numbers",
    ),
    (
        "floats for integers",
        body_of([IMAGE, {**IDS, "data": [1.5, 2]}]),
        None,
        "input 'ids' is INT64: its data must be integers",
    ),
    (
        "booleans for integers",
        body_of([IMAGE, {**IDS, "data": [True, False]}]),
        None,
        "its data must be integers",
    ),
    (
        # numpy reads true among numbers as 1: the request would run on data it never sent
        "a boolean among integers",
        body_of([IMAGE, {**IDS, "data": [1, True]}]),
        None,
        "input 'ids' is INT64: its data must be integers",
    ),
    (
        "a boolean among floats",
        body_of([{**IMAGE, "data": [1.5, False]}, IDS]),
        None,
        "input 'image' is FP32: its data must be numbers",
    ),
    (
        "a boolean among nested floats",
        body_of([{**IMAGE, "data": [[1.5, True]]}, IDS]),
        None,
        "input 'image' is FP32: its data must be numbers",
    ),
    (
        "integer overflow",
        body_of([IMAGE, {**IDS, "data": [2**63, 1]}]),
        None,
        "input 'ids' has values outside the INT64 range",
    ),
    (
        "data not a list",
        body_of([{**IMAGE, "data": 1.0}, IDS]),
        None,
        "input 'image' 'data' must be a list",
    ),
    (
        "no data",
        body_of([{**IMAGE, "data": None}, IDS]),
        None,
        "input 'image' 'data' must be a list",
    ),
    (
        "neither data nor binary",
        body_of([i("image", "FP32", [1, 2]), IDS]),
        None,
        "input 'image' has neither 'data' nor binary_data_size",
    ),
    ("id not a string", body_of(id=7), None, "request 'id' must be a string"),
    (
        "parameters not an object",
        body_of(parameters=[1]),
        None,
        "request 'parameters' must be a JSON object",
    ),
    (
        "binary_data_output not a bool",
        body_of(parameters={"binary_data_output": "yes"}),
        None,
        "'binary_data_output' must be true or false",
    ),
    (
        "outputs not a list",
        body_of(outputs={"name": "label"}),
        None,
        "request 'outputs' must be a list",
    ),
    (
        "unknown output",
        body_of(outputs=[{"name": "labels"}]),
        None,
        "unknown output 'labels' requested (the model has outputs scores, label)",
    ),
    (
        "duplicate output",
        body_of(outputs=[{"name": "label"}, {"name": "label"}]),
        None,
        "output 'label' is requested more than once",
    ),
    (
        "binary_data not a bool",
        body_of(outputs=[{"name": "label", "parameters": {"binary_data": 1}}]),
        None,
        "output 'label' parameter 'binary_data' must be true or false",
    ),
    (
        "header longer than body",
        body_of(),
        10_000,
        "Inference-Header-Content-Length is 10000 but the body has",
    ),
    ("header length zero", body_of(), 0, "Inference-Header-Content-Length is 0"),
    (
        "binary without header length",
        body_of([sized(IMAGE_BIN, 8), IDS]) + F32x2,
        None,
        "needs the Inference-Header-Content-Length header, the header's length in bytes",
    ),
    ("empty body", b"", None, "request body is empty: send the inference request as JSON"),
    ("a NaN literal", b'{"inputs": NaN}', None, "not valid JSON: unexpected character"),
    (
        "a byte order mark",
        b"\xef\xbb\xbf" + body_of(),
        None,
        "(JSON has none: send the body without the 3 bytes it starts with)",
    ),
    (
        "binary size but no header",
        body_of([sized(IMAGE_BIN, 8), IDS]),
        None,
        "input 'image' has binary_data_size but the request has no Inference-Header-Content-Length",
    ),
    (
        "truncated",
        *binary_body((sized(IMAGE_BIN, 8), F32x2[:5]), (IDS, b"")),
        "binary body is truncated: input 'image' needs 8 bytes but only 5 remain",
    ),
    (
        "truncated second tensor",
        *binary_body((sized(IMAGE_BIN, 8), F32x2), (sized(IDS_BIN, 16), I64x2[:9])),
        "input 'ids' needs 16 bytes but only 9 remain",
    ),
    (
        "bytes beyond the tensors",
        *binary_body((sized(IMAGE_BIN, 8), F32x2), (IDS, b""), tail=b"\x00" * 3),
        "binary body has 3 bytes after the last input",
    ),
    (
        "size disagrees with shape",
        *binary_body((sized(IMAGE_BIN, 4), F32x2[:4]), (IDS, b"")),
        "input 'image' has binary_data_size 4 but shape [1, 2] of FP32 needs 8 bytes",
    ),
    (
        "negative size",
        *binary_body((sized(IMAGE_BIN, -8), b""), (IDS, b"")),
        "input 'image' has a bad binary_data_size: -8",
    ),
    (
        "string size",
        *binary_body((sized(IMAGE_BIN, "8"), F32x2), (IDS, b"")),
        "input 'image' has a bad binary_data_size: '8'",
    ),
    (
        "boolean size",
        *binary_body((sized(IMAGE_BIN, True), b"\x00"), (IDS, b"")),
        "bad binary_data_size: True",
    ),
    (
        "data and binary",
        *binary_body((sized(IMAGE, 8), F32x2), (IDS, b"")),
        "input 'image' has both 'data' and binary_data_size",
    ),
]


@pytest.mark.parametrize(
    ("body", "header_length", "message"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_requests_are_rejected_with_a_specific_message(
    body: bytes, header_length: int | None, message: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        decode_infer_request(body, header_length, INS, OUTS)
    assert message in caught.value.message
    assert caught.value.http_status == 400


@pytest.mark.parametrize("body", [b'{"inputs": NaN}', b'{"inputs": [', b"{not json"])
def test_json_that_is_merely_invalid_gets_no_hint_about_binary_data(body: bytes) -> None:
    with pytest.raises(InvalidRequest) as caught:
        decode_infer_request(body, None, INS, OUTS)
    assert "Inference-Header-Content-Length" not in caught.value.message


TEXT = TensorMeta("text", "BYTES", (-1,))


def bytes_body(count: int, raw: bytes) -> tuple[bytes, int]:
    return binary_body((sized(i("text", "BYTES", [count]), len(raw)), raw))


@pytest.mark.parametrize(
    ("count", "raw", "message"),
    [
        (2, b"\x01\x00\x00\x00a\x05\x00\x00\x00", "binary data ends inside BYTES element 1"),
        (
            2,
            b"\x01\x00\x00\x00a\x05\x00",
            "its shape asks for 2 BYTES elements, which need at least 8",
        ),
        (1, b"\x09\x00\x00\x00abc", "binary data ends inside BYTES element 0"),
        (1, b"\x01\x00\x00\x00ab", "binary_data_size 6 but its 1 BYTES elements use 5 bytes"),
        (0, b"\x00\x00\x00\x00", "binary_data_size 4 but its 0 BYTES elements use 0 bytes"),
    ],
)
def test_malformed_binary_bytes_elements_are_rejected(count: int, raw: bytes, message: str) -> None:
    body, header_length = bytes_body(count, raw)
    with pytest.raises(InvalidRequest, match="input 'text'") as caught:
        decode_infer_request(body, header_length, [TEXT], [])
    assert message in caught.value.message


@pytest.mark.parametrize(
    ("datatype", "value", "message"),
    [
        ("UINT64", "18446744073709551616", "outside the UINT64 range"),  # 2**64
        ("INT64", "-9223372036854775809", "outside the INT64 range"),  # -2**63 - 1
        ("UINT64", "1.5", "its data must be integers"),
    ],
)
def test_an_integer_beyond_64_bits_is_out_of_range_not_a_float(
    datatype: str, value: str, message: str
) -> None:
    # written by hand: the JSON parser reads such an integer as a float
    body = (
        f'{{"inputs": [{{"name": "n", "shape": [2], "datatype": "{datatype}", '
        f'"data": [{value}, 0]}}]}}'
    ).encode()
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        decode_infer_request(body, None, [TensorMeta("n", datatype, (2,))], [])


def test_a_bytes_shape_larger_than_its_data_is_refused_before_anything_is_allocated() -> None:
    # 2**40 elements would ask for 8 TiB of object pointers: the worker must answer 400
    # from the data's size, not die allocating (a 100-byte request took a worker down).
    body, header_length = bytes_body(2**40, b"\x08\x00\x00\x00sku-0007")
    with pytest.raises(InvalidRequest) as caught:
        decode_infer_request(body, header_length, [TEXT], [])
    assert caught.value.message == (
        "input 'text' has binary_data_size 12 but its shape asks for 1099511627776 BYTES "
        "elements, which need at least 4398046511104 bytes (a 4-byte length before each)"
    )


@pytest.mark.parametrize(
    ("data", "shape"),
    [(["a", 1], [2]), ([["a"], "b"], [2]), ([["a", "b"], ["c"]], [3]), ([None], [1])],
)
def test_json_bytes_must_be_strings_in_even_lists(data: list[Any], shape: list[int]) -> None:
    body = orjson.dumps({"inputs": [i("text", "BYTES", shape, data=data)]})
    with pytest.raises(InvalidRequest, match="input 'text' is BYTES: its data must be strings"):
        decode_infer_request(body, None, [TEXT], [])


@pytest.mark.parametrize(
    ("datatype", "data", "outcome"),
    [
        ("UINT64", [2**63, 0, 2**64 - 1], [2**63, 0, 2**64 - 1]),
        ("UINT64", [2**63, 1.5, 0], "its data must be integers"),
        ("UINT64", [2**63, -1, 0], "values outside the UINT64 range [0, 18446744073709551615]"),
        ("INT8", [127, -128, 0], [127, -128, 0]),
        ("INT8", [128, 0, 0], "values outside the INT8 range [-128, 127]"),
        ("UINT8", [-1, 0, 0], "values outside the UINT8 range [0, 255]"),
        ("INT64", [2**63, 0, 0], "values outside the INT64 range"),
    ],
)
def test_json_integers_are_exact_and_range_checked(
    datatype: str, data: list[Any], outcome: list[int] | str
) -> None:
    meta = TensorMeta("n", datatype, (3,))
    body = orjson.dumps({"inputs": [i("n", datatype, [3], data=data)]})
    if isinstance(outcome, str):
        with pytest.raises(InvalidRequest, match=re.escape(outcome)):
            decode_infer_request(body, None, [meta], [])
    else:
        decoded = decode_infer_request(body, None, [meta], []).inputs["n"]
        assert decoded.dtype == DATATYPES[datatype]
        assert decoded.tolist() == outcome


@pytest.mark.parametrize("shape", [[0, 2**63 - 1, 2], [0, 2**40, 2**40], [1, 0, 2**62]])
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_an_empty_tensor_whose_other_sizes_overflow_is_the_callers_error(
    shape: list[int], binary: bool
) -> None:
    """numpy cannot shape even an empty array whose non-zero sizes overflow its index type:
    a 400 that says so, not an internal error."""
    metas = [TensorMeta("x", "FP32", (-1, -1, -1))]
    if binary:
        body, header_length = binary_body((sized(i("x", "FP32", shape), 0), b""))
    else:
        body, header_length = orjson.dumps({"inputs": [i("x", "FP32", shape, data=[])]}), None
    with pytest.raises(InvalidRequest, match="its sizes multiply to more than any tensor can hold"):
        decode_infer_request(body, header_length, metas, [])
    # an empty tensor of addressable sizes is fine
    empty = orjson.dumps({"inputs": [i("x", "FP32", [0, 3, 4], data=[])]})
    assert decode_infer_request(empty, None, metas, []).inputs["x"].shape == (0, 3, 4)
