"""Device health from telemetry readings: read failures come and go, fatal Xids stay."""

from __future__ import annotations

from gpuvisor.control.health import apply_health
from gpuvisor.inventory.device import Device
from gpuvisor.telemetry.readers import DeviceReading


def gpu() -> Device:
    return Device(id="gpu-0", kind="gpu", backend="nvml", model="H100-80GB", memory_total=1)


def test_a_read_failure_marks_unhealthy_until_a_good_read() -> None:
    device = gpu()
    failed = DeviceReading("gpu-0", healthy=False, problem="NVML read failed: GPU is lost")
    assert apply_health([device], {"gpu-0": failed}) == ["gpu-0"]
    assert (device.healthy, device.health_reason) == (False, "NVML read failed: GPU is lost")
    assert apply_health([device], {"gpu-0": failed}) == []  # no change, no report
    assert apply_health([device], {"gpu-0": DeviceReading("gpu-0")}) == ["gpu-0"]
    assert (device.healthy, device.health_reason) == (True, "")


def test_a_fatal_xid_stays_and_a_harmless_one_does_not_count() -> None:
    device = gpu()
    assert apply_health([device], {"gpu-0": DeviceReading("gpu-0", xids=(13,))}) == []
    assert device.healthy  # Xid 13 (a graphics engine exception) is the application's
    assert apply_health([device], {"gpu-0": DeviceReading("gpu-0", xids=(95,))}) == ["gpu-0"]
    assert device.health_reason == "Xid 95: uncontained ECC error"
    assert apply_health([device], {"gpu-0": DeviceReading("gpu-0")}) == []
    assert not device.healthy  # the GPU needs a reset: a good read does not clear it


def test_devices_without_a_reading_are_left_alone() -> None:
    device = gpu()
    device.healthy, device.health_reason = False, "set by someone else"
    assert apply_health([device], {}) == []
    assert device.health_reason == "set by someone else"
