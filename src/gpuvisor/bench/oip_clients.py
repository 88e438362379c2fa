"""Keep-alive OIP clients for the multi-tenant benchmarks: open-loop Poisson and saturating load."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import random
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gpuvisor.bench.loadgen import LoadResult

__all__ = ["OipConnection", "SaturatingLoad", "Target", "oip_body", "run_open_loop"]

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class Target:
    """Where one model is served: host:port, model name, request headers (a key or none)."""

    address: str
    model: str
    headers: Mapping[str, str] = field(default_factory=dict)


def oip_body(inputs: Mapping[str, Array]) -> tuple[bytes, int]:
    """Return a binary-extension OIP request body for ``inputs`` (binary outputs asked for)
    and its JSON header's length (the Inference-Header-Content-Length)."""
    from gpuvisor.runtime.tensors import DATATYPES

    names = {dtype: name for name, dtype in DATATYPES.items()}
    header = {
        "inputs": [
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": names[array.dtype],
                "parameters": {"binary_data_size": array.nbytes},
            }
            for name, array in inputs.items()
        ],
        "parameters": {"binary_data_output": True},
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return head + b"".join(np.ascontiguousarray(a).tobytes() for a in inputs.values()), len(head)


class OipConnection:
    """One keep-alive HTTP connection sending the same pre-encoded request again and again."""

    def __init__(self, target: Target, body: bytes, header_length: int, timeout: float = 30.0):
        host, port = target.address.rsplit(":", 1)
        self._conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        self._path = f"/v2/models/{target.model}/infer"
        self._body = body
        self._headers = {
            **target.headers,
            "Inference-Header-Content-Length": str(header_length),
            "Content-Type": "application/octet-stream",
        }

    def send(self) -> None:
        """Send the request and read the whole answer; raise RuntimeError unless it is 200."""
        try:
            self._conn.request("POST", self._path, self._body, self._headers)
            response = self._conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException):
            self._conn.close()  # reconnects on the next request
            raise
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data[:200]!r}")

    def close(self) -> None:
        self._conn.close()


def run_open_loop(
    name: str,
    target: Target,
    inputs: Mapping[str, Array],
    rate: float,
    duration: float,
    seed: int,
    threads: int = 6,
) -> LoadResult:
    """Send Poisson arrivals (``rate`` per second, seeded) for ``duration`` seconds and return
    latencies measured from each request's *scheduled* arrival, so a late send counts.

    ``threads`` keep-alive connections take the arrivals in order. Raises ValueError for a
    rate or duration that is not positive.
    """
    if rate <= 0 or duration <= 0:
        raise ValueError(f"rate and duration must be positive, got {rate} and {duration}")
    rng, at, schedule = random.Random(seed), 0.0, []
    while True:
        at += rng.expovariate(rate)
        if at >= duration:
            break
        schedule.append(at)
    body, header_length = oip_body(inputs)
    tickets, lock = iter(range(len(schedule))), threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    began = time.perf_counter() + 0.05  # every thread has its connection by then

    def client() -> None:
        conn = OipConnection(target, body, header_length)
        try:
            while True:
                with lock:
                    index = next(tickets, None)
                if index is None:
                    return
                due = began + schedule[index]
                pause = due - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                try:
                    conn.send()
                except Exception as exc:
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                else:
                    latencies.append((time.perf_counter() - due) * 1000.0)
        finally:
            conn.close()

    workers = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(duration + 60.0)
    seconds = max(time.perf_counter() - began, 1e-9)
    unique = list(dict.fromkeys(errors))[:5]
    return LoadResult.from_latencies(name, "open", threads, latencies, len(errors), seconds, unique)


def _saturate(jobs: list[dict[str, Any]], duration: float) -> list[list[int]]:
    """Per job, ``concurrency`` threads send back to back for ``duration`` seconds; return
    [answered, failed] per job. The body of the child process SaturatingLoad starts."""
    done = [[0, 0] for _ in jobs]
    lock = threading.Lock()

    def client(index: int, target: Target, body: bytes, header_length: int) -> None:
        conn = OipConnection(target, body, header_length)
        ok = failed = 0
        with contextlib.suppress(Exception):
            conn.send()  # connected and answered once before the parent is told "ready"
        with contextlib.suppress(threading.BrokenBarrierError):
            first.wait(30.0)
        stop = time.perf_counter() + duration
        while time.perf_counter() < stop:
            try:
                conn.send()
                ok += 1
            except Exception:
                failed += 1
                time.sleep(0.01)
        conn.close()
        with lock:
            done[index][0] += ok
            done[index][1] += failed

    threads = []
    first = threading.Barrier(sum(int(job["concurrency"]) for job in jobs) + 1)
    for i, job in enumerate(jobs):
        target = Target(job["address"], job["model"], job["headers"])
        body = base64.b64decode(job["body"])
        for _ in range(int(job["concurrency"])):
            args = (i, target, body, int(job["header_length"]))
            threads.append(threading.Thread(target=client, args=args, daemon=True))
    for thread in threads:
        thread.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        first.wait(30.0)
    print("ready", flush=True)
    for thread in threads:
        thread.join(duration + 60.0)
    return done


class SaturatingLoad:
    """Closed-loop load keeping ``concurrency`` requests in flight per target, sent by a child
    process (``python -m gpuvisor.bench.oip_clients``) so that its client threads do not share
    the measuring client's interpreter lock. The child is stopped by its PID."""

    def __init__(self, duration: float) -> None:
        self.duration = duration
        self.jobs: list[dict[str, Any]] = []
        self._process: subprocess.Popen[bytes] | None = None

    def add(self, target: Target, inputs: Mapping[str, Array], concurrency: int) -> None:
        body, header_length = oip_body(inputs)
        self.jobs.append(
            {
                "address": target.address,
                "model": target.model,
                "headers": dict(target.headers),
                "body": base64.b64encode(body).decode(),
                "header_length": header_length,
                "concurrency": concurrency,
            }
        )

    def start(self) -> None:
        """Start the child and return once each of its connections has had one answer."""
        request = json.dumps({"duration": self.duration, "jobs": self.jobs}).encode()
        cmd = [sys.executable, "-m", "gpuvisor.bench.oip_clients"]
        with tempfile.TemporaryFile() as order:
            order.write(request)
            order.seek(0)
            self._process = subprocess.Popen(cmd, stdin=order, stdout=subprocess.PIPE)
        assert self._process.stdout is not None
        ready, _, _ = select.select([self._process.stdout], [], [], 60.0)
        line = self._process.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            self.kill()
            raise RuntimeError("the saturating load generator did not start sending within 60s")

    def finish(self) -> list[tuple[int, int]]:
        """Wait for the child (killing it by PID if it overstays); return (answered, failed)
        per target. Raises RuntimeError when the child failed."""
        process = self._process
        if process is None:
            raise RuntimeError("the saturating load was never started")
        try:
            out, _ = process.communicate(timeout=self.duration + 90.0)
            out = out.strip().splitlines()[-1] if out.strip() else b"[]"
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
            raise RuntimeError("the saturating load generator did not finish") from None
        if process.returncode != 0:
            raise RuntimeError(f"the saturating load generator exited with {process.returncode}")
        return [(int(ok), int(failed)) for ok, failed in json.loads(out)]

    def kill(self) -> None:
        """Stop the child now (by PID), if it still runs."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(10)


if __name__ == "__main__":  # the saturating load's child process: JSON in on stdin, out on stdout
    order = json.loads(sys.stdin.buffer.read())
    print(json.dumps(_saturate(order["jobs"], float(order["duration"]))), flush=True)
