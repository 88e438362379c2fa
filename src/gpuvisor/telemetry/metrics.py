"""Every Prometheus metric gpuvisor exports, declared in one place.

Labels are bounded: tenants, deployments, versions, devices, pools, profiles and
outcome codes; never request ids or free text.
"""

from __future__ import annotations

from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

M = TypeVar("M", Counter, Gauge, Histogram)

__all__ = ["Metrics"]

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
            "Inference requests answered",
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
        self.queue_depth = Gauge(
            "gpuvisor_queue_depth",
            "Requests waiting per slice",
            ["device", "tenant", "deployment"],
            registry=r,
        )
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

    def child(self, metric: M, *labels: str) -> M:
        """Return ``metric.labels(*labels)``, cached: the request path calls this per request.

        Only for series that are never removed (counters and histograms here); a removed
        series would stay cached.
        """
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found
