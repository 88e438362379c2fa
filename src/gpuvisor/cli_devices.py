"""The device commands: `gpuvisor cordon`, `drain` and `uncordon` (registered in cli.py)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.text import Text

from gpuvisor.cli_options import KeyOpt, StateOpt, UrlOpt, fail, node_client, stdout_console
from gpuvisor.errors import GpuvisorError
from gpuvisor.quoting import printable

__all__ = ["cordon", "drain", "uncordon"]

DeviceArg = Annotated[str, typer.Argument(help="the device id, as `gpuvisor get devices` shows it")]
ReasonOpt = Annotated[str, typer.Option("--reason", "-r", help="why (kept in the audit log)")]


def _device_action(
    action: str,
    device: str,
    body: dict[str, str] | None,
    url: str | None,
    key: str | None,
    state: str | None,
    wait: float = 0.0,
) -> None:
    """POST a device action and print where the device's slices are now; ``wait``: the
    seconds a drain may wait for them to settle."""
    client = node_client(url, key, state)
    try:
        result = client.request(
            "POST",
            f"/api/v1/devices/{device}/{action}",
            json=body,
            params={"timeout": wait} if wait else {},
            timeout=wait + 30,
        )
    except GpuvisorError as exc:
        fail(exc)
    # a drain that timed out leaves slices running there: the device is cordoned, not drained
    left = [
        sl["id"]
        for sl in result["slices"]
        if action == "drain" and sl.get("device") == device and sl["state"] in _RUNNING
    ]
    verb = {"cordon": "cordoned", "drain": "drained", "uncordon": "uncordoned"}[action]
    if left:
        verb = "cordoned"
    note = (
        ""
        if result["changed"]
        else (" (it already was cordoned)" if result["cordoned"] else " (it was not cordoned)")
    )
    out = stdout_console()
    out.print(f"device/{device} {verb}{note}", highlight=False)
    for sl in result["slices"]:
        where = f"on {sl['device']}" if sl.get("device") else "on no device"
        line = f"  {sl['id']}: {sl['state']} {where}  {sl.get('reason', '')}"
        out.print(Text(printable(line)), highlight=False)
    stranded = [sl for sl in result["slices"] if sl["state"] == "Pending"]
    if stranded and action != "uncordon":
        out.print(
            f"warning: {len(stranded)} slice(s) found no other device with room and serve "
            f"nothing until one has room or `gpuvisor uncordon {device}`",
            highlight=False,
        )
    if left:
        fail(
            f"device {device} is not drained: {len(left)} slice(s) still run on it after "
            f"{wait:g}s ({', '.join(left)}); their reasons above say why. Wait longer "
            f"(`gpuvisor drain {device} --timeout SECONDS`) before taking the device down"
        )


_RUNNING = ("Loading", "Ready", "Restarting", "Stopping")  # a slice in these holds its device


def cordon(
    device: DeviceArg,
    reason: ReasonOpt = "",
    url: UrlOpt = None,
    key: KeyOpt = None,
    state: StateOpt = None,
) -> None:
    """Take a device out of placement: its slices move to other devices of their pools now
    (or wait Pending with reasons); disallowMigration slices stay. Kept across restarts."""
    _device_action("cordon", device, {"reason": reason}, url, key, state)


def drain(
    device: DeviceArg,
    reason: ReasonOpt = "",
    timeout: Annotated[
        float,
        typer.Option(
            metavar="SECONDS",
            min=1,
            max=600,
            help="seconds to wait for the slices to settle, at most 600",
        ),
    ] = 60.0,
    url: UrlOpt = None,
    key: KeyOpt = None,
    state: StateOpt = None,
) -> None:
    """Cordon a device and wait until its slices are Ready elsewhere (or Pending with reasons)."""
    _device_action("drain", device, {"reason": reason}, url, key, state, timeout)


def uncordon(
    device: DeviceArg, url: UrlOpt = None, key: KeyOpt = None, state: StateOpt = None
) -> None:
    """Return a cordoned device to placement; Pending slices may then be placed on it."""
    _device_action("uncordon", device, None, url, key, state)
