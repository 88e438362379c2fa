"""What the node reads from an inference request without decoding its tensors."""

from __future__ import annotations

import tracemalloc

import orjson
import pytest

from gpuvisor.api.outline import RequestOutline, request_outline
from gpuvisor.errors import InvalidRequest


@pytest.mark.parametrize(
    ("head", "rows"),
    [
        (b'{"inputs":[{"name":"x","shape":[16,4],"datatype":"FP32","data":[]}]}', 16),
        (b'{"inputs":[{"name":"x","shape": [ 3 ],"datatype":"FP32"}]}', 3),
        (b'{"inputs":[{"name":"x","datatype":"FP32","shape":[-1,4]}]}', 1),
        (b'{"inputs":[{"name":"x","shape":["a"]}]}', 1),
        (b'{"inputs":[{"name":"x","shape":[true]}]}', 1),
        (b'{"inputs":[{"name":"x","shape":[]}]}', 1),
        (b'{"inputs":[{"name":"x","shape":null}]}', 1),
        (b'{"inputs":[]}', 1),
        (b'{"inputs":5}', 1),
        (b"[1, 2]", 1),
        (b"not json at all", 1),
        # the largest first dimension of the inputs, wherever the keys are and whatever else
        # holds a "shape": a model that broadcasts a 1-row input runs the other's 9 rows
        (b'{"id":"a","inputs":[{"data":[1,2],"shape":[2,1],"name":"x"},{"shape":[9]}]}', 9),
        (b'{"inputs":[{"shape":[1,4]},{"shape":[20,4]}]}', 20),
        (b'{"inputs":[{"shape":[20,4]},{"shape":[1,4]}]}', 20),
        (b'{"inputs":[{"shape":[5,4]},{"shape":["x"]}]}', 5),
        (b'{"parameters":{"shape":[1000000000000000]},"inputs":[{"shape":[2,4]}]}', 2),
        (b'{"inputs":[{"parameters":{"shape":[7]},"name":"x","shape":[3,4]}]}', 3),
        (b'{"inputs":[{"name":"x","data":["\\"shape\\": [50]"],"shape":[4]}]}', 4),
    ],
)
def test_rows_are_the_largest_first_dimension_of_the_inputs(head: bytes, rows: int) -> None:
    assert request_outline(head).rows == rows


@pytest.mark.parametrize("where", ["data", "shape", "an unknown field"])
def test_json_nested_too_deeply_is_refused_as_the_callers_fault(where: str) -> None:
    deep = b"[" * 5000 + b"1" + b"]" * 5000
    field = {"data": b'"data":', "shape": b'"shape":', "an unknown field": b'"extra":'}[where]
    head = b'{"inputs":[{"name":"x","datatype":"FP32",' + field + deep + b"}]}"
    with pytest.raises(InvalidRequest, match="nests arrays or objects too deeply"):
        request_outline(head)


def test_parameters_are_read_from_the_header_of_a_binary_request() -> None:
    header = orjson.dumps({"inputs": [], "parameters": {"priority": 2, "timeout": 5000}})
    assert request_outline(header) == RequestOutline(1, 2, 0.005)
    assert request_outline(b'{"inputs":[]}') == RequestOutline()
    # 0 is no timeout, as in Triton
    assert request_outline(b'{"parameters":{"timeout":0}}') == RequestOutline(1, None, None)
    assert request_outline(b'{"parameters":{"timeout":0.0}}') == RequestOutline(1, None, None)


def test_parameters_count_wherever_they_are_and_only_at_the_top() -> None:
    # tritonclient writes "parameters" after "inputs"
    late = b'{"inputs":[{"name":"x","shape":[2,4],"data":[1,2]}],"parameters":{"timeout":100}}'
    assert request_outline(late) == RequestOutline(2, None, 0.0001)
    nested = b'{"inputs":[{"name":"x","shape":[1],"parameters":{"priority":3,"timeout":-1}}]}'
    assert request_outline(nested) == RequestOutline(1, None, None)
    # an input list the worker will refuse does not hide the parameters
    assert request_outline(b'{"inputs":"x","parameters":{"priority":1}}') == RequestOutline(1, 1)


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (
            b'{"parameters":{"priority":true}}',
            "parameter 'priority' must be a non-negative integer",
        ),
        (b'{"parameters":{"priority":-1}}', "got -1"),
        (b'{"parameters":{"priority":1.5}}', "got 1.5"),
        (
            b'{"parameters":{"timeout":-5}}',
            "parameter 'timeout' must be a number of microseconds ≥ 0",
        ),
        (b'{"parameters":{"timeout":"10"}}', "got '10'"),
        (b'{"parameters":{"timeout":[' + b"1," * 100 + b"1]}}", "got a JSON value of 203 bytes"),
        # beyond any float: a 400 that shows it, not a 500
        (b'{"parameters":{"timeout":1e400}}', "got 1e400"),
        (b'{"parameters":{"priority":-1e400}}', "got -1e400"),
    ],
)
def test_bad_parameters_are_refused(head: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest, match="parameter") as caught:
        request_outline(head)
    assert message in caught.value.message


def test_a_large_json_request_is_outlined_without_decoding_its_data() -> None:
    # 16 MiB of JSON numbers with the parameters at the end, as tritonclient sends them.
    # Decoding them would build 4 million Python floats (over 100 MiB) on the node's shared
    # event loop; the outline builds none of them.
    rows = 250_000
    data = b",".join([b"0.5"] * (rows * 16))
    head = (
        b'{"inputs":[{"name":"x","shape":[%d,16],"datatype":"FP32","data":[' % rows
        + data
        + b']}],"parameters":{"priority":5}}'
    )
    tracemalloc.start()
    try:
        outline = request_outline(head)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert outline == RequestOutline(rows, 5, None)
    assert peak < 64 * 1024, f"outlining {len(head)} bytes allocated {peak} bytes"
