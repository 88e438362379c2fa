"""The dashboard's judgements: when a tenant is waiting or starving, and what the first screen
says needs attention (built from real slice states, queues and recent history)."""

from __future__ import annotations

from typing import Any

import pytest

from gpuvisor.control.slices import SliceState
from gpuvisor.dispatch.queues import PendingRequest, SliceQueue
from gpuvisor.spec.kinds import Tenant
from gpuvisor.telemetry.dashboard import attention, tenant_view
from gpuvisor.telemetry.recent import RecentActivity


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def _slice(tenant: str, deployment: str, share: float, queued: int) -> SliceState:
    state = SliceState(
        id=f"{tenant}/{deployment}/0",
        tenant=tenant,
        deployment=deployment,
        replica=0,
        spec_hash="h",
        pool="inference",
        profile="p",
        memory=2**28,
        compute_share=share,
        isolation="process",
        latency_class="standard",
        model_name=deployment,
        model_version="1",
        device_id="cpu-0",
        state="Ready",
    )
    state.queue = SliceQueue(state.id, tenant, deployment, "inference", "p", share=share)
    for i in range(queued):
        state.queue.push(PendingRequest(i, tenant, b"", -1, arrival=0.0))
    return state


def _tenant(name: str) -> Tenant:
    return Tenant.model_validate({"metadata": {"name": name}, "spec": {"weight": 2}})


@pytest.mark.parametrize(
    ("queued", "busy", "others", "wait", "state"),
    [
        (0, 0.0, 0.0, None, "ok"),  # idle
        (0, 0.5, 0.0, 0.001, "ok"),  # busy, nothing waiting
        (5, 3.0, 7.0, 0.2, "waiting"),  # 30% used of a 25% guarantee: waits, but gets its share
        (5, 0.5, 9.0, 0.2, "starving"),  # 5% of 25% while requests wait 200 ms, others use it
        (5, 0.5, 9.0, 0.001, "waiting"),  # under its share, but requests do not wait long
        # 5% of 25% and waiting, but the device is nearly idle: the wait is not the scheduler's
        (5, 0.5, 0.1, 0.2, "waiting"),
    ],
)
def test_waiting_and_starving(
    queued: int, busy: float, others: float, wait: float | None, state: str
) -> None:
    clock = Clock()
    recent = RecentActivity(share_window=10.0, clock=clock)
    clock.now += 60
    if others:
        recent.record_busy("cpu-0", "support", "support/chat/0", others)
    if busy:
        recent.record_busy("cpu-0", "retail", "retail/shelf/0", busy)
    if wait is not None:
        recent.record_wait("retail", wait)
    view = tenant_view(
        recent, _tenant("retail"), [_slice("retail", "shelf", 0.25, queued)], recent.busy_share()
    )
    assert view["state"] == state
    assert view["queued"] == queued
    assert view["entitlement"] == pytest.approx(0.25)
    assert view["share"] == pytest.approx(busy / 10.0)
    assert view["starvingOn"] == (["cpu-0"] if state == "starving" else [])


def test_a_tenants_view_counts_only_its_slices() -> None:
    recent = RecentActivity()
    slices = [
        _slice("retail", "a", 0.25, 2),
        _slice("retail", "b", 0.1, 1),
        _slice("support", "c", 0.5, 7),
    ]
    view = tenant_view(recent, _tenant("retail"), slices, {})
    assert view["queued"] == 3
    assert view["entitlement"] == pytest.approx(0.35)
    assert view["weight"] == 2


def _device(**overrides: Any) -> dict[str, Any]:
    return {
        "id": "gpu-0",
        "healthy": True,
        "problem": "",
        "throttle": [],
        "slices": [],
        **overrides,
    }


def _tenant_row(**overrides: Any) -> dict[str, Any]:
    return {"name": "retail", "state": "ok", "starvingOn": [], "queued": 0, "waitP99": None,
            "share": 0.0, "entitlement": 0.25, "rejections": {}, **overrides}  # fmt: skip


def test_attention_is_ok_when_nothing_needs_a_look() -> None:
    items = attention([_device()], [_tenant_row()], [{"state": "Ready"}, {"state": "Ready"}], [])
    assert items == [
        {
            "level": "ok",
            "subject": "",
            "text": "Nobody is waiting or starving; 2 deployment(s) serving",
        }
    ]


def test_attention_lists_the_worst_first() -> None:
    items = attention(
        [
            _device(throttle=["hw_thermal"]),
            _device(id="gpu-1", healthy=False, problem="NVML read failed: GPU is lost"),
            _device(
                id="cpu-0",
                slices=[
                    {
                        "slice": "support/c/0",
                        "tenant": "support",
                        "memoryUsed": 95,
                        "memoryLimit": 100,
                    }
                ],
            ),
        ],
        [
            _tenant_row(name="support", state="waiting", queued=3, waitP99=0.004),
            _tenant_row(state="starving", starvingOn=["gpu-0"], queued=40, share=0.05, waitP99=0.3),
            _tenant_row(name="analytics", rejections={"rate_limit": 7, "deadline_infeasible": 1}),
        ],
        [],
        [
            {
                "slice": "retail/big/0",
                "tenant": "retail",
                "state": "Pending",
                "reason": "gpu-0: 1Gi free < 2Gi requested",
            }
        ],
    )
    texts = [i["text"] for i in items]
    levels = [i["level"] for i in items]
    assert levels[:2] == ["error", "error"]
    assert "gpu-1 is unhealthy: NVML read failed: GPU is lost" in texts
    assert (
        "retail is starving on gpu-0: 40 queued, 5% of device time against 25% guaranteed, "
        "p99 wait 300 ms" in texts
    )
    assert (
        "analytics: 8 request(s) refused in the last minute (deadline_infeasible 1, rate_limit 7)"
        in texts
    )
    assert "retail/big/0 is Pending: gpu-0: 1Gi free < 2Gi requested" in texts
    assert "gpu-0 clocks are throttled (hw_thermal)" in texts
    assert "support/c/0 uses 95% of its memory cap" in texts
    assert texts[-1] == "support has 3 request(s) queued, p99 wait 4 ms"


def test_a_cordoned_device_is_pointed_out() -> None:
    items = attention([_device(id="gpu-1", cordoned=True)], [_tenant_row()], [], [])
    assert {
        "level": "warn",
        "subject": "gpu-1",
        "text": "gpu-1 is cordoned: it takes no new slices",
    } in items


def test_an_instance_loading_in_a_rolling_update_is_information_not_a_warning() -> None:
    loading = {"tenant": "retail", "state": "Loading", "reason": "placed on cpu-0; starting"}
    items = attention(
        [_device()],
        [_tenant_row()],
        [{"state": "Updating"}],
        [
            {**loading, "slice": "retail/shelf/0#2", "replaces": "retail/shelf/0"},
            {**loading, "slice": "retail/chat/0", "replaces": None},
        ],
    )
    assert [(i["level"], i["text"]) for i in items] == [
        ("warn", "retail/chat/0 is Loading: placed on cpu-0; starting"),
        ("info", "retail/shelf/0#2 is Loading: placed on cpu-0; starting"),
    ]
    # an update under way counts as serving when nothing needs a look
    ok = attention([_device()], [_tenant_row()], [{"state": "Updating"}, {"state": "Ready"}], [])
    assert ok[0]["text"] == "Nobody is waiting or starving; 2 deployment(s) serving"


def test_requests_are_split_into_turned_away_and_failed() -> None:
    from gpuvisor.telemetry.dashboard import _by_whose_doing

    outcomes = {
        "ok": 100.0,
        "400": 3.0,  # the model refused the request's values
        "invalid_request": 2.0,
        "too_many_requests": 5.0,
        "client_closed": 1.0,
        "500": 4.0,
        "worker_crashed": 1.0,
        "unavailable": 2.0,
        "deadline_exceeded": 1.0,  # refused before queueing, or dropped from the queue
    }
    assert _by_whose_doing(outcomes) == {"ok": 100.0, "refused": 12.0, "failed": 7.0}


def test_others_memory_counts_a_shared_worker_once() -> None:
    """Two of another tenant's slices in one shared worker report its memory each: a tenant
    key's 'others' holds that process once."""
    from gpuvisor.inventory.cpu import discover_cpu
    from gpuvisor.telemetry.dashboard import _device

    a, b = _slice("retail", "a", 0.1, 0), _slice("retail", "b", 0.1, 0)
    c = _slice("analytics", "c", 0.1, 0)
    a.worker_pid = b.worker_pid = 4242
    c.worker_pid = 4343
    device = discover_cpu(memory=8 << 30)
    memory = {a.id: 300 << 20, b.id: 300 << 20, c.id: 100 << 20}
    view = _device(device, [a, b, c], None, memory, {}, lambda tenant: tenant == "support")
    assert view["others"]["slices"] == 3
    assert view["others"]["memoryUsed"] == 400 << 20
