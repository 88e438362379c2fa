"""One batch at a time on a device, with the lookahead on: a running node with a critical and a
batch tenant under load, its workers tracing when each batch ran (GPUVISOR_BATCH_TRACE). The
next batch is sent ahead and handed the device worker to worker, critical requests take the
place of staged batches, and still no two batches of the device ever run at once."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

from gpuvisor.bench.mlp import BenchModel
from gpuvisor.bench.oip_clients import SaturatingLoad, run_open_loop
from gpuvisor.bench.scenario import TenantPlan, start_node

CRITICAL = BenchModel("chat-mlp", (256, 512, 16))
BULK = BenchModel("bulk-mlp", (512, 1024, 1024, 16))


def _trace(path: Path) -> list[tuple[str, int, float, float, bool]]:
    rows = []
    for line in path.read_text().splitlines():
        worker, batch, start, end, revoked = line.split()
        rows.append((worker, int(batch), float(start), float(end), revoked == "1"))
    return sorted(rows, key=lambda row: row[2])


def test_batches_of_one_device_never_overlap_with_the_lookahead_on(tmp_path: Path) -> None:
    trace = tmp_path / "batches.trace"
    plans = [
        TenantPlan("chat", CRITICAL, share=0.5, latency_class="critical", max_batch_size=8),
        TenantPlan("bulk", BULK, latency_class="batch", max_batch_size=4),
    ]
    env = {"GPUVISOR_BATCH_TRACE": str(trace)}
    with start_node(plans, tmp_path, quantum_ms=2, lookahead_ms=2, extra_env=env) as node:
        load = SaturatingLoad(3.0)
        load.add(node.target("bulk"), BULK.inputs(2), concurrency=6)
        load.start()
        try:
            results = []
            chat = threading.Thread(
                target=lambda: results.append(
                    run_open_loop("chat", node.target("chat"), CRITICAL.inputs(1), 150, 2.0, 7)
                )
            )
            chat.start()
            chat.join(60)
            counts = load.finish()
        finally:
            load.kill()
        time.sleep(0.2)  # the last trace lines are written before the replies go out
    assert results and results[0].errors == 0 and results[0].requests > 100
    assert counts[0][0] > 20 and counts[0][1] == 0

    batches = [row for row in _trace(trace) if not row[4]]
    workers = {row[0] for row in batches}
    assert len(workers) == 2, "both tenants' workers ran batches"
    switches = sum(1 for a, b in itertools.pairwise(batches) if a[0] != b[0])
    assert switches > 50, "the device passed between the two workers many times"
    overlaps = []
    busy_until, last = 0.0, batches[0]
    for row in batches:  # in order of start: each must start after every earlier one ended
        if row[2] < busy_until - 1e-6:
            overlaps.append((last, row))
        if row[3] > busy_until:
            busy_until, last = row[3], row
    assert overlaps == [], f"{len(overlaps)} batches overlapped, e.g. {overlaps[:3]}"
