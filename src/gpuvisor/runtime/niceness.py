"""The niceness of a worker's threads: its slices' work yields the CPU, its messaging does not."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["set_niceness"]

# libzmq names its background threads "ZMQbg/IO/0", "ZMQbg/Reaper" (from libzmq 4.3)
_MESSAGING_THREADS = "ZMQbg/"


def set_niceness(value: int) -> None:
    """Set the niceness of every thread of this process that runs the slices' work (on Linux
    a thread's niceness is its own, and the executor's threads exist by now); raises OSError
    when the OS refuses.

    ZeroMQ's own threads keep theirs: they only move messages (microseconds each), and a
    niced I/O thread would make the next batch's message, and this batch's reply, wait
    behind every other process on a busy machine, idling the device between batches."""
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:  # no /proc: the process as a whole
        threads = [0]
    for tid in threads:
        if tid and _thread_name(tid).startswith(_MESSAGING_THREADS):
            continue
        try:
            os.setpriority(os.PRIO_PROCESS, tid, value)
        except ProcessLookupError:
            continue  # the thread ended meanwhile


def _thread_name(tid: int) -> str:
    try:
        return Path(f"/proc/self/task/{tid}/comm").read_text().strip()
    except OSError:
        return ""
