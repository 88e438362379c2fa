"""Device health from telemetry: which GPUs placement must avoid, and why.

A GPU NVML cannot read is unhealthy until it reads again. A GPU that raised an Xid that
needs a reset (double-bit ECC, fallen off the bus, uncontained ECC, GSP errors...) stays
unhealthy until the node restarts, since its contexts are gone. Slices leave an unhealthy
device at the next reconcile (see ``Controller``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from gpuvisor.inventory.device import Device
from gpuvisor.telemetry.readers import DeviceReading

__all__ = ["FATAL_XIDS", "apply_health"]

log = logging.getLogger("gpuvisor.control")

#: Xid codes after which a GPU needs a reset before it runs work again (NVIDIA's Xid catalogue).
FATAL_XIDS: Mapping[int, str] = {
    48: "double-bit ECC error",
    62: "internal micro-controller halt",
    64: "ECC page retirement or row remapping failure",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
}


def apply_health(devices: Iterable[Device], readings: Mapping[str, DeviceReading]) -> list[str]:
    """Update each read device's ``healthy`` and ``health_reason``; return the ids that changed."""
    changed: list[str] = []
    for device in devices:
        reading = readings.get(device.id)
        if reading is None:
            continue
        fatal = [x for x in reading.xids if x in FATAL_XIDS]
        sticky = device.health_reason.startswith("Xid ")
        if fatal:
            healthy, reason = False, f"Xid {fatal[0]}: {FATAL_XIDS[fatal[0]]}"
        elif sticky:
            healthy, reason = False, device.health_reason
        elif not reading.healthy:
            healthy, reason = False, reading.problem or "NVML reports it unhealthy"
        else:
            healthy, reason = True, ""
        if (healthy, reason) != (device.healthy, device.health_reason):
            device.healthy, device.health_reason = healthy, reason
            changed.append(device.id)
            if healthy:
                log.info("device %s is healthy again", device.id)
            else:
                log.warning("device %s is unhealthy: %s; its slices move", device.id, reason)
    return changed
