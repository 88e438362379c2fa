"""Start a node as a child process on a free loopback port and wait until it serves
(used by the benchmarks and the tests; stops only the process it started, by PID)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

__all__ = ["NodeProcess", "free_port"]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class NodeProcess:
    """A `gpuvisor up` child process on 127.0.0.1."""

    state_dir: Path
    port: int = field(default_factory=free_port)
    config: Path | None = None
    demo: bool = True
    db: str | None = None
    """A database URL (``--db``); None uses SQLite in the state directory."""
    log_path: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)
    """More `gpuvisor up` options (``["--log-format", "json"]``)."""
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> NodeProcess:
        """Start the node and wait until every slice has finished loading; raise if it does not.
        A node this object started already and that still runs is kept (``with
        NodeProcess(...).start()`` starts one node, not two)."""
        if self.process is not None and self.process.poll() is None:
            return self
        cmd = [
            sys.executable,
            "-m",
            "gpuvisor",
            "up",
            "--state",
            str(self.state_dir),
            "--port",
            str(self.port),
            "--demo" if self.demo else "--no-demo",
        ]
        if self.config is not None:
            cmd += ["--config", str(self.config)]
        if self.db is not None:
            cmd += ["--db", self.db]
        cmd += self.extra_args
        log_path = self.log_path or (self.state_dir / "node.log")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab")  # noqa: SIM115 - the child keeps writing to it
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **self.extra_env}
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        try:
            self.wait_ready(timeout, log_path)
        except BaseException:
            self.stop()  # a node that did not come up is not left running (with its workers)
            raise
        return self

    def wait_ready(self, timeout: float, log_path: Path | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                tail = log_path.read_text()[-3000:] if log_path and log_path.exists() else ""
                raise RuntimeError(f"node exited with code {self.process.returncode}:\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                ready = httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200
                if ready and self._slices_settled():
                    return
            time.sleep(0.2)
        raise TimeoutError(f"node at {self.url} was not ready within {timeout:.0f}s")

    def _slices_settled(self) -> bool:
        response = httpx.get(
            f"{self.url}/api/v1/slices", headers=self.auth(self.admin_key), timeout=5
        )
        items = response.json()["items"]
        return all(s["state"] not in ("Loading", "Restarting", "Stopping") for s in items)

    @property
    def admin_key(self) -> str:
        return (self.state_dir / "admin.key").read_text().strip()

    def tenant_key(self, tenant: str) -> str:
        keys = json.loads((self.state_dir / "demo" / "tenant-keys.json").read_text())
        return str(keys[tenant])

    @staticmethod
    def auth(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    def apply_as_admin(self, manifest: str, timeout: float = 60.0) -> dict[str, Any]:
        """Apply a YAML manifest with the admin key and return the answer; RuntimeError with
        the node's answer when it is refused."""
        answer = httpx.post(
            f"{self.url}/api/v1/apply",
            headers=self.auth(self.admin_key),
            content=manifest,
            timeout=timeout,
        )
        if answer.status_code != 200:
            raise RuntimeError(f"apply failed ({answer.status_code}): {answer.text}")
        result: dict[str, Any] = answer.json()
        return result

    def create_tenant_key(self, tenant: str, description: str = "") -> str:
        """Create a key for ``tenant`` with the admin key and return its secret; RuntimeError
        with the node's answer when it is refused."""
        answer = httpx.post(
            f"{self.url}/api/v1/keys",
            headers=self.auth(self.admin_key),
            json={"role": "tenant", "tenant": tenant, "description": description},
            timeout=30,
        )
        if answer.status_code != 201:
            raise RuntimeError(f"key creation failed ({answer.status_code}): {answer.text}")
        return str(answer.json()["key"])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` to the node process (only it) and wait for it to exit; return its code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
