"""Exports for NVIDIA's tools are structurally valid against the formats they document, and the
format checks refuse what those tools refuse."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from gpuvisor.inventory.device import Device
from gpuvisor.partition.export import (
    check_device_plugin,
    check_mig_parted,
    device_plugin_configs,
    mig_parted_config,
)
from gpuvisor.partition.fleet import Workload, plan_fleet
from gpuvisor.partition.mig import MigInstance

GI = 2**30


def gpu(node: str, i: int, mig: bool, layout: tuple[tuple[int, str], ...] = ()) -> Device:
    return Device(
        f"{node}/gpu-{i}",
        "gpu",
        "simulated",
        "H100-80GB",
        80 * GI,
        node=node,
        index=i,
        mig_mode=mig,
        mig_instances=tuple(MigInstance(s, p) for s, p in layout),
    )


def plan() -> Any:
    devices = [
        gpu("edge-1", 0, True, ((0, "3g.40gb"), (4, "3g.40gb"))),
        gpu("edge-1", 1, True),
        gpu("edge-1", 2, True),
        gpu("edge-1", 3, False),
        gpu("edge-2", 0, False),
        gpu("edge-2", 1, False),
    ]
    workloads = [
        Workload("t", "a", 3, "partition", 10 * GI, mig_profile="3g.40gb"),
        Workload("t", "b", 2, "partition", 10 * GI, mig_profile="1g.10gb+me"),
        Workload("t", "c", 7, "process", 8 * GI, compute_share=0.1, selector=(("node", "edge-2"),)),
        Workload("t", "d", 1, "process", 8 * GI, selector=(("node", "edge-1"),)),
    ]
    return plan_fleet(devices, workloads)


def test_the_mig_parted_export_has_a_config_per_node_with_planned_counts() -> None:
    config = mig_parted_config(plan())
    assert check_mig_parted(config) == []
    assert config["version"] == "v1"
    edge1 = config["mig-configs"]["gpuvisor-edge-1"]
    assert edge1[0] == {"devices": [0], "mig-enabled": True, "mig-devices": {"3g.40gb": 2}}
    enabled = [e for e in edge1 if e["mig-enabled"]]
    assert sum(e["mig-devices"].get("3g.40gb", 0) * len(e["devices"]) for e in enabled) == 3
    assert sum(e["mig-devices"].get("1g.10gb+me", 0) * len(e["devices"]) for e in enabled) == 2
    assert {"devices": [3], "mig-enabled": False} in edge1
    assert config["mig-configs"]["gpuvisor-edge-2"] == [{"devices": [0, 1], "mig-enabled": False}]
    # what is written is what is checked: a YAML round trip keeps it valid
    assert check_mig_parted(yaml.safe_load(yaml.safe_dump(config))) == []


def test_the_device_plugin_export_shares_whole_gpus_per_node() -> None:
    configs, notes = device_plugin_configs(plan())
    assert notes == []
    assert all(check_device_plugin(c) == [] for c in configs.values())
    assert configs["edge-1"] == {"version": "v1", "flags": {"migStrategy": "mixed"}}
    assert configs["edge-2"] == {
        "version": "v1",
        "flags": {"migStrategy": "none"},
        "sharing": {
            "timeSlicing": {
                "failRequestsGreaterThanOne": True,
                "resources": [{"name": "nvidia.com/gpu", "replicas": 7}],
            }
        },
    }


def test_mps_is_used_where_the_plugin_supports_it_and_explained_where_not() -> None:
    configs, notes = device_plugin_configs(plan(), sharing="mps")
    assert configs["edge-2"]["sharing"] == {
        "mps": {"resources": [{"name": "nvidia.com/gpu", "replicas": 7}]}
    }
    assert all(check_device_plugin(c) == [] for c in configs.values())
    assert notes == []  # edge-1 shares no whole GPU, so it needs no sharing at all
    with pytest.raises(ValueError, match="unknown sharing"):
        device_plugin_configs(plan(), sharing="vgpu")


def test_mps_on_a_node_with_mig_falls_back_to_time_slicing() -> None:
    devices = [gpu("a", 0, True), gpu("a", 1, False)]
    result = plan_fleet(devices, [Workload("t", "p", 3, "process", 4 * GI)])
    configs, notes = device_plugin_configs(result, sharing="mps")
    assert "timeSlicing" in configs["a"]["sharing"]
    assert notes == [
        "a: the device plugin does not share MIG-enabled nodes with MPS; its config uses time-slicing"
    ]


MIG_PARTED_OK = {
    "version": "v1",
    "mig-configs": {
        "all-1g.10gb": [{"devices": "all", "mig-enabled": True, "mig-devices": {"1g.10gb": 7}}],
        "mixed": [
            {
                "device-filter": ["0x233010DE"],
                "devices": [0, 1],
                "mig-enabled": True,
                "mig-devices": {"1c.2g.20gb": 1, "1g.10gb+me": 1},
            },
            {"devices": [2], "mig-enabled": False},
        ],
        "enabled-empty": [{"devices": "all", "mig-enabled": True, "mig-devices": {}}],
    },
}


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda d: d.update(version="v2"), "version: must be 'v1'"),
        (lambda d: d.update(extra=1), "unexpected field 'extra'"),
        (lambda d: d.update({"mig-configs": {}}), "at least one entry is required"),
        (lambda d: d["mig-configs"].update(empty=[]), "mig-configs.empty: at least one entry"),
        (lambda d: d["mig-configs"]["mixed"][1].pop("devices"), "missing required field 'devices'"),
        (lambda d: d["mig-configs"]["mixed"][1].update(devices="some"), "must be 'all' or a list"),
        (
            lambda d: d["mig-configs"]["mixed"][1].update({"mig-enabled": "yes"}),
            "must be true or false",
        ),
        (
            lambda d: d["mig-configs"]["all-1g.10gb"][0].pop("mig-devices"),
            "'mig-devices' is required",
        ),
        (
            lambda d: d["mig-configs"]["mixed"][1].update({"mig-devices": {"1g.10gb": 1}}),
            "included when 'mig-enabled' is false",
        ),
        (
            lambda d: d["mig-configs"]["all-1g.10gb"][0].update({"mig-devices": {"1g.10": 7}}),
            "invalid MIG profile '1g.10'",
        ),
        (
            lambda d: d["mig-configs"]["all-1g.10gb"][0].update({"mig-devices": {"1g.10gb": -1}}),
            "count must be an integer",
        ),
    ],
)
def test_mig_parted_check_refuses_what_mig_parted_refuses(change: Any, problem: str) -> None:
    assert check_mig_parted(MIG_PARTED_OK) == []
    document = yaml.safe_load(yaml.safe_dump(MIG_PARTED_OK))
    change(document)
    assert any(problem in p for p in check_mig_parted(document)), check_mig_parted(document)


PLUGIN_OK = {
    "version": "v1",
    "flags": {"migStrategy": "mixed"},
    "sharing": {
        "timeSlicing": {
            "renameByDefault": False,
            "resources": [
                {"name": "nvidia.com/gpu", "replicas": 4},
                {
                    "name": "nvidia.com/mig-1g.10gb",
                    "replicas": 2,
                    "devices": ["0:0", 1, "GPU-b1028956-cfa2-0990-bf4a-5da9abb51763"],
                },
            ],
        }
    },
}


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda d: d.update(version="v0"), "version: must be 'v1'"),
        (lambda d: d["flags"].update(migStrategy="split"), "must be none, single or mixed"),
        (
            lambda d: d["sharing"].update(
                mps={"resources": [{"name": "nvidia.com/gpu", "replicas": 2}]}
            ),
            "mutually exclusive",
        ),
        (lambda d: d["sharing"]["timeSlicing"].update(resources=[]), "no resources specified"),
        (
            lambda d: d["sharing"]["timeSlicing"]["resources"][0].update(replicas=0),
            "must be an integer > 0",
        ),
        (lambda d: d["sharing"]["timeSlicing"]["resources"][0].pop("name"), "no resource name"),
        (
            lambda d: d["sharing"]["timeSlicing"]["resources"][0].update(name="nvidia.com/tpu"),
            "not a shareable resource",
        ),
        (
            lambda d: d["sharing"]["timeSlicing"]["resources"][1].update(devices=["gpu0"]),
            "must be 'all', a count",
        ),
        (
            lambda d: d["sharing"]["timeSlicing"].update(strategy="packed"),
            "unknown time-slicing strategy",
        ),
        (
            lambda d: d["sharing"].update(mps=d["sharing"].pop("timeSlicing")),
            "not supported on devices with MIG",
        ),
    ],
)
def test_device_plugin_check_refuses_what_the_plugin_refuses(change: Any, problem: str) -> None:
    assert check_device_plugin(PLUGIN_OK) == []
    document = yaml.safe_load(yaml.safe_dump(PLUGIN_OK))
    change(document)
    assert any(problem in p for p in check_device_plugin(document)), check_device_plugin(document)
