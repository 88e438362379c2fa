"""What `gpuvisor up` checks and sets up for itself before it serves: its lock files, its
limit on open files, and the socket folders that killed nodes left behind. Real files, real
processes."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from gpuvisor.errors import ConfigError
from gpuvisor.launch import free_port
from gpuvisor.runtime.pool import sweep_stale_runtime_dirs
from gpuvisor.serve_guards import lock_database, lock_state_dir


def test_a_state_directory_the_node_cannot_write_is_one_clear_error() -> None:
    # /proc/self takes no new files, for root too (CI may run as root)
    with pytest.raises(ConfigError) as caught:
        lock_state_dir(Path("/proc/self"))
    assert caught.value.message.startswith("cannot write the lock file /proc/self/node.lock (")
    assert "read-only file system cannot be used" in caught.value.message


def test_up_raises_its_soft_limit_on_open_files_to_the_hard_one() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65_536 if hard == resource.RLIM_INFINITY else min(hard, 65_536)
    script = (
        "import resource\n"
        "from gpuvisor.serve_guards import raise_open_file_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))\n"
        "raise_open_file_limit()\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert int(out) == max(want, min(256, hard))


def test_socket_folders_of_killed_nodes_are_swept_and_live_ones_kept() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free now (reaped)
    root = Path(tempfile.gettempdir())
    stale = Path(tempfile.mkdtemp(prefix=f"gpuvisor-{dead.pid}-"))
    (stale / "node.sock").write_text("")
    live = Path(tempfile.mkdtemp(prefix=f"gpuvisor-{os.getpid()}-"))
    unnamed = Path(tempfile.mkdtemp(prefix="gpuvisor-", dir=root))
    try:
        sweep_stale_runtime_dirs()
        assert not stale.exists(), "the killed node's folder is removed"
        assert live.exists() and unnamed.exists(), "a live node's, or an unknown one, stays"
    finally:
        for path in (stale, live, unnamed):
            if path.exists():
                path.rmdir()


@pytest.mark.postgres
def test_one_node_per_postgresql_schema(pg_url: str, other_pg_url: str) -> None:

    held = lock_database(pg_url)
    assert held is not None
    try:
        with pytest.raises(ConfigError) as caught:
            lock_database(pg_url)  # another connection: another node, as far as the server knows
        message = caught.value.message
        assert message.startswith(f"another gpuvisor node (gpuvisor node pid {os.getpid()} on ")
        assert "(schema gv_test_" in message
        other = lock_database(other_pg_url)  # another schema is another node's state
        assert other is not None
        other.close()
    finally:
        held.close()
    again = lock_database(pg_url)  # let go with its connection
    assert again is not None
    again.close()
    # a server that does not answer is one clear error, with the password hidden
    unreachable = make_url(pg_url).set(port=free_port(), password="s3cret")
    with pytest.raises(ConfigError) as caught:
        lock_database(unreachable.render_as_string(hide_password=False))
    assert caught.value.message.startswith("cannot open the database postgresql+psycopg://")
    assert "s3cret" not in caught.value.message and "check --db" in caught.value.message
