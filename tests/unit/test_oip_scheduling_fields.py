"""What the node reads from an inference request without decoding its tensors."""

from __future__ import annotations

import orjson
import pytest

from gpuvisor.api.oip import request_parameters, request_rows
from gpuvisor.errors import InvalidRequest


@pytest.mark.parametrize(
    ("head", "rows"),
    [
        (b'{"inputs":[{"name":"x","shape":[16,4],"datatype":"FP32","data":[]}]}', 16),
        (b'{"inputs":[{"name":"x","shape": [ 3 ],"datatype":"FP32"}]}', 3),
        (b'{"inputs":[{"name":"x","datatype":"FP32","shape":[-1,4]}]}', 1),
        (b'{"inputs":[{"name":"x","shape":["a"]}]}', 1),
        (b'{"inputs":[]}', 1),
        (b"not json at all", 1),
    ],
)
def test_rows_come_from_the_first_shape(head: bytes, rows: int) -> None:
    assert request_rows(head) == rows


def test_parameters_are_read_from_the_header_of_a_binary_request() -> None:
    header = orjson.dumps({"inputs": [], "parameters": {"priority": 2, "timeout": 5000}})
    body = header + b"\x00" * 64 + b'"timeout"'  # tensor bytes after the header are not read
    assert request_parameters(body, len(header)) == (2, 0.005)
    assert request_parameters(b'{"inputs":[]}', -1) == (None, None)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(InvalidRequest, match="priority"):
        request_parameters(b'{"parameters":{"priority":true}}', -1)
    with pytest.raises(InvalidRequest, match="timeout"):
        request_parameters(b'{"parameters":{"timeout":-5}}', -1)
