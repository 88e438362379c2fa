"""Tests for the OIP tensor codec, including compatibility with the real tritonclient encoder."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gpuvisor.errors import ExecutionError
from gpuvisor.runtime.tensors import (
    DATATYPES,
    InferRequest,
    RequestedOutput,
    TensorMeta,
    decode_infer_request,
    encode_error,
    encode_infer_response,
    json_infer_request,
)

SHAPES = hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=4)
TO_TEXT = np.frompyfunc(bytes.decode, 1, 1)
TO_BYTES = np.frompyfunc(str.encode, 1, 1)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def tensors(draw: st.DrawFn, datatype: str, text_only: bool = False) -> np.ndarray:
    """A random array of ``datatype``; BYTES as an object array of bytes."""
    shape = draw(SHAPES)
    if datatype == "BYTES":
        element = st.text(max_size=6).map(str.encode) if text_only else st.binary(max_size=6)
        items = draw(st.lists(element, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
        array = np.empty(len(items), dtype=object)
        array[:] = items
        return array.reshape(shape)
    dtype = DATATYPES[datatype]
    # JSON cannot carry NaN or infinities; binary round trips of them are covered separately.
    elements = (
        hnp.from_dtype(dtype, allow_nan=False, allow_infinity=False)
        if dtype.kind == "f"
        else hnp.from_dtype(dtype)
    )
    return draw(hnp.arrays(dtype, shape, elements=elements))


def model_shape(draw: st.DrawFn, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The array's shape with some dims turned into wildcards."""
    return tuple(-1 if draw(st.booleans()) else d for d in shape)


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert got.dtype == want.dtype
    assert got.tolist() == want.tolist()


def triton_request(arrays: dict[str, tuple[str, np.ndarray]], binary: bool, **kwargs: Any) -> Any:
    inputs = [
        triton.InferInput(name, list(array.shape), datatype).set_data_from_numpy(
            array, binary_data=binary
        )
        for name, (datatype, array) in arrays.items()
    ]
    return triton.InferenceServerClient.generate_request_body(inputs, **kwargs)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("datatype", list(DATATYPES))
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@SETTINGS
@given(data=st.data())
def test_tritonclient_request_decodes_to_the_same_array(
    datatype: str, binary: bool, data: st.DataObject
) -> None:
    array = data.draw(tensors(datatype, text_only=not binary))
    meta = TensorMeta("x", datatype, model_shape(data.draw, array.shape))
    body, header_length = triton_request({"x": (datatype, array)}, binary, request_id="req-7")
    assert (header_length is not None) == binary
    request = decode_infer_request(body, header_length, [meta], [meta])
    assert request.id == "req-7"
    assert request.outputs is None and request.binary_output  # tritonclient's default
    assert_same(request.inputs["x"], array)


@pytest.mark.parametrize("datatype", list(DATATYPES))
@SETTINGS
@given(data=st.data())
def test_nested_json_data_decodes_like_flat_data(datatype: str, data: st.DataObject) -> None:
    array = data.draw(tensors(datatype, text_only=True))
    as_json = TO_TEXT if datatype == "BYTES" else np.asarray
    meta = TensorMeta("x", datatype, tuple(array.shape))
    for layout in (as_json(array).tolist(), as_json(array.reshape(-1)).tolist()):
        entry = {"name": "x", "datatype": datatype, "shape": list(array.shape), "data": layout}
        body = orjson.dumps({"inputs": [entry]})
        assert_same(decode_infer_request(body, None, [meta], [meta]).inputs["x"], array)


@pytest.mark.parametrize("datatype", list(DATATYPES))
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@SETTINGS
@given(data=st.data())
def test_response_decodes_with_tritonclient(
    datatype: str, binary: bool, data: st.DataObject
) -> None:
    array = data.draw(tensors(datatype, text_only=not binary))
    meta = TensorMeta("y", datatype, model_shape(data.draw, array.shape))
    request = InferRequest("abc", {}, {}, None, binary_output=binary)
    body, header_length = encode_infer_response("m", "3", request, {"y": array}, [meta])
    assert (header_length is not None) == binary
    result = triton.InferResult.from_response_body(body, verbose=False, header_length=header_length)
    assert result.get_response()["id"] == "abc"
    assert result.get_response()["model_version"] == "3"
    got = result.as_numpy("y")
    if datatype == "BYTES" and not binary:  # tritonclient leaves JSON strings as str
        got = TO_BYTES(got)
    assert got.shape == array.shape
    assert got.tolist() == array.tolist()


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
def test_binary_round_trip_keeps_nan_and_infinities(datatype: str) -> None:
    array = np.array([np.nan, np.inf, -np.inf, -0.0, 1.5], dtype=DATATYPES[datatype])
    meta = TensorMeta("x", datatype, (-1,))
    body, header_length = triton_request({"x": (datatype, array)}, True)
    decoded = decode_infer_request(body, header_length, [meta], [meta]).inputs["x"]
    assert decoded.tobytes() == array.tobytes()
    request = InferRequest(None, {}, {}, binary_output=True)
    out, length = encode_infer_response("m", "1", request, {"x": decoded}, [meta])
    result = triton.InferResult.from_response_body(out, header_length=length)
    assert result.as_numpy("x").tobytes() == array.tobytes()


def test_several_inputs_mixing_json_and_binary_are_read_in_order() -> None:
    a = np.arange(6, dtype=np.int16).reshape(2, 3)
    b = np.array([b"x", b"\x00\xff", b""], dtype=object)
    c = np.array([[True, False]])
    inputs = [
        triton.InferInput("a", [2, 3], "INT16").set_data_from_numpy(a, binary_data=True),
        triton.InferInput("c", [1, 2], "BOOL").set_data_from_numpy(c, binary_data=False),
        triton.InferInput("b", [3], "BYTES").set_data_from_numpy(b, binary_data=True),
    ]
    body, header_length = triton.InferenceServerClient.generate_request_body(inputs)
    metas = [
        TensorMeta("b", "BYTES", (-1,)),
        TensorMeta("a", "INT16", (-1, 3)),
        TensorMeta("c", "BOOL", (1, 2)),
    ]
    decoded = decode_infer_request(body, header_length, metas, []).inputs
    assert_same(decoded["a"], a)
    assert_same(decoded["b"], b)
    assert_same(decoded["c"], c)
    assert all(array.flags.aligned for array in decoded.values())


def test_binary_bool_treats_any_nonzero_byte_as_true() -> None:
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "m",
                    "datatype": "BOOL",
                    "shape": [3],
                    "parameters": {"binary_data_size": 3},
                }
            ]
        }
    )
    meta = TensorMeta("m", "BOOL", (3,))
    decoded = decode_infer_request(header + b"\x00\x07\x01", len(header), [meta], []).inputs["m"]
    assert decoded.dtype == np.bool_
    assert decoded.tolist() == [False, True, True]


# --------------------------------------------------------------------------- responses


OUTS = [TensorMeta("scores", "FP32", (-1,)), TensorMeta("label", "BYTES", (-1,))]
RESULTS = {
    "scores": np.array([0.5, 1.25], dtype=np.float32),
    "label": np.array([b"cat", b"dog"], dtype=object),
}


def response(request: InferRequest) -> tuple[dict[str, Any], bytes, int | None]:
    body, header_length = encode_infer_response("shelf", "2", request, RESULTS, OUTS)
    header = body if header_length is None else body[:header_length]
    return orjson.loads(header), body, header_length


def test_json_response_has_the_oip_shape() -> None:
    doc, _, header_length = response(InferRequest("r-1", {}, {}))
    assert header_length is None
    assert doc == {
        "model_name": "shelf",
        "model_version": "2",
        "id": "r-1",
        "outputs": [
            {"name": "scores", "datatype": "FP32", "shape": [2], "data": [0.5, 1.25]},
            {"name": "label", "datatype": "BYTES", "shape": [2], "data": ["cat", "dog"]},
        ],
    }


def test_response_omits_id_when_the_request_had_none() -> None:
    doc, _, _ = response(InferRequest(None, {}, {}))
    assert "id" not in doc


@pytest.mark.parametrize(
    ("outputs", "binary_output", "expect"),
    [
        (None, False, {"scores": "json", "label": "json"}),
        (None, True, {"scores": "binary", "label": "binary"}),
        ([RequestedOutput("label")], False, {"label": "json"}),
        ([RequestedOutput("label", True)], False, {"label": "binary"}),
        (
            [RequestedOutput("scores", False), RequestedOutput("label")],
            True,
            {"scores": "json", "label": "binary"},
        ),
        (
            [RequestedOutput("label", None), RequestedOutput("scores", True)],
            False,
            {"label": "json", "scores": "binary"},
        ),
    ],
)
def test_each_output_goes_binary_or_json_as_requested(
    outputs: list[RequestedOutput] | None, binary_output: bool, expect: dict[str, str]
) -> None:
    doc, body, header_length = response(InferRequest(None, {}, {}, outputs, binary_output))
    got = {o["name"]: "binary" if "parameters" in o else "json" for o in doc["outputs"]}
    assert got == expect
    assert list(got) == list(expect)  # requested order is kept
    assert (header_length is not None) == ("binary" in expect.values())
    result = triton.InferResult.from_response_body(body, header_length=header_length)
    for name in expect:
        values = result.as_numpy(name).tolist()
        want = RESULTS[name].tolist()
        assert values == want or values == [b.decode() for b in want]


def test_binary_sizes_add_up_to_the_body() -> None:
    doc, body, header_length = response(InferRequest(None, {}, {}, binary_output=True))
    assert header_length is not None
    sizes = [o["parameters"]["binary_data_size"] for o in doc["outputs"]]
    assert sizes == [8, 4 + 3 + 4 + 3]
    assert len(body) == header_length + sum(sizes)


def test_json_encodes_bool_as_true_false_and_fp16_as_floats() -> None:
    metas = [TensorMeta("flag", "BOOL", (-1,)), TensorMeta("half", "FP16", (-1,))]
    results = {"flag": np.array([True, False]), "half": np.array([0.5, -2.0], dtype=np.float16)}
    body, _ = encode_infer_response("m", "1", InferRequest(None, {}, {}), results, metas)
    assert b'"data":[true,false]' in body
    assert b'"data":[0.5,-2.0]' in body


def test_non_utf8_bytes_output_falls_back_to_binary() -> None:
    results = {**RESULTS, "label": np.array([b"\xff\xfe", b"ok"], dtype=object)}
    request = InferRequest(None, {}, {}, [RequestedOutput("label", False)])
    body, header_length = encode_infer_response("m", "1", request, results, OUTS)
    assert header_length is not None
    result = triton.InferResult.from_response_body(body, header_length=header_length)
    assert result.as_numpy("label").tolist() == [b"\xff\xfe", b"ok"]


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
def test_a_float_output_with_infinities_or_nan_falls_back_to_binary(datatype: str) -> None:
    """JSON has no number for them (written as null, a client would read NaN for 1/0)."""
    meta = TensorMeta("y", datatype, (-1,))
    values = np.array([np.inf, -np.inf, np.nan, 0.5], dtype=DATATYPES[datatype])
    finite = np.array([0.25, 0.5], dtype=DATATYPES[datatype])
    request = InferRequest(None, {}, {})  # JSON asked for
    body, header_length = encode_infer_response("m", "1", request, {"y": values}, [meta])
    assert header_length is not None
    got = triton.InferResult.from_response_body(body, header_length=header_length).as_numpy("y")
    assert got.tobytes() == values.tobytes()
    body, header_length = encode_infer_response("m", "1", request, {"y": finite}, [meta])
    assert header_length is None and b'"data":[0.25,0.5]' in body


def test_outputs_are_cast_to_their_declared_datatype() -> None:
    metas = [TensorMeta("n", "INT32", (-1, 2))]
    results = {"n": np.arange(4, dtype=np.int64).reshape(2, 2).T}  # non-contiguous, wider type
    request = InferRequest(None, {}, {}, binary_output=True)
    body, header_length = encode_infer_response("m", "1", request, results, metas)
    got = triton.InferResult.from_response_body(body, header_length=header_length).as_numpy("n")
    assert got.dtype == np.int32
    assert got.tolist() == [[0, 2], [1, 3]]


def test_missing_result_is_an_execution_error() -> None:
    with pytest.raises(ExecutionError, match="did not produce output 'label'"):
        encode_infer_response(
            "m", "1", InferRequest(None, {}, {}), {"scores": RESULTS["scores"]}, OUTS
        )


def test_encode_error_and_tensor_meta_dict() -> None:
    assert orjson.loads(encode_error("input 'x' is bad")) == {"error": "input 'x' is bad"}
    assert TensorMeta("x", "FP32", (-1, 3)).to_dict() == {
        "name": "x",
        "datatype": "FP32",
        "shape": [-1, 3],
    }


def test_json_infer_request_decodes_to_its_inputs() -> None:
    inputs = {
        "features": np.arange(6, dtype=np.float32).reshape(2, 3),
        "ids": np.array([[7, -1]], dtype=np.int64),
    }
    metas = [TensorMeta("features", "FP32", (-1, 3)), TensorMeta("ids", "INT64", (-1, 2))]
    body = json_infer_request(inputs, {"priority": 1})
    assert orjson.loads(body)["parameters"] == {"priority": 1}
    decoded = decode_infer_request(body, None, metas, [])
    for name, array in inputs.items():
        np.testing.assert_array_equal(decoded.inputs[name], array)
        assert decoded.inputs[name].dtype == array.dtype
