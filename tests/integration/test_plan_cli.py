"""`gpuvisor plan` end to end: a Fleet and manifests on disk, the real CLI, its outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gpuvisor.cli import app
from gpuvisor.partition.export import check_device_plugin, check_mig_parted
from gpuvisor.partition.mig import GEOMETRIES, MigInstance, check_layout

runner = CliRunner()
ENV = {"COLUMNS": "200"}

FLEET = """\
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
        - {model: H100-80GB, count: 2, mig: {enabled: true}}
    - name: edge-2
      devices:
        - {model: L40S, count: 2}
"""

APPS = """\
apiVersion: gpuvisor/v1
kind: Profile
metadata: {name: mig-small}
spec: {memory: 10Gi, isolation: partition, migProfile: 1g.10gb}
---
apiVersion: gpuvisor/v1
kind: Profile
metadata: {name: mig-large}
spec: {memory: 40Gi, isolation: partition, migProfile: 3g.40gb}
---
apiVersion: gpuvisor/v1
kind: Profile
metadata: {name: small}
spec: {memory: 4Gi, computeShare: 0.2}
---
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {name: shelf, tenant: retail}
spec: {model: shelf, profile: mig-small, replicas: 5}
---
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {name: chat, tenant: support}
spec: {model: chat, profile: mig-large, replicas: 4}
---
apiVersion: gpuvisor/v1
kind: Deployment
metadata: {name: scorer, tenant: batch}
spec: {model: scorer, profile: small, replicas: 11}
"""


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    fleet, apps = tmp_path / "fleet.yaml", tmp_path / "apps.yaml"
    fleet.write_text(FLEET)
    apps.write_text(APPS)
    return fleet, apps


def plan(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["plan", *args], env=ENV)
    return result.exit_code, result.stdout, result.stderr


def test_json_output_places_every_slice_or_says_why(files: tuple[Path, Path]) -> None:
    fleet, apps = files
    code, out, err = plan("--fleet", str(fleet), "-f", str(apps), "-o", "json")
    assert code == 0, err
    data = json.loads(out)
    assert [g["id"] for g in data["gpus"]] == [
        "edge-1/gpu-0",
        "edge-1/gpu-1",
        "edge-1/gpu-2",
        "edge-2/gpu-0",
        "edge-2/gpu-1",
    ]
    geometry = GEOMETRIES["H100-80GB"]
    held: dict[str, int] = {}
    for gpu in data["gpus"][:3]:
        layout = [MigInstance(i["start"], i["profile"]) for i in gpu["instances"]]
        assert check_layout(geometry, layout) == []
        for instance in gpu["instances"]:
            assert instance["size"] == geometry.profile(instance["profile"]).memory_slices  # type: ignore[union-attr]
            if instance["deployment"]:
                held[instance["deployment"]] = held.get(instance["deployment"], 0) + 1
    assert held == {"shelf": 5, "chat": 4}
    # the declared layout is kept: its three 1g.10gb instances hold shelf replicas
    first = data["gpus"][0]["instances"]
    assert [(i["profile"], i["start"], i["new"]) for i in first] == [
        ("3g.40gb", 0, False),
        ("1g.10gb", 4, False),
        ("1g.10gb", 5, False),
        ("1g.10gb", 6, False),
    ]
    assert all(i["deployment"] for i in first)
    # two L40S GPUs take 5 slices each by compute share; the eleventh waits, with reasons
    (pending,) = data["pending"]
    assert (pending["deployment"], pending["tenant"], pending["replicas"]) == ("scorer", "batch", 1)
    assert any("compute shares would sum to 1.20 > 1" in r for r in pending["reasons"])
    assert data["summary"]["slicesPlaced"] == 19


def test_table_output_and_exports(files: tuple[Path, Path], tmp_path: Path) -> None:
    fleet, apps = files
    out_dir = tmp_path / "exports"
    code, out, err = plan("--fleet", str(fleet), "-f", str(apps), "--export", str(out_dir))
    assert code == 0, err
    assert "MIG GPUs" in out and "Whole GPUs (no MIG)" in out and "Pending" in out
    assert "1g.10gb@4 retail/shelf#0" in out
    assert "fragmentation:" in out and "GPUs used: 5 of 5" in out
    mig_parted = out_dir / "mig-parted.yaml"
    assert f"wrote {mig_parted}" in err
    text = mig_parted.read_text()
    assert text.startswith("# MIG layouts planned by `gpuvisor plan`")
    document = yaml.safe_load(text)
    assert check_mig_parted(document) == []
    assert set(document["mig-configs"]) == {"gpuvisor-edge-1", "gpuvisor-edge-2"}
    for node in ("edge-1", "edge-2"):
        config = yaml.safe_load((out_dir / f"device-plugin-{node}.yaml").read_text())
        assert check_device_plugin(config) == []
    edge2 = yaml.safe_load((out_dir / "device-plugin-edge-2.yaml").read_text())
    assert edge2["sharing"]["timeSlicing"]["resources"] == [
        {"name": "nvidia.com/gpu", "replicas": 5}
    ]


def test_existing_only_uses_declared_instances_alone(files: tuple[Path, Path]) -> None:
    fleet, apps = files
    code, out, _ = plan("--fleet", str(fleet), "-f", str(apps), "-o", "json", "--existing-only")
    assert code == 0
    data = json.loads(out)
    assert [len(g["instances"]) for g in data["gpus"][:3]] == [4, 0, 0]
    chat = next(p for p in data["pending"] if p["deployment"] == "chat")
    assert chat["replicas"] == 3
    assert any("edge-1/gpu-0: 3g.40gb needs slices 0–3 or 4–7 free" in r for r in chat["reasons"])


def test_a_folder_of_manifests_is_read_whole(files: tuple[Path, Path], tmp_path: Path) -> None:
    fleet, _ = files
    folder = tmp_path / "manifests"
    folder.mkdir()
    for i, document in enumerate(APPS.split("---\n")):
        (folder / f"{i}.yaml").write_text(document)
    code, out, _ = plan("--fleet", str(fleet), "-f", str(folder), "-o", "json")
    assert code == 0
    assert json.loads(out)["summary"]["slicesPlaced"] == 19


def test_an_invalid_layout_is_refused_naming_the_document_and_field(
    files: tuple[Path, Path],
) -> None:
    fleet, apps = files
    fleet.write_text(FLEET.replace("{profile: 1g.10gb, start: 6}", "{profile: 2g.20gb, start: 6}"))
    code, out, err = plan("--fleet", str(fleet), "-f", str(apps))
    assert code == 1 and out == ""
    assert (
        "fleet.yaml doc 1 Fleet/lab: spec.nodes[0].devices[0].mig.instances[3].start: "
        "2g.20gb cannot start at memory slice 6 on H100-80GB (valid starts: 0, 2, 4)"
    ) in " ".join(err.split())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fleet", "missing.yaml"], "missing.yaml: no such file"),
        (["-o", "xml"], "--output must be table or json"),
        (["--sharing", "vgpu"], "--sharing must be time-slicing or mps"),
    ],
)
def test_usage_errors(files: tuple[Path, Path], args: list[str], message: str) -> None:
    fleet, apps = files
    code, _, err = plan("--fleet", str(fleet), "-f", str(apps), *args)
    assert code == 1 and message in err


def test_a_manifest_file_without_a_fleet_is_refused(files: tuple[Path, Path]) -> None:
    _, apps = files
    code, _, err = plan("--fleet", str(apps), "-f", str(apps))
    assert code == 1 and "expected one Fleet document, found 0" in err


def test_manifests_without_a_deployment_plan_nothing_and_say_so(
    files: tuple[Path, Path],
) -> None:
    fleet, apps = files
    code, _, err = plan("--fleet", str(fleet), "-f", str(fleet))
    assert code == 0
    assert "warning: the manifests hold no Deployment: nothing was planned" in err
    code, _, err = plan("--fleet", str(fleet), "-f", str(apps))
    assert code == 0 and "warning" not in err


def test_the_installed_command_runs(files: tuple[Path, Path]) -> None:
    fleet, apps = files
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpuvisor",
            "plan",
            "--fleet",
            str(fleet),
            "-f",
            str(apps),
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["summary"]["gpus"] == 5


def test_an_object_in_two_files_is_planned_as_the_last_says(
    files: tuple[Path, Path], tmp_path: Path
) -> None:
    """As `apply -f a -f b` would leave it: the second file's 2 shelf replicas, not 5 + 2
    credited to one deployment with a pending remainder."""
    fleet, apps = files
    again = tmp_path / "shelf-again.yaml"
    shelf = next(d for d in APPS.split("---\n") if "name: shelf," in d)
    again.write_text(shelf.replace("replicas: 5", "replicas: 2"))
    code, out, _ = plan("--fleet", str(fleet), "-f", str(apps), "-f", str(again), "-o", "json")
    assert code == 0
    data = json.loads(out)
    held = [i for g in data["gpus"] for i in g["instances"] if i["deployment"] == "shelf"]
    assert len(held) == 2, held
    assert all(p["deployment"] != "shelf" for p in data["pending"])


def test_exporting_a_fleet_without_gpus_says_there_is_nothing_to_export(
    files: tuple[Path, Path], tmp_path: Path
) -> None:
    _, apps = files
    empty = tmp_path / "empty.yaml"
    empty.write_text(
        "apiVersion: gpuvisor/v1\nkind: Fleet\nmetadata: {name: lab}\n"
        "spec:\n  nodes:\n    - {name: edge-1}\n"
    )
    code, _, err = plan("--fleet", str(empty), "-f", str(apps), "--export", str(tmp_path / "out"))
    assert code == 1
    assert "nothing to export: the fleet has no GPU" in " ".join(err.split())
    assert not (tmp_path / "out").exists()
