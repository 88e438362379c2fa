"""Shared parts of the multi-tenant benchmarks (isolation, fairness, batching): MLP models built
in code, manifests, a node with several tenants, cheap keep-alive OIP clients (an open-loop
Poisson generator and a saturating closed loop in a separate process), device time read from a
node's /metrics or from a process's CPU time, and rich progress."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import math
import random
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx
import numpy as np
import onnx
import psutil
import yaml
from onnx import TensorProto, helper, numpy_helper
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from gpuvisor.bench.loadgen import LoadResult, write_json
from gpuvisor.launch import NodeProcess
from gpuvisor.runtime.executors.base import ExecutorDevice
from gpuvisor.runtime.executors.onnx import OnnxExecutor

__all__ = [
    "BenchModel",
    "NodeScenario",
    "OipConnection",
    "Reporter",
    "SaturatingLoad",
    "Target",
    "TenantPlan",
    "cpu_seconds",
    "device_busy_seconds",
    "hold",
    "manifest",
    "measure_cost",
    "oip_body",
    "progress_reporter",
    "run_open_loop",
    "start_node",
    "workdir",
]

Array = np.ndarray[Any, Any]
_SEED = 20240601


# ---- models ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchModel:
    """An ONNX MLP (Gemm+Relu layers, FP32 ``features`` [batch, widths[0]] → ``out``)."""

    name: str
    widths: tuple[int, ...]

    def build(self, dest: Path) -> Path:
        """Write the model to ``dest/<name>.onnx`` (deterministic weights); return its path."""
        rng = np.random.default_rng([_SEED, zlib.crc32(self.name.encode())])
        nodes: list[onnx.NodeProto] = []
        weights: list[TensorProto] = []
        current, layers = "features", len(self.widths) - 1
        for i in range(layers):
            fan_in, fan_out = self.widths[i], self.widths[i + 1]
            w = rng.normal(0.0, 1.0 / math.sqrt(fan_in), (fan_out, fan_in)).astype(np.float32)
            weights += [
                numpy_helper.from_array(w, f"fc{i}.weight"),
                numpy_helper.from_array(np.zeros(fan_out, np.float32), f"fc{i}.bias"),
            ]
            nodes.append(
                helper.make_node(
                    "Gemm", [current, f"fc{i}.weight", f"fc{i}.bias"], [f"fc{i}"], transB=1
                )
            )
            current = f"fc{i}"
            if i < layers - 1:
                nodes.append(helper.make_node("Relu", [current], [f"{current}.relu"]))
                current = f"{current}.relu"
        nodes.append(helper.make_node("Identity", [current], ["out"]))
        graph = helper.make_graph(
            nodes,
            self.name,
            [
                helper.make_tensor_value_info(
                    "features", TensorProto.FLOAT, ["batch", self.widths[0]]
                )
            ],
            [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", self.widths[-1]])],
            weights,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        dest.mkdir(parents=True, exist_ok=True)
        path = (dest / f"{self.name}.onnx").resolve()
        path.write_bytes(model.SerializeToString())
        return path

    def inputs(self, rows: int) -> dict[str, Array]:
        """Return deterministic inputs with ``rows`` rows."""
        rng = np.random.default_rng([_SEED, rows, self.widths[0]])
        return {"features": rng.normal(size=(rows, self.widths[0])).astype(np.float32)}


def measure_cost(
    path: Path, inputs: Mapping[str, Array], seconds: float = 0.3, threads: int = 1
) -> float:
    """Return the median seconds one run of ``inputs`` takes in gpuvisor's ONNX executor
    (``threads`` intra-op threads, as a worker on the CPU device), after a short warm-up."""
    executor = OnnxExecutor(path, ExecutorDevice(kind="cpu", threads=threads))
    try:
        feed = dict(inputs)
        for _ in range(5):
            executor.run(feed)
        times: list[float] = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(times) < 5:
            began = time.perf_counter()
            executor.run(feed)
            times.append(time.perf_counter() - began)
        return statistics.median(times)
    finally:
        executor.close()


# ---- manifests and the node ------------------------------------------------------------------


@dataclass(frozen=True)
class TenantPlan:
    """One tenant of a scenario: its model, weight, slice profile and batching."""

    tenant: str
    model: BenchModel
    weight: float = 1.0
    share: float = 0.0  # the Profile's computeShare
    latency_class: str = "standard"
    max_batch_size: int = 8
    pool: str = "default"

    @property
    def deployment(self) -> str:
        return self.model.name


def manifest(
    plans: Sequence[TenantPlan], paths: Mapping[str, Path], pools: Mapping[str, str] | None = None
) -> str:
    """Return the YAML deploying every plan: a Tenant, a Profile (256Mi), a Model and a
    Deployment (maxQueueDelay 0) each, plus ``pools`` (name → scheduler, every device)."""
    docs: list[dict[str, Any]] = [
        {"kind": "Pool", "metadata": {"name": name}, "spec": {"scheduler": scheduler}}
        for name, scheduler in (pools or {}).items()
    ]
    for p in plans:
        profile = f"{p.tenant}-slice"
        docs += [
            {"kind": "Tenant", "metadata": {"name": p.tenant}, "spec": {"weight": p.weight}},
            {
                "kind": "Profile",
                "metadata": {"name": profile},
                "spec": {
                    "memory": "256Mi",
                    "computeShare": p.share,
                    "latencyClass": p.latency_class,
                },
            },
            {
                "kind": "Model",
                "metadata": {"name": p.model.name, "tenant": p.tenant},
                "spec": {"format": "onnx", "source": str(paths[p.model.name])},
            },
            {
                "kind": "Deployment",
                "metadata": {"name": p.deployment, "tenant": p.tenant},
                "spec": {
                    "model": p.model.name,
                    "profile": profile,
                    "pool": p.pool,
                    "batching": {"maxBatchSize": p.max_batch_size, "maxQueueDelay": "0ms"},
                },
            },
        ]
    return str(
        yaml.safe_dump_all([{"apiVersion": "gpuvisor/v1", **d} for d in docs], sort_keys=False)
    )


@dataclass(frozen=True)
class Target:
    """Where one model is served: host:port, model name, request headers (a key or none)."""

    address: str
    model: str
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass
class NodeScenario:
    """A running node with the scenario's tenants deployed, and a key per tenant."""

    node: NodeProcess
    plans: Sequence[TenantPlan]
    keys: dict[str, str]

    def target(self, tenant: str) -> Target:
        plan = next(p for p in self.plans if p.tenant == tenant)
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"}
        return Target(self.node.address, plan.deployment, headers)

    def busy(self) -> dict[str, float]:
        """Device seconds charged so far, per tenant (see device_busy_seconds)."""
        return device_busy_seconds(self.node.url)


@contextmanager
def start_node(
    plans: Sequence[TenantPlan],
    root: Path,
    pools: Mapping[str, str] | None = None,
    quantum_ms: float | None = None,
    timeout: float = 120.0,
    lookahead_ms: float | None = None,
    extra_env: Mapping[str, str] | None = None,
    batch_nice: int | None = None,
) -> Iterator[NodeScenario]:
    """Build the plans' models under ``root``, start a node (no demo; CPU device with
    ``quantum_ms`` and ``lookahead_ms``, and ``workers.batchNice``, when given), apply the
    manifest, create one key per tenant and wait until every model is ready. The node is
    stopped by PID on exit. Raises RuntimeError when the node or a deployment does not come
    up."""
    paths = {p.model.name: p.model.build(root / "models") for p in plans}
    config = None
    cpu: dict[str, Any] = {}
    if quantum_ms is not None:
        cpu["quantum"] = f"{quantum_ms:g}ms"
    if lookahead_ms is not None:
        cpu["lookahead"] = f"{lookahead_ms:g}ms"
    spec: dict[str, Any] = {"cpu": cpu} if cpu else {}
    if batch_nice is not None:
        spec["workers"] = {"batchNice": batch_nice}
    if spec:
        config = root / "node.yaml"
        doc = {"kind": "Node", "metadata": {"name": "bench"}, "spec": spec}
        config.write_text(yaml.safe_dump({"apiVersion": "gpuvisor/v1", **doc}))
    node = NodeProcess(
        state_dir=root / "node", config=config, demo=False, extra_env=dict(extra_env or {})
    )
    try:
        node.start(timeout)
        admin = node.auth(node.admin_key)
        node.apply_as_admin(manifest(plans, paths, pools))
        keys = {p.tenant: node.create_tenant_key(p.tenant, "bench") for p in plans}
        with httpx.Client(base_url=node.url, timeout=30) as http:
            scenario = NodeScenario(node, plans, keys)
            deadline = time.monotonic() + timeout
            for p in plans:
                headers = scenario.target(p.tenant).headers
                while (
                    http.get(f"/v2/models/{p.deployment}/ready", headers=headers).status_code != 200
                ):
                    if time.monotonic() > deadline:
                        slices = http.get("/api/v1/slices", headers=admin).text
                        raise RuntimeError(f"{p.deployment} not ready in {timeout:.0f}s: {slices}")
                    time.sleep(0.1)
        yield scenario
    finally:
        node.stop()


def device_busy_seconds(node_url: str) -> dict[str, float]:
    """Return ``gpuvisor_device_busy_seconds_total`` from the node's /metrics, summed per
    tenant (over devices, deployments and slices)."""
    text = httpx.get(f"{node_url}/metrics", timeout=10).text
    busy: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "gpuvisor_device_busy_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                tenant = sample.labels["tenant"]
                busy[tenant] = busy.get(tenant, 0.0) + sample.value
    return busy


def cpu_seconds(pid: int) -> float:
    """Return the user + system CPU seconds process ``pid`` has used (children not counted)."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


# ---- clients ---------------------------------------------------------------------------------


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
    process (``python -m gpuvisor.bench.scenario``) so that its client threads do not share
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
        cmd = [sys.executable, "-m", "gpuvisor.bench.scenario"]
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


# ---- progress --------------------------------------------------------------------------------


class Reporter:
    """Says what a benchmark is doing; the base class says nothing (tests, library use)."""

    def phase(self, description: str, total: float | None = None) -> None:
        pass

    def advance(self, done: float = 1) -> None:
        pass


class _RichReporter(Reporter):
    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = progress.add_task("starting", total=None)

    def phase(self, description: str, total: float | None = None) -> None:
        self.progress.reset(self.task, description=description, total=total, completed=0)

    def advance(self, done: float = 1) -> None:
        self.progress.advance(self.task, done)


@contextmanager
def progress_reporter(console: Console) -> Iterator[Reporter]:
    """A transient rich progress bar behind the Reporter interface."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        yield _RichReporter(progress)


class BenchReport(Protocol):
    """What every scheduling benchmark's report offers: its run time and its JSON."""

    seconds: float

    def to_json(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=BenchReport)


def run_and_report(
    console: Console,
    output: Path,
    run: Callable[[Reporter], R],
    render: Callable[[R, Console], None],
) -> R:
    """Run a benchmark behind a progress bar, print its report and write its JSON to ``output``."""
    with progress_reporter(console) as reporter:
        report = run(reporter)
    render(report, console)
    write_json(output, report.to_json())
    console.print(f"results written to {output} ({report.seconds:.0f}s)", highlight=False)
    return report


def hold(seconds: float, reporter: Reporter, step: float = 0.25) -> None:
    """Sleep ``seconds``, advancing ``reporter`` by the seconds that passed."""
    end = time.perf_counter() + seconds
    while (left := end - time.perf_counter()) > 0:
        time.sleep(min(step, left))
        reporter.advance(min(step, left))


@contextmanager
def workdir(path: Path | None) -> Iterator[Path]:
    """``path`` when given, else a temporary directory removed on exit."""
    with ExitStack() as stack:
        if path is not None:
            path.mkdir(parents=True, exist_ok=True)
            yield path
        else:
            yield Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpuvisor-bench-")))


if __name__ == "__main__":  # the saturating load's child process: JSON in on stdin, out on stdout
    order = json.loads(sys.stdin.buffer.read())
    print(json.dumps(_saturate(order["jobs"], float(order["duration"]))), flush=True)
