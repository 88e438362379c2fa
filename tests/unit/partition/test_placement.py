"""Partition-tier placement: a slice lands on a free instance of its MIG profile on a simulated
MIG GPU, or stays Pending with the reason; and Fleets declare MIG layouts, checked on load."""

from __future__ import annotations

from typing import Any

import pytest

from gpuvisor.control.controller import Controller
from gpuvisor.control.slices import SliceState
from gpuvisor.errors import SpecError
from gpuvisor.inventory.device import Device, Topology
from gpuvisor.inventory.simulated import devices_from_fleet
from gpuvisor.partition.mig import GEOMETRIES, MigInstance, check_layout
from gpuvisor.placement.placer import PlacedSlice, SliceRequest, place_slice
from gpuvisor.spec.kinds import Fleet
from gpuvisor.spec.loader import load_documents
from gpuvisor.telemetry.metrics import Metrics

GI = 2**30

FLEET = """
apiVersion: gpuvisor/v1
kind: Fleet
metadata: {name: lab}
spec:
  nodes:
    - name: edge-1
      devices:
        - model: H100-80GB
          mig:
            enabled: true
            instances:
              - {profile: 3g.40gb, start: 0}
              - {profile: 1g.10gb, start: 4}
              - {profile: 1g.10gb, start: 5}
              - {profile: 1g.10gb, start: 6}
        - {model: H100-80GB}
"""


def fleet_devices(text: str = FLEET) -> list[Device]:
    (fleet,) = load_documents(text, "fleet.yaml")
    assert isinstance(fleet, Fleet)
    return devices_from_fleet(fleet)


def request(
    profile: str = "1g.10gb", tenant: str = "retail", isolation: str = "partition"
) -> SliceRequest:
    return SliceRequest("retail/shelf/0", tenant, "default", 10 * GI, 0.0, isolation, profile)


def held(device: str, start: int, tenant: str = "retail") -> PlacedSlice:
    return PlacedSlice(f"{tenant}/x/{start}", tenant, device, 10 * GI, 0.0, "partition", start)


def test_the_fleet_layout_is_on_the_simulated_device() -> None:
    mig, whole = fleet_devices()
    assert mig.mig_mode and not whole.mig_mode
    assert mig.mig_instances == (
        MigInstance(0, "3g.40gb"),
        MigInstance(4, "1g.10gb"),
        MigInstance(5, "1g.10gb"),
        MigInstance(6, "1g.10gb"),
    )
    assert check_layout(GEOMETRIES["H100-80GB"], mig.mig_instances) == []
    assert Device.from_dict(mig.to_dict()) == mig


def test_a_partition_slice_lands_on_a_free_instance_of_its_profile() -> None:
    devices = fleet_devices()
    result = place_slice(request(), devices, [], {})
    assert (result.device_id, result.mig_start) == ("edge-1/gpu-0", 4)
    result = place_slice(request(), devices, [held("edge-1/gpu-0", 4)], {})
    assert (result.device_id, result.mig_start) == ("edge-1/gpu-0", 5)
    result = place_slice(request("3g.40gb"), devices, [], {})
    assert (result.device_id, result.mig_start) == ("edge-1/gpu-0", 0)


def test_with_every_instance_taken_it_is_pending_with_the_reason() -> None:
    devices = fleet_devices()
    placed = [held("edge-1/gpu-0", s) for s in (4, 5, 6)]
    result = place_slice(request(), devices, placed, {})
    assert result.device_id is None
    assert result.reasons == {
        "edge-1/gpu-0": "1g.10gb needs offset 0–6 free; slices 0–6 are taken",
        "edge-1/gpu-1": "MIG is not enabled on this GPU: isolation 'partition' needs a MIG instance",
    }
    assert result.explain().startswith("edge-1/gpu-0: 1g.10gb needs offset 0–6 free")


@pytest.mark.parametrize(
    ("profile", "reason"),
    [
        ("2g.20gb", "2g.20gb needs slices 0–1 or 2–3 or 4–5 free; slices 0–5 are taken"),
        ("1g.5gb", "H100-80GB has no MIG profile '1g.5gb'"),
    ],
)
def test_a_profile_that_does_not_fit_the_layout_is_explained(profile: str, reason: str) -> None:
    result = place_slice(request(profile), fleet_devices(), [], {})
    assert result.device_id is None
    assert result.reasons["edge-1/gpu-0"].startswith(reason)


def test_room_for_a_missing_instance_is_reported_but_no_layout_is_changed() -> None:
    text = FLEET.replace(
        """              - {profile: 1g.10gb, start: 4}
              - {profile: 1g.10gb, start: 5}
              - {profile: 1g.10gb, start: 6}
""",
        "",
    )
    devices = fleet_devices(text)
    result = place_slice(request("2g.20gb"), devices, [], {})
    assert result.device_id is None
    assert result.reasons["edge-1/gpu-0"] == (
        "the MIG layout has no 2g.20gb instance; one more fits at offset 4: create it "
        "(gpuvisor plan exports the layout for nvidia-mig-parted)"
    )
    assert devices[0].mig_instances == (MigInstance(0, "3g.40gb"),)


def test_other_tiers_stay_off_mig_gpus_and_dedicated_pools_hold() -> None:
    devices = fleet_devices()
    result = place_slice(request(isolation="process"), devices, [], {})
    assert result.device_id == "edge-1/gpu-1"
    result = place_slice(request(isolation="process"), devices[:1], [], {})
    assert result.reasons["edge-1/gpu-0"] == (
        "MIG is enabled on this GPU: only slices with isolation 'partition' run on it"
    )
    other = [held("edge-1/gpu-0", 0, tenant="support")]
    result = place_slice(request(), devices, other, {}, tenancy="dedicated")
    assert result.device_id is None
    assert "pool is dedicated" in result.reasons["edge-1/gpu-0"]


def test_the_controller_passes_each_slices_instance_back_to_placement() -> None:
    controller = Controller(
        store=None,  # type: ignore[arg-type]
        topology=Topology(fleet_devices()),
        pool=None,  # type: ignore[arg-type]
        dispatchers={},
        metrics=Metrics(),
    )
    state = SliceState(
        id="retail/shelf/0",
        tenant="retail",
        deployment="shelf",
        replica=0,
        spec_hash="",
        pool="default",
        profile="mig",
        memory=10 * GI,
        compute_share=0.0,
        isolation="partition",
        latency_class="standard",
        model_name="m",
        model_version="1",
        device_id="edge-1/gpu-0",
        mig_profile="1g.10gb",
        mig_start=4,
    )
    state.set_state("Ready")
    controller.slices[state.id] = state
    (placed,) = controller._snapshot(exclude="").slices()
    assert placed.mig_start == 4
    assert state.to_dict()["migInstance"] == "1g.10gb@4"
    result = place_slice(request(), controller.topology.devices, [placed], {})
    assert result.mig_start == 5


@pytest.mark.parametrize(
    ("mig", "path", "message"),
    [
        (
            {"enabled": True, "instances": [{"profile": "3g.40gb", "start": 2}]},
            "spec.nodes[0].devices[0].mig.instances[0].start",
            "3g.40gb cannot start at memory slice 2 on H100-80GB (valid starts: 0, 4)",
        ),
        (
            {
                "enabled": True,
                "instances": [
                    {"profile": "4g.40gb", "start": 0},
                    {"profile": "1g.10gb", "start": 3},
                ],
            },
            "spec.nodes[0].devices[0].mig.instances[1].start",
            "1g.10gb at 3 overlaps 4g.40gb at 0 on memory slice 3",
        ),
        (
            {"enabled": True, "instances": [{"profile": "1g.5gb", "start": 0}]},
            "spec.nodes[0].devices[0].mig.instances[0].profile",
            "H100-80GB has no MIG profile '1g.5gb'",
        ),
        (
            {
                "enabled": True,
                "instances": [
                    {"profile": "7g.80gb", "start": 0},
                    {"profile": "7g.80gb", "start": 0},
                ],
            },
            "spec.nodes[0].devices[0].mig.instances[1].start",
            "7g.80gb at 0 overlaps 7g.80gb at 0",
        ),
    ],
)
def test_invalid_fleet_layouts_are_refused_naming_document_and_field(
    mig: dict[str, Any], path: str, message: str
) -> None:
    fleet = Fleet.model_validate(
        {
            "metadata": {"name": "lab"},
            "spec": {"nodes": [{"name": "a", "devices": [{"model": "H100-80GB", "mig": mig}]}]},
        }
    )
    fleet._origin = "fleet.yaml doc 1"
    with pytest.raises(SpecError) as caught:
        devices_from_fleet(fleet)
    line = caught.value.message.splitlines()[0]
    assert line.startswith(f"fleet.yaml doc 1 Fleet/lab: {path}: {message}")


def test_instances_without_mig_are_refused_when_the_document_loads() -> None:
    text = FLEET.replace("enabled: true", "enabled: false")
    with pytest.raises(
        SpecError, match=r"mig\.instances: GPU instances need MIG: set mig\.enabled: true"
    ):
        load_documents(text, "fleet.yaml")
