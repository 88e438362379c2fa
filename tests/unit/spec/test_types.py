"""Field types of the spec: sizes, durations, names, flags, versions, digests, base config."""

from __future__ import annotations

import json
from datetime import date

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from gpuvisor.spec.types import (
    AutoFlag,
    DnsLabel,
    Duration,
    ModelVersion,
    Sha256Digest,
    Size,
    SpecModel,
)
from gpuvisor.units import format_size, parse_size

SIZE = TypeAdapter(Size)
DURATION = TypeAdapter(Duration)


@pytest.mark.parametrize(
    ("given_value", "expected"),
    [
        ("512Mi", 512 * 2**20),
        ("2Gi", 2 * 2**30),
        ("1Ki", 1024),
        ("1.5Ki", 1536),
        ("1G", 10**9),
        ("64Mi", 64 * 1024 * 1024),
        ("100", 100),
        ("100B", 100),
        (4096, 4096),
        (0, 0),
    ],
)
def test_size_reads_units_and_plain_bytes(given_value: object, expected: int) -> None:
    value = SIZE.validate_python(given_value)
    assert value == expected
    assert isinstance(value, int)


@pytest.mark.parametrize("bad", ["12 parsecs", "lots", "-1Gi", -5, True, "1Qi"])
def test_size_refuses_unreadable_values_and_names_the_accepted_form(bad: object) -> None:
    with pytest.raises(ValidationError) as info:
        SIZE.validate_python(bad)
    message = str(info.value)
    assert "512Mi" in message or "negative" in message


@pytest.mark.parametrize(
    ("given_value", "expected"),
    [
        ("500us", 500e-6),
        ("2ms", 0.002),
        ("1.5s", 1.5),
        ("250ns", 250e-9),
        ("1m", 60.0),
        ("1h", 3600.0),
        (3, 3.0),
        (0.25, 0.25),
        # text that reads as a number is seconds too, as for every other number
        ("5", 5.0),
        ("0.05", 0.05),
        ("1e-1", 0.1),  # YAML reads it as text
    ],
)
def test_duration_reads_units_and_plain_seconds(given_value: object, expected: float) -> None:
    value = DURATION.validate_python(given_value)
    assert value == pytest.approx(expected)
    assert isinstance(value, float)


@pytest.mark.parametrize("bad", ["2 parsecs", "fast", "5x", "-2ms", -1, False])
def test_duration_refuses_unreadable_values(bad: object) -> None:
    with pytest.raises(ValidationError) as info:
        DURATION.validate_python(bad)
    message = str(info.value)
    assert "2ms" in message or "negative" in message


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["Ki", "Mi", "Gi", "Ti"]))
def test_size_with_binary_unit_is_count_times_power_of_two(count: int, unit: str) -> None:
    factor = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[unit]
    assert SIZE.validate_python(f"{count}{unit}") == count * factor


@given(st.integers(min_value=0, max_value=10**9))
def test_duration_in_us_and_ms_agree(count: int) -> None:
    assert DURATION.validate_python(f"{count}ms") == pytest.approx(
        DURATION.validate_python(f"{count * 1000}us")
    )


class _Settings(SpecModel):
    max_body_size: Size
    queue_delay: Duration


def test_json_dump_gives_numbers_with_camel_case_keys() -> None:
    settings = _Settings.model_validate({"maxBodySize": "2Gi", "queueDelay": "2ms"})
    dumped = settings.model_dump(by_alias=True, mode="json")
    assert dumped == {"maxBodySize": 2 * 2**30, "queueDelay": 0.002}
    assert json.loads(json.dumps(dumped)) == dumped


def test_spec_model_accepts_python_names_and_refuses_unknown_fields() -> None:
    by_name = _Settings(max_body_size=10, queue_delay=1.0)
    assert by_name.max_body_size == 10
    with pytest.raises(ValidationError) as info:
        _Settings.model_validate({"maxBodySize": 1, "queueDelay": 1, "colour": "red"})
    assert info.value.errors()[0]["type"] == "extra_forbidden"
    assert info.value.errors()[0]["loc"] == ("colour",)


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("shelf-detector", True),
        ("a", True),
        ("retail2", True),
        ("0abc", True),
        ("a" * 63, True),
        ("a" * 64, False),
        ("Shelf", False),
        ("shelf_detector", False),
        ("-shelf", False),
        ("shelf-", False),
        ("", False),
        ("shelf.detector", False),
    ],
)
def test_dns_label_names(name: str, valid: bool) -> None:
    adapter = TypeAdapter(DnsLabel)
    if valid:
        assert adapter.validate_python(name) == name
    else:
        with pytest.raises(ValidationError, match="lowercase letters, digits and '-'"):
            adapter.validate_python(name)


@pytest.mark.parametrize(
    ("given_value", "expected"),
    [
        ("auto", "auto"),
        ("AUTO", "auto"),
        (True, True),
        (False, False),
        ("true", True),
        ("no", False),
        ("off", False),
        ("yes", True),
    ],
)
def test_auto_flag_reads_auto_true_false(given_value: object, expected: object) -> None:
    assert TypeAdapter(AutoFlag).validate_python(given_value) == expected


@pytest.mark.parametrize("bad", ["maybe", 1, None])
def test_auto_flag_refuses_other_values(bad: object) -> None:
    with pytest.raises(ValidationError, match="expected true, false or auto"):
        TypeAdapter(AutoFlag).validate_python(bad)


@pytest.mark.parametrize(
    ("given_value", "expected"),
    [(3, "3"), ("3", "3"), ("2024.06", "2024.06"), ("v2-beta", "v2-beta"), ("1.10", "1.10")],
)
def test_model_version_is_text(given_value: object, expected: str) -> None:
    assert TypeAdapter(ModelVersion).validate_python(given_value) == expected


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        (1.1, "quote it"),
        (date(2024, 1, 1), "read as a date"),
        ("-1", "invalid version"),
        ("a@b", "invalid version"),
        ("", "invalid version"),
        (True, "valid string"),
    ],
)
def test_model_version_refusals_say_why(bad: object, fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        TypeAdapter(ModelVersion).validate_python(bad)


def test_sha256_is_lowered_and_checked() -> None:
    adapter = TypeAdapter(Sha256Digest)
    digest = "AB" * 32
    assert adapter.validate_python(digest) == "ab" * 32
    with pytest.raises(ValidationError, match="64 hexadecimal characters"):
        adapter.validate_python("ab" * 31)
    with pytest.raises(ValidationError, match="64 hexadecimal characters"):
        adapter.validate_python("zz" * 32)


@pytest.mark.parametrize(
    ("n_bytes", "nearest", "up", "down"),
    [
        (2**30, "1Gi", "1Gi", "1Gi"),  # exact: the same whichever way
        (int(4.25 * 2**30), "4.2Gi", "4.3Gi", "4.2Gi"),
        (int(4.21 * 2**30), "4.2Gi", "4.3Gi", "4.2Gi"),
        (int(4.29 * 2**30), "4.3Gi", "4.3Gi", "4.2Gi"),
        (1536, "1.5Ki", "1.5Ki", "1.5Ki"),
        (1000, "1000", "1000", "1000"),
    ],
)
def test_sizes_are_written_rounded_as_asked(n_bytes: int, nearest: str, up: str, down: str) -> None:
    assert format_size(n_bytes) == nearest
    assert format_size(n_bytes, "up") == up
    assert format_size(n_bytes, "down") == down
    assert (
        parse_size(format_size(n_bytes, "up"))
        >= n_bytes
        >= parse_size(format_size(n_bytes, "down"))
    )


def test_a_duration_too_long_for_a_number_says_so() -> None:
    with pytest.raises(ValidationError, match="duration '1e400' is too long"):
        DURATION.validate_python("1e400")
