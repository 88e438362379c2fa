"""The node's log lines: key=value text or JSON, always to the stderr of the moment."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator

import orjson
import pytest

from gpuvisor import logs
from gpuvisor.logs import configure_logging, configure_worker_logging, worker_log_environment


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level, stderr = root.handlers[:], root.level, sys.stderr
    settings = worker_log_environment()
    try:
        yield
    finally:
        logs._settings.update(settings)
        sys.stderr = stderr
        root.handlers[:] = handlers
        root.setLevel(level)


def test_logs_follow_stderr_when_it_is_replaced_and_closed(restore_logging: None) -> None:
    first = io.StringIO()
    sys.stderr = first
    configure_logging("INFO")
    log = logging.getLogger("gpuvisor.test")
    log.info("slice %s ready", "retail/shelf-detector/0", extra={"tenant": "retail"})
    assert first.getvalue().endswith(
        "INFO gpuvisor.test slice retail/shelf-detector/0 ready tenant=retail\n"
    )
    # whoever set stderr closes it and puts another in place: records go to the new one
    first.close()
    second = io.StringIO()
    sys.stderr = second
    log.warning("after the swap")
    assert second.getvalue().endswith("WARNING gpuvisor.test after the swap\n")
    assert "Logging error" not in second.getvalue()


def test_json_lines_carry_the_tenant_and_request_id(restore_logging: None) -> None:
    out = io.StringIO()
    sys.stderr = out
    configure_logging("INFO", "json")
    logging.getLogger("gpuvisor.test").info(
        "refused", extra={"tenant": "support", "request_id": "r-1"}
    )
    line = orjson.loads(out.getvalue().splitlines()[-1])
    assert (line["level"], line["message"], line["tenant"], line["request_id"]) == (
        "INFO",
        "refused",
        "support",
        "r-1",
    )


def test_a_worker_logs_in_the_format_and_at_the_level_of_its_node(restore_logging: None) -> None:
    configure_logging("warning", "json")
    environ = worker_log_environment()
    assert environ == {"GPUVISOR_LOG_LEVEL": "WARNING", "GPUVISOR_LOG_FORMAT": "json"}
    out = io.StringIO()
    sys.stderr = out
    configure_worker_logging("w3-4242", environ)
    log = logging.getLogger("gpuvisor.worker")
    log.info("not at the node's level")
    log.warning("slice %s failed to load", "retail/sku-lookup/0", extra={"tenant": "retail"})
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [(x["level"], x["message"], x["worker"], x["tenant"]) for x in lines] == [
        ("WARNING", "slice retail/sku-lookup/0 failed to load", "w3-4242", "retail")
    ]


def test_a_worker_given_an_unknown_format_logs_text(restore_logging: None) -> None:
    out = io.StringIO()
    sys.stderr = out
    configure_worker_logging("w1-7", {"GPUVISOR_LOG_FORMAT": "xml"})
    logging.getLogger("gpuvisor.worker").info("ready")
    assert out.getvalue().endswith("INFO gpuvisor.worker ready worker=w1-7\n")


def test_text_fields_a_client_chose_cannot_pass_for_other_fields(restore_logging: None) -> None:
    """A request id is the client's X-Request-ID: one holding ' tenant=retail' is quoted, so
    that the line's tenant= field stays the node's own."""
    out = io.StringIO()
    sys.stderr = out
    configure_logging("INFO")
    log = logging.getLogger("gpuvisor.test")
    log.info("401", extra={"request_id": "r1 tenant=retail"})
    log.info("ok", extra={"request_id": "plain-id_7", "tenant": "support"})
    log.info("odd", extra={"request_id": 'a"b\nc'})
    first, second, third = out.getvalue().splitlines()[-3:]
    assert first.endswith(' 401 request_id="r1 tenant=retail"')
    assert " tenant=" not in first.replace('"r1 tenant=retail"', "")
    assert second.endswith(" ok tenant=support request_id=plain-id_7")
    assert third.endswith(' odd request_id="a\\"b\\nc"')


def test_a_message_holding_a_newline_stays_one_line(restore_logging: None) -> None:
    """A name from a URL (``/v2/models/x%0A2026-… WARNING …``) is quoted in error messages:
    its newline must not start a line that passes for an event of the node's own."""
    out = io.StringIO()
    sys.stderr = out
    configure_logging("INFO")
    forged = "x\n2026-11-22T00:00:00Z WARNING gpuvisor.control FAKE\r\x1b[2J\tend"
    logging.getLogger("gpuvisor.api").info("model '%s' not found", forged)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].endswith(
        "model 'x\\n2026-11-22T00:00:00Z WARNING gpuvisor.control FAKE\\r\\u001b[2J\\tend' "
        "not found"
    ), lines[0]
