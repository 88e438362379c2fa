"""Every Prometheus metric gpuvisor exports, declared in one place.

Labels are bounded: tenants, deployments, versions, devices, pools, profiles and
outcome codes; never request ids or free text.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric

M = TypeVar("M", Counter, Gauge, Histogram)

__all__ = ["LiveSlice", "LiveSliceCollector", "Metrics"]

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
)


class Metrics:
    """The node's metric families, registered in their own registry (one per node)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        self.build_info = Info("gpuvisor_build", "gpuvisor build information", registry=r)
        self.requests = Counter(
            "gpuvisor_requests",
            "Inference requests, by outcome: answered, refused or failed",
            ["tenant", "deployment", "version", "outcome"],
            registry=r,
        )
        self.request_duration = Histogram(
            "gpuvisor_request_duration_seconds",
            "Inference request duration, admission to answer",
            ["tenant", "deployment", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "gpu_job_queue_wait_seconds",
            "Time from admission to first execution",
            ["cluster", "pool", "gpu_profile", "tenant"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # queue depth and entitlements are read from the dispatchers' queues at scrape time
        self.live = LiveSliceCollector()
        r.register(self.live)
        self.batch_size = Histogram(
            "gpuvisor_batch_size",
            "Rows per granted batch",
            ["device", "tenant", "deployment"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.device_busy = Counter(
            "gpuvisor_device_busy_seconds",
            "Device time charged per tenant and slice",
            ["device", "tenant", "deployment", "slice"],
            registry=r,
        )
        self.admission_rejections = Counter(
            "gpuvisor_admission_rejections",
            "Requests refused by admission before queueing, or dropped when their deadline passed while queued",
            ["tenant", "deployment", "reason"],
            registry=r,
        )
        self.hung_batches = Counter(
            "gpuvisor_hung_batches",
            "Batches that held their device for workers.batchTimeout: their worker was killed",
            ["device", "tenant", "deployment"],
            registry=r,
        )
        self.worker_restarts = Counter(
            "gpuvisor_worker_restarts",
            "Worker processes restarted after exiting",
            ["tenant", "deployment"],
            registry=r,
        )
        self.slice_memory_limit = Gauge(
            "gpuvisor_slice_memory_limit_bytes",
            "Memory cap of each slice",
            ["device", "tenant", "deployment", "slice"],
            registry=r,
        )
        self.slice_memory_used = Gauge(
            "gpuvisor_slice_memory_used_bytes",
            "Measured memory of each slice's worker",
            ["device", "tenant", "deployment", "slice"],
            registry=r,
        )
        self.device_memory_total = Gauge(
            "gpuvisor_device_memory_total_bytes",
            "Device memory (budget on the CPU device)",
            ["device", "model"],
            registry=r,
        )
        self.slices = Gauge(
            "gpuvisor_slices",
            "Slices by state",
            ["tenant", "deployment", "state"],
            registry=r,
        )
        self.device_memory_used = Gauge(
            "gpuvisor_device_memory_used_bytes",
            "Device memory in use (NVML on a GPU; the resident memory of its workers on the CPU device)",
            ["device", "model"],
            registry=r,
        )
        self.device_utilization = Gauge(
            "gpuvisor_device_utilization_ratio",
            "Busy fraction of the device over the last sampling period, 0 to 1",
            ["device"],
            registry=r,
        )
        self.device_temperature = Gauge(
            "gpuvisor_device_temperature_celsius",
            "Device temperature, where the device reports one",
            ["device"],
            registry=r,
        )
        self.device_power = Gauge(
            "gpuvisor_device_power_watts",
            "Device power draw, where the device reports it",
            ["device"],
            registry=r,
        )
        self.device_throttle_events = Counter(
            "gpuvisor_device_throttle_events",
            "Clock throttling episodes that began, by reason (NVML clock event reasons)",
            ["device", "reason"],
            registry=r,
        )
        self.device_xid_errors = Counter(
            "gpuvisor_device_xid_errors",
            "Critical Xid errors NVML reported, by Xid code",
            ["device", "xid"],
            registry=r,
        )
        self.device_healthy = Gauge(
            "gpuvisor_device_healthy",
            "1 while the device answers its telemetry reads, 0 when it does not",
            ["device"],
            registry=r,
        )
        self.allocation_failures = Counter(
            "gpuvisor_allocation_failures",
            "Slices or requests that could not get their memory or device room, by reason",
            ["device", "tenant", "deployment", "reason"],
            registry=r,
        )
        self.sampler_cpu = Counter(
            "gpuvisor_sampler_cpu_seconds",
            "CPU time the telemetry sampler itself spent",
            registry=r,
        )
        self.sampler_samples = Counter(
            "gpuvisor_sampler_samples", "Telemetry samples taken", registry=r
        )
        self.sampler_period = Gauge(
            "gpuvisor_sampler_period_seconds",
            "The telemetry sampler's configured period",
            registry=r,
        )

    def child(self, metric: M, *labels: str) -> M:
        """Return ``metric.labels(*labels)``, cached: the request path calls this per request.

        A series removed with ``remove_series`` leaves the cache too.
        """
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def remove_series(self, metric: Any, *labels: str) -> None:
        """Drop one labelled series (a retired slice's) and its cached child, so that series of
        slices that are gone do not pile up with every rolling update."""
        self._children.pop((id(metric), labels), None)
        with contextlib.suppress(KeyError):
            metric.remove(*labels)


@dataclass(frozen=True)
class LiveSlice:
    """One slice as the dispatcher sees it right now: where it runs, what waits, what it is owed."""

    device: str
    tenant: str
    deployment: str
    slice: str
    queued: int
    compute_share: float


class LiveSliceCollector:
    """Series read from the node's live state at scrape time, so they are never stale:
    ``gpuvisor_queue_depth`` and ``gpuvisor_slice_compute_share`` per slice.

    ``source`` returns the slices the dispatchers hold; until the node sets it, the families
    are exported without samples.
    """

    LABELS = ("device", "tenant", "deployment", "slice")

    def __init__(self) -> None:
        self.source: Callable[[], Iterable[LiveSlice]] | None = None

    def describe(self) -> Iterator[Metric]:
        yield from self._families([])

    def collect(self) -> Iterator[Metric]:
        yield from self._families(list(self.source()) if self.source is not None else [])

    def _families(self, slices: list[LiveSlice]) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "gpuvisor_queue_depth", "Requests waiting per slice", labels=self.LABELS
        )
        share = GaugeMetricFamily(
            "gpuvisor_slice_compute_share",
            "Guaranteed fraction of its device each serving slice is entitled to (its profile's computeShare)",
            labels=self.LABELS,
        )
        for s in slices:
            labels = [s.device, s.tenant, s.deployment, s.slice]
            depth.add_metric(labels, s.queued)
            share.add_metric(labels, s.compute_share)
        yield depth
        yield share
