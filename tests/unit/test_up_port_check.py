"""`gpuvisor up` checks its address before it starts anything: a port held by a listener
is refused with a hint, one whose last connections linger in TIME_WAIT (a node that just
stopped under load) is not, and an address the machine does not have says so. Real sockets on
127.0.0.1."""

from __future__ import annotations

import socket

import pytest

from gpuvisor.errors import ConfigError
from gpuvisor.serve_guards import check_port_free


def _listener() -> socket.socket:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn
    server.bind(("127.0.0.1", 0))
    server.listen()
    return server


def test_a_port_a_listener_holds_is_refused_with_a_hint() -> None:
    with _listener() as server:
        port = server.getsockname()[1]
        with pytest.raises(ConfigError) as caught:
            check_port_free("127.0.0.1", port)
    assert caught.value.message == (
        f"cannot listen on 127.0.0.1:{port}: Address already in use. Is another node "
        "running? Stop it or choose another --port."
    )


def test_connections_left_in_time_wait_by_a_stopped_node_do_not_block_the_next_one() -> None:
    with _listener() as server:
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server side closes first: its end goes to TIME_WAIT
        client.recv(1)
        client.close()
    plain = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with plain, pytest.raises(OSError):  # what a probe without SO_REUSEADDR ran into
        plain.bind(("127.0.0.1", port))
    check_port_free("127.0.0.1", port)


def test_an_address_this_machine_does_not_have_says_so() -> None:
    # 192.0.2.1 is reserved for documentation: no machine has it (binding sends nothing)
    with pytest.raises(ConfigError) as caught:
        check_port_free("192.0.2.1", 8700)
    assert caught.value.message.startswith("cannot listen on 192.0.2.1:8700: ")
    assert "Is another node running" not in caught.value.message
    assert "It is not an address of this machine: pass --host 127.0.0.1" in caught.value.message
