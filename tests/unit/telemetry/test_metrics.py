"""Every metric is declared in telemetry/metrics.py with bounded labels, and the live series
(queue depth, entitlements) are read from real slice queues at scrape time."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gpuvisor.dispatch.queues import PendingRequest, SliceQueue
from gpuvisor.errors import is_out_of_memory
from gpuvisor.telemetry.metrics import LiveSlice, Metrics

# family name as exposed (counters without _total) -> (type, label names)
DECLARED = {
    "gpuvisor_build_info": ("gauge", set()),  # an Info: one sample, its labels the build's fields
    "gpuvisor_requests": ("counter", {"tenant", "deployment", "version", "outcome"}),
    "gpuvisor_request_duration_seconds": ("histogram", {"tenant", "deployment", "version"}),
    "gpu_job_queue_wait_seconds": ("histogram", {"cluster", "pool", "gpu_profile", "tenant"}),
    "gpuvisor_queue_depth": ("gauge", {"device", "tenant", "deployment", "slice"}),
    "gpuvisor_slice_compute_share": ("gauge", {"device", "tenant", "deployment", "slice"}),
    "gpuvisor_batch_size": ("histogram", {"device", "tenant", "deployment"}),
    "gpuvisor_device_busy_seconds": ("counter", {"device", "tenant", "deployment", "slice"}),
    "gpuvisor_admission_rejections": ("counter", {"tenant", "deployment", "reason"}),
    "gpuvisor_worker_restarts": ("counter", {"tenant", "deployment"}),
    "gpuvisor_hung_batches": ("counter", {"device", "tenant", "deployment"}),
    "gpuvisor_slice_memory_limit_bytes": ("gauge", {"device", "tenant", "deployment", "slice"}),
    "gpuvisor_slice_memory_used_bytes": ("gauge", {"device", "tenant", "deployment", "slice"}),
    "gpuvisor_device_memory_total_bytes": ("gauge", {"device", "model"}),
    "gpuvisor_device_memory_used_bytes": ("gauge", {"device", "model"}),
    "gpuvisor_device_utilization_ratio": ("gauge", {"device"}),
    "gpuvisor_device_temperature_celsius": ("gauge", {"device"}),
    "gpuvisor_device_power_watts": ("gauge", {"device"}),
    "gpuvisor_device_throttle_events": ("counter", {"device", "reason"}),
    "gpuvisor_device_xid_errors": ("counter", {"device", "xid"}),
    "gpuvisor_device_healthy": ("gauge", {"device"}),
    "gpuvisor_allocation_failures": ("counter", {"device", "tenant", "deployment", "reason"}),
    "gpuvisor_slices": ("gauge", {"tenant", "deployment", "state"}),
    "gpuvisor_sampler_cpu_seconds": ("counter", set()),
    "gpuvisor_sampler_samples": ("counter", set()),
    "gpuvisor_sampler_period_seconds": ("gauge", set()),
}
BOUNDED_LABELS = {
    "tenant", "deployment", "version", "outcome", "cluster", "pool", "gpu_profile", "device",
    "slice", "reason", "model", "state", "xid",
}  # fmt: skip


def _families(metrics: Metrics) -> dict[str, object]:
    text = generate_latest(metrics.registry).decode()
    # unlabelled counters also export a "<name>_created" timestamp: not a metric of its own
    return {
        f.name: f for f in text_string_to_metric_families(text) if not f.name.endswith("_created")
    }


def test_every_metric_is_declared_with_its_type() -> None:
    families = _families(Metrics())
    for name, (kind, _) in DECLARED.items():
        assert name in families, f"{name} is not exported"
        assert families[name].type == kind, name  # type: ignore[attr-defined]
    assert set(families) == set(DECLARED), "a metric was added or removed: update DECLARED"


def test_labels_are_the_declared_bounded_ones() -> None:
    m = Metrics()
    for collector in list(m.registry._collector_to_names):
        names = getattr(collector, "_labelnames", None)
        if names is None:
            continue
        family = collector._name  # type: ignore[attr-defined]
        expected = (
            DECLARED[family.removesuffix("_total")][1] if family != "gpuvisor_build" else set()
        )
        assert set(names) == expected, family
        assert set(names) <= BOUNDED_LABELS, f"{family} has an unbounded label"


def test_queue_depth_and_entitlement_are_read_from_live_queues_at_scrape_time() -> None:
    queue = SliceQueue("retail/shelf/0", "retail", "shelf", "inference", "rt-small", share=0.25)
    m = Metrics()
    m.live.source = lambda: [
        LiveSlice(
            "cpu-0", queue.tenant, queue.deployment, queue.slice_id, len(queue.items), queue.share
        )
    ]
    labels = {
        "device": "cpu-0",
        "tenant": "retail",
        "deployment": "shelf",
        "slice": "retail/shelf/0",
    }
    assert m.registry.get_sample_value("gpuvisor_queue_depth", labels) == 0
    for i in range(3):
        queue.push(PendingRequest(i, "retail", b"", -1, arrival=0.0))
    assert m.registry.get_sample_value("gpuvisor_queue_depth", labels) == 3
    queue.pop()
    assert m.registry.get_sample_value("gpuvisor_queue_depth", labels) == 2
    assert m.registry.get_sample_value("gpuvisor_slice_compute_share", labels) == 0.25


def test_live_families_exist_before_the_node_sets_a_source() -> None:
    families = _families(Metrics())
    assert families["gpuvisor_queue_depth"].samples == []  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (
            b'{"error":"[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer of size 4096"}',
            True,
        ),
        (b'{"error":"CUDA out of memory. Tried to allocate 20.00 MiB"}', True),
        (b'{"error":"std::bad_alloc"}', True),
        (b'{"error":"MemoryError"}', True),
        (b'{"error":"missing input \'image\'"}', False),
        (b'{"error":"model failed: division by zero"}', False),
    ],
)
def test_out_of_memory_answers_are_recognised(answer: bytes, expected: bool) -> None:
    assert is_out_of_memory(answer) is expected
