"""`gpuvisor describe deployment` and `gpuvisor status` as an operator reads them: durations
as manifests write them, times in UTC, what each slice is given and what its batches cost."""

from __future__ import annotations

from typing import Any

from gpuvisor.cli_tables import describe_deployment, render_status

STARTED = 1795309496.7  # 2026-11-22T01:04:56Z


def _deployment(**status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "shelf-detector", "tenant": "retail"},
        "spec": {
            "model": "shelf-classifier@3",
            "profile": "rt-small",
            "pool": "inference",
            "replicas": 2,
            "batching": {"maxBatchSize": 8, "maxQueueDelay": 0.0005},
            "slo": {"latency": 0.1},
            "rollout": {"maxSurge": 1},
        },
        "status": {
            "readyReplicas": 2,
            "updatedReplicas": 2,
            "rollout": "",
            "slices": [
                {
                    "id": "retail/shelf-detector/0",
                    "device": "cpu-0",
                    "state": "Ready",
                    "reason": "",
                    "pid": 3238,
                    "restarts": 1,
                    "queued": 3,
                    "latencyClass": "critical",
                    "computeShare": 0.25,
                    "memory": 536870912,
                    "isolation": "process",
                    "rssBytes": 69259264,
                    "since": STARTED + 1,
                    "model": "shelf-classifier@3",
                    "profileSeconds": {"8": 9.1136e-05, "1": 2.7952e-05, "2": 3.4171e-05},
                    "unplacedReasons": {},
                }
            ],
            **status,
        },
    }


def test_a_deployment_reads_as_its_manifest_with_what_each_slice_is_given() -> None:
    text = describe_deployment(_deployment())
    lines = text.splitlines()
    assert "Replicas:    2 ready of 2" in lines  # all updated: nothing more to say
    assert "Rollout:     maxSurge 1" in lines
    assert "Batching:    maxBatchSize 8, maxQueueDelay 500us" in lines
    assert "SLO:         latency 100ms" in lines
    assert "Model:       shelf-classifier@3" in lines
    # which version each replica serves (during a rolling update, not all the same)
    assert (
        "  retail/shelf-detector/0  Ready  on cpu-0  pid 3238  serves shelf-classifier@3" in lines
    )
    assert "    given: critical class, computeShare 0.25, memory 512Mi, process isolation" in lines
    assert (
        "    since 2026-11-22T01:04:57Z: 1 restart(s), 3 queued, worker RSS 66.1Mi at load" in lines
    )
    # once sampled, the memory the worker uses now, against the slice's cap
    sampled = _deployment()
    sampled["status"]["slices"][0]["memoryUsed"] = 75 << 20
    assert (
        "    since 2026-11-22T01:04:57Z: 1 restart(s), 3 queued, memory used 75Mi (of 512Mi)"
        in describe_deployment(sampled).splitlines()
    )
    # batch sizes in order, their times to three significant digits
    assert "    time per batch: 1 → 28us, 2 → 34.2us, 8 → 91.1us" in lines


def test_an_update_in_progress_says_how_far_it_has_come() -> None:
    stalled = "1 of 2 replica(s) updated; 1 waiting for their turn"
    text = describe_deployment(_deployment(updatedReplicas=1, rollout=stalled))
    assert "Replicas:    2 ready of 2, 1 updated" in text.splitlines()
    assert f"Rollout:     maxSurge 1; {stalled}" in text.splitlines()


def test_no_slo_and_no_queue_delay_are_said_plainly() -> None:
    body = _deployment()
    body["spec"]["model"] = "shelf-classifier"
    del body["spec"]["slo"]
    body["spec"]["batching"]["maxQueueDelay"] = 0.0
    lines = describe_deployment(body).splitlines()
    assert "SLO:         none" in lines
    assert "Model:       shelf-classifier (its highest version)" in lines
    assert "Batching:    maxBatchSize 8, maxQueueDelay 0" in lines


def test_status_says_since_when_and_whose_key_asked() -> None:
    data = {
        "ready": True,
        "startedAt": STARTED,
        "devices": 1,
        "slices": {"Ready": 3, "Pending": 1},
        "principal": {"role": "tenant", "tenant": "retail"},
    }
    text = render_status(data, "http://127.0.0.1:8700", STARTED + 2 * 3600 + 5 * 60 + 7)
    assert text.splitlines() == [
        "node:     http://127.0.0.1:8700  ready",
        "started:  2026-11-22T01:04:56Z (up 2h 5m)",
        "devices:  1",
        "slices:   1 Pending, 3 Ready",
        "key:      tenant key of tenant 'retail'",
    ]
    admin = {**data, "ready": False, "slices": {}, "principal": {"role": "admin"}}
    lines = render_status(admin, "http://127.0.0.1:8700", STARTED + 42).splitlines()
    assert lines[0].endswith("not ready") and lines[1].endswith("(up 42s)")
    assert lines[3:] == ["slices:   none", "key:      admin key"]


def _reasons(status: dict[str, Any]) -> str:
    from rich.console import Console

    from gpuvisor.cli_tables import render_table

    item = {"metadata": {"name": "d", "tenant": "t"}, "spec": {"replicas": 3}, "status": status}
    console = Console(width=400, record=True)
    console.print(render_table("deployments", [item]))
    [row] = [line for line in console.export_text().splitlines() if line.lstrip().startswith("t ")]
    return row


def test_a_deployments_reason_says_each_cause_once_and_that_it_is_unloaded() -> None:
    full = "cpu-0: compute shares would sum to 1.15 > 1 (0.90 already guaranteed)"
    pending = {"slices": [{"reason": full}, {"reason": full}, {"reason": ""}]}
    assert _reasons(pending).count(full) == 1
    assert "unloaded (load it again" in _reasons({"unloaded": True, "slices": []})
