"""First-fit placement: fits, bin-packing, and a reason from every device that refuses."""

from __future__ import annotations

import pytest

from gpuvisor.inventory.device import Device
from gpuvisor.placement.placer import PlacedSlice, SliceRequest, place_slice

GI = 2**30


def _gpu(i: int, memory: int = 80 * GI, healthy: bool = True, model: str = "H100-80GB") -> Device:
    return Device(
        id=f"gpu-{i}",
        kind="gpu",
        backend="simulated",
        model=model,
        memory_total=memory,
        healthy=healthy,
    )


def _req(
    memory: int = GI, share: float = 0.25, isolation: str = "process", tenant: str = "a"
) -> SliceRequest:
    return SliceRequest("a/d/0", tenant, "inference", memory, share, isolation)


def test_binpacks_onto_the_fullest_device_that_fits() -> None:
    devices = [_gpu(0), _gpu(1)]
    placed = [PlacedSlice("x", "b", "gpu-1", 40 * GI, 0.25, "process")]
    assert place_slice(_req(), devices, placed, {}).device_id == "gpu-1"


@pytest.mark.parametrize(
    ("request_", "placed", "selector", "tenancy", "reason"),
    [
        (_req(memory=100 * GI), [], {}, "shared", "100Gi requested > 80Gi on this device"),
        (
            _req(memory=50 * GI),
            [PlacedSlice("x", "b", "gpu-0", 40 * GI, 0.1, "process")],
            {},
            "shared",
            "40Gi free < 50Gi requested",
        ),
        (
            _req(share=0.5),
            [PlacedSlice("x", "b", "gpu-0", GI, 0.75, "process")],
            {},
            "shared",
            "compute shares would sum to 1.25 > 1",
        ),
        (
            _req(isolation="exclusive"),
            [PlacedSlice("x", "b", "gpu-0", GI, 0.1, "process")],
            {},
            "shared",
            "needs an empty device",
        ),
        (
            _req(),
            [PlacedSlice("x", "b", "gpu-0", GI, 0.1, "exclusive")],
            {},
            "shared",
            "held exclusively",
        ),
        (
            _req(),
            [PlacedSlice("x", "b", "gpu-0", GI, 0.1, "process")],
            {},
            "dedicated",
            "pool is dedicated",
        ),
        (
            _req(),
            [PlacedSlice("x", "b", "gpu-0", GI, 0.1, "process", dedicated=True)],
            {},
            "shared",
            "another tenant holds this device through a dedicated pool",
        ),
        (_req(isolation="partition"), [], {}, "shared", "partition"),
        (_req(), [], {"model": "A100*"}, "shared", "not in pool 'inference'"),
    ],
)
def test_refusals_carry_reasons(
    request_: SliceRequest,
    placed: list[PlacedSlice],
    selector: dict[str, str],
    tenancy: str,
    reason: str,
) -> None:
    result = place_slice(request_, [_gpu(0)], placed, selector, tenancy)
    assert result.device_id is None
    assert reason in result.reasons["gpu-0"]
    assert result.explain().startswith("gpu-0: ")


def test_a_dedicated_device_takes_its_own_tenants_slices_from_any_pool() -> None:
    held = [PlacedSlice("x", "a", "gpu-0", GI, 0.1, "process", dedicated=True)]
    assert place_slice(_req(tenant="a"), [_gpu(0)], held, {}).device_id == "gpu-0"
    # another tenant, from a shared pool selecting the same device: the next device
    assert place_slice(_req(tenant="b"), [_gpu(0), _gpu(1)], held, {}).device_id == "gpu-1"


def test_unhealthy_device_is_skipped_with_reason() -> None:
    result = place_slice(_req(), [_gpu(0, healthy=False), _gpu(1)], [], {})
    assert result.device_id == "gpu-1"
    result = place_slice(_req(), [_gpu(0, healthy=False)], [], {})
    assert "unhealthy" in result.reasons["gpu-0"]


def test_failed_slices_give_their_room_back() -> None:
    """The controller leaves Failed slices out of what it passes as placed."""
    import asyncio

    from gpuvisor.control.controller import Controller
    from gpuvisor.control.slices import SliceState
    from gpuvisor.inventory.device import Topology
    from gpuvisor.telemetry.metrics import Metrics

    controller = Controller(
        store=None,
        topology=Topology([_gpu(0)]),
        pool=None,
        dispatchers={},  # type: ignore[arg-type]
        metrics=Metrics(),
    )
    for state in ("Ready", "Failed"):
        s = SliceState(
            id=f"a/{state}/0",
            tenant="a",
            deployment=state,
            replica=0,
            spec_hash="",
            pool="default",
            profile="p",
            memory=GI,
            compute_share=0.5,
            isolation="process",
            latency_class="standard",
            model_name="m",
            model_version="1",
            device_id="gpu-0",
        )
        s.set_state(state)
        controller.slices[s.id] = s
    placed = controller._snapshot(exclude="").slices()
    assert [p.slice_id for p in placed] == ["a/Ready/0"]
    assert asyncio.iscoroutinefunction(controller.reconcile)
