"""The worker process: hosts one slice's model (or one tenant's shared slices on a device)
and executes only the batches the node's dispatcher grants it.

Run as ``python -m gpuvisor.runtime.worker --endpoint ipc://... --worker-id ID``. The
worker decodes raw request bodies, runs the executor, encodes the responses (all three in
``runtime/execution.py``), and reports the time the batch held the device, so that tensor
work is charged to the tenant whose request caused it and never runs on the node's shared
event loop.

This module is the process's entry point (its arguments, signals and death with the node);
its loop over the node's messages is ``Worker`` in ``runtime/worker_loop.py``, the niceness
of its threads ``runtime/niceness.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Sequence

from gpuvisor.logs import configure_worker_logging
from gpuvisor.runtime.worker_loop import Worker

_CLOSE_LINGER_MS = 2000


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when the node dies, so no worker outlives its node.
    Not SIGTERM: its handler runs only between Python instructions, so a worker in the middle
    of a long batch would run on, orphaned, until the batch ended."""
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except OSError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="gpuvisor worker process (started by the node)")
    parser.add_argument("--endpoint", required=True, help="the node's ZeroMQ ROUTER endpoint")
    parser.add_argument("--worker-id", required=True, help="this worker's identity")
    parser.add_argument(
        "--handoff", default=None, help="path of this worker's handoff (Unix datagram) socket"
    )
    args = parser.parse_args(argv)
    _die_with_parent()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(
        signal.SIGINT, signal.SIG_IGN
    )  # Ctrl-C reaches the node, which stops workers in order
    configure_worker_logging(args.worker_id, dict(os.environ))
    worker = Worker(args.endpoint, args.worker_id, args.handoff)
    try:
        worker.serve()
    finally:
        for loaded in worker.slices.values():
            loaded.executor.close()
        # replies still in the socket's queue go out (a batch that ran is answered), unless
        # the node is gone for that long
        worker.socket.close(linger=_CLOSE_LINGER_MS)
        worker.wake_main.close()
        worker.wake_runner.close()
        if worker.trace is not None:
            worker.trace.close()
        if worker.handoff is not None:
            worker.handoff.close()
            with contextlib.suppress(OSError):
                os.unlink(args.handoff)
    return 0


if __name__ == "__main__":
    sys.exit(main())
