"""Load generation for the benchmarks: closed-loop client threads, latency percentiles, and the
JSON and table writers every benchmark shares."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from gpuvisor.errors import ConfigError

__all__ = [
    "Call",
    "CallFactory",
    "LoadResult",
    "check_results_path",
    "machine_info",
    "median_result",
    "percentile",
    "results_table",
    "run_closed_loop",
    "triton_call_factory",
    "write_json",
]

Call = Callable[[], object]
"""One request: returns when the answer is in; raises when the request failed."""

CallFactory = Callable[[], Call]
"""Builds one client thread's Call (its own connection), before the clock starts."""

_MAX_ERROR_SAMPLES = 5


def percentile(values: Sequence[float], q: float) -> float:
    """Return the ``q``-th percentile (0–100) of ``values`` with linear interpolation between
    the closest ranks (numpy's default method); NaN for no values.

    Raises ValueError when ``q`` is outside [0, 100].
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class LoadResult:
    """What one load run measured. Latencies cover successful requests only; throughput is
    successful requests per second of wall time, from the first request to the last answer."""

    name: str
    mode: str  # "closed" (N threads, each sends its next request when the last is answered)
    threads: int
    requests: int  # requests sent
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    error_samples: tuple[str, ...] = ()
    latencies_ms: tuple[float, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def from_latencies(
        cls,
        name: str,
        mode: str,
        threads: int,
        latencies_ms: Sequence[float],
        errors: int,
        seconds: float,
        error_samples: Sequence[str] = (),
    ) -> LoadResult:
        """Summarise raw per-request latencies (ms) of one run."""
        ok = len(latencies_ms)
        return cls(
            name=name,
            mode=mode,
            threads=threads,
            requests=ok + errors,
            errors=errors,
            seconds=seconds,
            rps=ok / seconds if seconds > 0 else 0.0,
            p50_ms=percentile(latencies_ms, 50),
            p99_ms=percentile(latencies_ms, 99),
            mean_ms=statistics.fmean(latencies_ms) if latencies_ms else math.nan,
            error_samples=tuple(error_samples),
            latencies_ms=tuple(latencies_ms),
        )

    def summary(self) -> dict[str, Any]:
        """Return the figures as a JSON-ready dict (without the raw latencies)."""
        out = asdict(self)
        del out["latencies_ms"]
        out["error_samples"] = list(self.error_samples)
        return out


def median_result(runs: Sequence[LoadResult]) -> LoadResult:
    """Return one result whose figures are the medians over repeated runs of the same load
    (errors are summed, so a single failing run still shows). Raises ValueError for none."""
    if not runs:
        raise ValueError("no runs to summarise")
    first = runs[0]
    return LoadResult(
        name=first.name,
        mode=first.mode,
        threads=first.threads,
        requests=sum(r.requests for r in runs),
        errors=sum(r.errors for r in runs),
        seconds=statistics.median(r.seconds for r in runs),
        rps=statistics.median(r.rps for r in runs),
        p50_ms=statistics.median(r.p50_ms for r in runs),
        p99_ms=statistics.median(r.p99_ms for r in runs),
        mean_ms=statistics.median(r.mean_ms for r in runs),
        error_samples=tuple(s for r in runs for s in r.error_samples)[:_MAX_ERROR_SAMPLES],
    )


def run_closed_loop(
    name: str,
    make_call: CallFactory,
    requests: int,
    threads: int,
    on_progress: Callable[[int], None] | None = None,
) -> LoadResult:
    """Send ``requests`` requests from ``threads`` threads, each waiting for its answer before
    sending the next (closed loop), and return what was measured.

    Each thread builds its own Call with ``make_call`` before the clock starts, so connection
    setup is not measured. ``on_progress`` is called with the number of requests just
    finished, from the client threads (keep it cheap and thread-safe). Raises ValueError for a
    request or thread count below 1, and re-raises an error ``make_call`` raised.
    """
    if requests < 1 or threads < 1:
        raise ValueError(f"requests and threads must be at least 1, got {requests} and {threads}")
    threads = min(threads, requests)
    tickets = iter(range(requests))
    ticket_lock = threading.Lock()
    start = threading.Barrier(threads + 1)
    latencies: list[list[float]] = [[] for _ in range(threads)]
    failures: list[list[str]] = [[] for _ in range(threads)]
    setup_errors: list[BaseException] = []
    ended = [0.0] * threads

    def next_ticket() -> bool:
        with ticket_lock:
            return next(tickets, None) is not None

    def client(index: int) -> None:
        try:
            call = make_call()
        except BaseException as exc:
            setup_errors.append(exc)
            start.abort()
            return
        try:
            start.wait()
        except threading.BrokenBarrierError:
            return
        mine, errors = latencies[index], failures[index]
        clock = time.perf_counter
        while next_ticket():
            sent = clock()
            try:
                call()
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            else:
                mine.append((clock() - sent) * 1000.0)
            if on_progress is not None:
                on_progress(1)
        ended[index] = clock()

    workers = [
        threading.Thread(target=client, args=(i,), name=f"load-{name}-{i}", daemon=True)
        for i in range(threads)
    ]
    for worker in workers:
        worker.start()
    try:
        start.wait()
    except threading.BrokenBarrierError:
        for worker in workers:
            worker.join()
        if setup_errors:
            raise setup_errors[0] from None
        raise RuntimeError("a client thread failed to start") from None
    began = time.perf_counter()
    for worker in workers:
        worker.join()
    seconds = max(ended) - began
    all_errors = [e for errs in failures for e in errs]
    return LoadResult.from_latencies(
        name,
        "closed",
        threads,
        [v for lat in latencies for v in lat],
        len(all_errors),
        seconds,
        list(dict.fromkeys(all_errors))[:_MAX_ERROR_SAMPLES],
    )


def triton_call_factory(
    address: str,
    model: str,
    inputs: Mapping[str, np.ndarray[Any, Any]],
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> CallFactory:
    """Return a factory of Calls that each own a ``tritonclient.http.InferenceServerClient``
    on ``address`` (host:port) and send ``inputs`` as binary tensors (the client's default),
    asking for every output. A Call raises what the client raises on a failed request."""
    import tritonclient.http as triton

    from gpuvisor.runtime.tensors import DATATYPES

    names = {dtype: name for name, dtype in DATATYPES.items()}

    def make_call() -> Call:
        client = triton.InferenceServerClient(
            address, connection_timeout=timeout, network_timeout=timeout
        )
        # Inputs are built once per thread: the client's cost is the same for every system
        # measured, and on a small machine it competes with the server for the CPU.
        prepared = []
        for name, array in inputs.items():
            tensor = triton.InferInput(name, list(array.shape), names[array.dtype])
            tensor.set_data_from_numpy(array, binary_data=True)
            prepared.append(tensor)
        extra = dict(headers or {})

        def call() -> object:
            return client.infer(model, prepared, headers=extra)

        return call

    return make_call


def machine_info() -> dict[str, Any]:
    """Return the CPU count, CPU model, memory and Python/OS versions of this machine."""
    cpu_model = platform.processor() or "unknown"
    memory = 0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_bytes": memory,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def check_results_path(path: Path) -> None:
    """Raise ConfigError, before a benchmark runs, for a results file it could not write once
    it has run (its folder is created now)."""
    problem = ""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        problem = exc.strerror or str(exc)
    if not problem and path.is_dir():
        problem = "it is a folder"
    elif not problem and not os.access(path if path.exists() else path.parent, os.W_OK):
        problem = "permission denied"
    if problem:
        raise ConfigError(f"cannot write the results to {path}: {problem}. Pass another --output")


def write_json(path: Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as indented JSON to ``path`` (creating its folder); return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    return path


def results_table(
    results: Sequence[LoadResult], title: str | None = None, labels: Mapping[str, str] | None = None
) -> Table:
    """Return a rich table of results: system, req/s, p50 ms, p99 ms, errors.

    ``labels`` maps a result's name to the text its row shows.
    """
    table = Table(title=title, title_justify="left")
    table.add_column("system")
    table.add_column("req/s", justify="right")
    table.add_column("p50 ms", justify="right")
    table.add_column("p99 ms", justify="right")
    table.add_column("errors", justify="right")
    for r in results:
        table.add_row(
            (labels or {}).get(r.name, r.name),
            f"{r.rps:,.0f}",
            f"{r.p50_ms:.2f}",
            f"{r.p99_ms:.2f}",
            f"[red]{r.errors}[/red]" if r.errors else "0",
        )
    return table
