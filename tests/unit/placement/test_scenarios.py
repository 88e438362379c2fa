"""Placement on a simulated fleet, scenario by scenario: the exact device, or the exact reasons.

The fleet: two nodes with four GPUs each, of different sizes, on two NUMA nodes per node.

    edge-1  gpu-0 H100-80GB numa 0   gpu-1 H100-80GB numa 0   gpu-2 L4 (24Gi) numa 1   gpu-3 L4 numa 1
    edge-2  gpu-0 A100-80GB numa 0   gpu-1 A100-40GB numa 0   gpu-2 T4 (16Gi) numa 1   gpu-3 L40S (48Gi) numa 1
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from gpuvisor.inventory.device import Device
from gpuvisor.inventory.simulated import devices_from_fleet
from gpuvisor.placement.defaults import default_framework
from gpuvisor.placement.framework import (
    Code,
    Cycle,
    PlacedSlice,
    PoolPolicy,
    SliceRequest,
    Snapshot,
    TenantQuota,
)
from gpuvisor.spec.kinds import Fleet

GI = 2**30

FLEET = Path(__file__).parents[2] / "data" / "two-edge-nodes.fleet.yaml"

ALL = [f"edge-{n}/gpu-{i}" for n in (1, 2) for i in range(4)]


def fleet(cordoned: tuple[str, ...] = (), unhealthy: tuple[str, ...] = ()) -> list[Device]:
    devices = devices_from_fleet(Fleet.model_validate(yaml.safe_load(FLEET.read_text())))
    for d in devices:
        d.cordoned = d.id in cordoned
        if d.id in unhealthy:
            d.healthy, d.health_reason = False, "Xid 79: GPU has fallen off the bus"
    return devices


def req(
    memory: float = 1,
    share: float = 0.0,
    isolation: str = "process",
    tenant: str = "retail",
    deployment: str = "shelf",
    replica: int = 0,
    numa: str = "any",
    anti_affinity: bool = False,
    pool: str = "default",
) -> SliceRequest:
    return SliceRequest(
        f"{tenant}/{deployment}/{replica}",
        tenant,
        pool,
        int(memory * GI),
        share,
        isolation,
        None,
        deployment,
        numa,  # type: ignore[arg-type]
        anti_affinity,
    )


def on(
    device: str,
    memory: float = 1,
    share: float = 0.0,
    tenant: str = "support",
    deployment: str = "chat",
    replica: int = 0,
    isolation: str = "process",
    numa: str = "any",
) -> PlacedSlice:
    return PlacedSlice(
        f"{tenant}/{deployment}/{replica}",
        tenant,
        device,
        int(memory * GI),
        share,
        isolation,
        None,
        deployment,
        numa,  # type: ignore[arg-type]
    )


def except_(reason: str, **others: str) -> dict[str, str]:
    """Every device answers ``reason`` except those named in ``others`` (id with / as __)."""
    named = {k.replace("__", "/").replace("_", "-"): v for k, v in others.items()}
    return {d: named.get(d, reason) for d in ALL}


@dataclass
class Scenario:
    name: str
    request: SliceRequest
    placed: list[PlacedSlice] = field(default_factory=list)
    pool: PoolPolicy = field(default_factory=PoolPolicy)
    quota: TenantQuota = field(default_factory=TenantQuota)
    devices: list[Device] = field(default_factory=fleet)
    device: str | None = None
    reasons: dict[str, str] = field(default_factory=dict)


NOT_H100 = "not in pool 'fast'"
FAST = PoolPolicy("fast", {"model": "H100*"})
EDGE_1 = PoolPolicy("edge-1", {"node": "edge-1"})

SCENARIOS = [
    Scenario(
        "fits: binpack takes the smallest device that holds it (the fullest after)",
        req(memory=10),
        device="edge-2/gpu-2",  # the T4: 10 of 16 Gi is the fullest result
    ),
    Scenario(
        "fits: binpack joins a device already in use before opening an empty one",
        req(memory=2),
        placed=[on("edge-1/gpu-0", memory=70)],
        device="edge-1/gpu-0",
    ),
    Scenario(
        "fits: spread takes the emptiest device",
        req(memory=2),
        placed=[on(d, memory=4, replica=i) for i, d in enumerate(ALL) if d != "edge-1/gpu-1"],
        pool=PoolPolicy("default", {}, strategy="spread"),
        device="edge-1/gpu-1",
    ),
    Scenario(
        "pool mismatch: only the H100s are in pool 'fast'",
        req(memory=1, pool="fast"),
        pool=FAST,
        placed=[on("edge-1/gpu-1", memory=8)],
        device="edge-1/gpu-1",
    ),
    Scenario(
        "pool mismatch: nothing in the pool fits, reasons name the pool for the others",
        req(memory=90, pool="fast"),
        pool=FAST,
        reasons=except_(
            NOT_H100,
            edge_1__gpu_0="90Gi requested > 80Gi on this device",
            edge_1__gpu_1="90Gi requested > 80Gi on this device",
        ),
    ),
    Scenario(
        "memory exhausted on every device",
        req(memory=20, pool="fast"),
        pool=FAST,
        placed=[on("edge-1/gpu-0", memory=70), on("edge-1/gpu-1", memory=65, replica=1)],
        reasons=except_(
            NOT_H100,
            edge_1__gpu_0="10Gi free < 20Gi requested",
            edge_1__gpu_1="15Gi free < 20Gi requested",
        ),
    ),
    Scenario(
        "memory: the pool's headroom counts against the free memory",
        req(memory=8, pool="fast"),
        pool=PoolPolicy("fast", {"model": "H100*"}, memory_headroom=4 * GI),
        placed=[on("edge-1/gpu-0", memory=70), on("edge-1/gpu-1", memory=70, replica=1)],
        reasons=except_(
            NOT_H100,
            edge_1__gpu_0="6Gi free < 8Gi requested (4Gi headroom kept)",
            edge_1__gpu_1="6Gi free < 8Gi requested (4Gi headroom kept)",
        ),
    ),
    Scenario(
        "compute exhausted: guaranteed shares may not pass 1",
        req(memory=1, share=0.5, pool="fast"),
        pool=FAST,
        placed=[on("edge-1/gpu-0", share=0.6), on("edge-1/gpu-1", share=0.75, replica=1)],
        reasons=except_(
            NOT_H100,
            edge_1__gpu_0="compute shares would sum to 1.10 > 1 (0.60 already guaranteed)",
            edge_1__gpu_1="compute shares would sum to 1.25 > 1 (0.75 already guaranteed)",
        ),
    ),
    Scenario(
        "compute: a share that fits goes where the shares leave room",
        req(memory=1, share=0.5, pool="fast"),
        pool=FAST,
        placed=[on("edge-1/gpu-0", share=0.6), on("edge-1/gpu-1", share=0.5, replica=1)],
        device="edge-1/gpu-1",
    ),
    Scenario(
        "dedicated tenancy: a device with another tenant's slice is refused",
        req(memory=1, pool="fast"),
        pool=PoolPolicy("fast", {"model": "H100*"}, tenancy="dedicated"),
        placed=[on("edge-1/gpu-0", tenant="support"), on("edge-1/gpu-1", tenant="batch")],
        reasons=except_(
            NOT_H100,
            edge_1__gpu_0="pool is dedicated and another tenant has slices on this device",
            edge_1__gpu_1="pool is dedicated and another tenant has slices on this device",
        ),
    ),
    Scenario(
        "dedicated tenancy: the tenant's own device is fine",
        req(memory=1, pool="fast"),
        pool=PoolPolicy("fast", {"model": "H100*"}, tenancy="dedicated"),
        placed=[on("edge-1/gpu-0", tenant="support"), on("edge-1/gpu-1", tenant="retail")],
        device="edge-1/gpu-1",
    ),
    Scenario(
        "anti-affinity: a replica avoids its siblings' device and prefers another node",
        req(memory=1, replica=1, anti_affinity=True),
        placed=[on("edge-1/gpu-2", memory=20, tenant="retail", deployment="shelf")],
        # the T4 on edge-2 is the fullest result among edge-2's devices
        device="edge-2/gpu-2",
    ),
    Scenario(
        "anti-affinity: every device already holds a replica",
        req(memory=1, replica=8, anti_affinity=True),
        placed=[on(d, tenant="retail", deployment="shelf", replica=i) for i, d in enumerate(ALL)],
        reasons={
            d: f"antiAffinity: replica retail/shelf/{i} of deployment 'shelf' is on this device"
            for i, d in enumerate(ALL)
        },
    ),
    Scenario(
        "NUMA dedicated: only a NUMA node with no other tenant will do",
        req(memory=1, numa="dedicated"),
        placed=[on(d, tenant="support", replica=i) for i, d in enumerate(ALL[:6])],
        device="edge-2/gpu-2",  # edge-2 NUMA 1 (T4, L40S) is free; the T4 is fuller after
    ),
    Scenario(
        "NUMA dedicated: another tenant's dedicated NUMA node is closed to everyone else",
        req(memory=1),
        placed=[
            on("edge-1/gpu-0", tenant="support", numa="dedicated"),
            # every other device is full
            *(
                on(d, memory=gib, tenant="batch", replica=i)
                for i, (d, gib) in enumerate(zip(ALL[2:], (24, 24, 80, 40, 16, 48), strict=True), 1)
            ),
        ],
        reasons=except_(
            "0 free < 1Gi requested",
            edge_1__gpu_0="NUMA node 0 of edge-1 is dedicated to another tenant",
            edge_1__gpu_1="NUMA node 0 of edge-1 is dedicated to another tenant",
        ),
    ),
    Scenario(
        "NUMA local: the NUMA node without other tenants' workers beats a fuller device",
        req(memory=1, numa="local", pool="edge-1"),
        pool=EDGE_1,
        placed=[on("edge-1/gpu-3", tenant="batch")],
        device="edge-1/gpu-0",
    ),
    Scenario(
        "NUMA any: the same request binpacks next to the other tenant",
        req(memory=1, pool="edge-1"),
        pool=EDGE_1,
        placed=[on("edge-1/gpu-3", tenant="batch")],
        device="edge-1/gpu-3",
    ),
    Scenario(
        "exclusive: needs an empty device, and nothing joins one",
        req(memory=1, isolation="exclusive", pool="fast"),
        pool=FAST,
        placed=[on("edge-1/gpu-0"), on("edge-1/gpu-1", isolation="exclusive", replica=1)],
        reasons=except_(
            NOT_H100,
            edge_1__gpu_0="isolation 'exclusive' needs an empty device; 1 slice(s) are on it",
            edge_1__gpu_1="held exclusively by another slice",
        ),
    ),
    Scenario(
        "exclusive: takes the emptied device whole",
        req(memory=1, isolation="exclusive", pool="fast"),
        pool=FAST,
        placed=[on("edge-1/gpu-0")],
        device="edge-1/gpu-1",
    ),
    Scenario(
        "partition: refused on GPUs without MIG, with the reason",
        req(memory=10, isolation="partition", pool="fast"),
        pool=FAST,
        reasons=except_(
            NOT_H100,
            edge_1__gpu_0="MIG is not enabled on this GPU: isolation 'partition' needs a MIG instance",
            edge_1__gpu_1="MIG is not enabled on this GPU: isolation 'partition' needs a MIG instance",
        ),
    ),
    Scenario(
        "quota: the tenant's placed memory plus this slice is over its quota",
        req(memory=6),
        placed=[on("edge-1/gpu-0", memory=5, tenant="retail", deployment="other")],
        quota=TenantQuota(memory=8 * GI),
        reasons=except_("tenant 'retail' memory quota: 5Gi placed + 6Gi requested > 8Gi"),
    ),
    Scenario(
        "quota: compute over the tenant's quota",
        req(memory=1, share=0.5),
        placed=[on("edge-1/gpu-0", share=0.75, tenant="retail", deployment="other")],
        quota=TenantQuota(compute=1.0),
        reasons=except_("tenant 'retail' compute quota: 0.75 placed + 0.50 requested > 1.00"),
    ),
    Scenario(
        "cordoned and unhealthy devices are skipped with their reasons",
        req(memory=1, pool="fast"),
        pool=FAST,
        devices=fleet(cordoned=("edge-1/gpu-0",), unhealthy=("edge-1/gpu-1",)),
        reasons=except_(
            NOT_H100,
            edge_1__gpu_0="cordoned by an operator",
            edge_1__gpu_1="device is unhealthy: Xid 79: GPU has fallen off the bus",
        ),
    ),
]


@pytest.mark.parametrize("s", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_placement_scenario(s: Scenario) -> None:
    result = default_framework().place(
        Cycle(s.request, s.pool, s.quota), Snapshot(s.devices, s.placed)
    )
    if s.device is not None:
        assert result.device_id == s.device, result.reasons or result.scores
        assert result.reasons == {}
        assert result.status.ok
    else:
        assert result.device_id is None, f"placed on {result.device_id}"
        assert result.reasons == s.reasons
        assert result.status.code is Code.UNSCHEDULABLE
