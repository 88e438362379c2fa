"""The framework's extension points: pre-filter, filter order, scores, reserve, bind."""

from __future__ import annotations

from gpuvisor.inventory.device import Device
from gpuvisor.partition.mig import MigInstance
from gpuvisor.placement.defaults import default_framework
from gpuvisor.placement.framework import (
    Code,
    Cycle,
    PlacementResult,
    SliceRequest,
    Snapshot,
    Status,
)

GI = 2**30


def gpu(i: int, memory: int = 80 * GI, **extra: object) -> Device:
    return Device(
        id=f"gpu-{i}",
        kind="gpu",
        backend="simulated",
        model="H100-80GB",
        memory_total=memory,
        **extra,
    )  # type: ignore[arg-type]


def req(n: int = 0, memory: int = 30 * GI, **extra: object) -> SliceRequest:
    return SliceRequest(f"t/d/{n}", "t", "default", memory, 0.0, "process", deployment="d", **extra)  # type: ignore[arg-type]


class RefuseBind:
    name = "RefuseBind"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def bind(self, cycle: Cycle, device_id: str) -> Status:
        self.calls.append(device_id)
        return Status.error(self.name, "the worker could not be started")


def test_reservations_are_seen_by_the_next_cycle_on_the_same_snapshot() -> None:
    framework, snapshot = default_framework(), Snapshot([gpu(0), gpu(1)])
    placed = [framework.place(Cycle(req(n)), snapshot).device_id for n in range(5)]
    # binpack: two 30Gi slices fill gpu-0 (60 of 80), the third opens gpu-1, and so on
    assert placed == ["gpu-0", "gpu-0", "gpu-1", "gpu-1", None]
    assert [s.slice_id for s in snapshot.get("gpu-0").slices] == ["t/d/0", "t/d/1"]  # type: ignore[union-attr]


def test_a_failed_bind_unreserves_and_reports_the_binder() -> None:
    binder = RefuseBind()
    framework = default_framework().with_binders(binder)
    snapshot = Snapshot([gpu(0)])
    result = framework.place(Cycle(req()), snapshot)
    assert binder.calls == ["gpu-0"]
    assert result.device_id is None
    assert result.status.code is Code.ERROR and result.status.plugin == "RefuseBind"
    assert result.reasons == {"gpu-0": "the worker could not be started"}
    assert snapshot.slices() == []  # the reservation was taken back


def test_partition_slices_reserve_distinct_mig_instances() -> None:
    layout = tuple(MigInstance(s, "1g.10gb") for s in range(3))
    device = gpu(0, mig_mode=True, mig_instances=layout)
    framework, snapshot = default_framework(), Snapshot([device])
    starts = []
    for n in range(4):
        r = SliceRequest(f"t/d/{n}", "t", "default", 10 * GI, 0.0, "partition", "1g.10gb")
        starts.append(framework.place(Cycle(r), snapshot).mig_start)
    assert starts == [0, 1, 2, None]


def test_a_pre_filter_refusal_answers_for_every_device_once() -> None:
    from gpuvisor.placement.framework import TenantQuota

    result = default_framework().place(
        Cycle(req(), quota=TenantQuota(memory=GI)), Snapshot([gpu(0), gpu(1), gpu(2)])
    )
    assert result.status.plugin == "TenantQuota"
    assert set(result.reasons) == {"gpu-0", "gpu-1", "gpu-2"}
    assert (
        result.explain()
        == "all 3 devices: tenant 't' memory quota: 0 placed + 30Gi requested > 1Gi"
    )


def test_explain_lists_distinct_reasons_by_device() -> None:
    result = PlacementResult(None, {"gpu-1": "b", "gpu-0": "a"})
    assert result.explain() == "gpu-0: a; gpu-1: b"
    assert PlacementResult(None).explain() == "no device is known to this node"
    assert PlacementResult("gpu-0").explain() == ""


def test_equal_scores_go_to_the_device_discovered_first() -> None:
    for order in ([gpu(0), gpu(1)], [gpu(1), gpu(0)]):
        assert default_framework().place(Cycle(req()), Snapshot(order)).device_id == order[0].id
