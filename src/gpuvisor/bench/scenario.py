"""A node serving a multi-tenant benchmark's tenants, and the device time each tenant uses."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gpuvisor.bench.mlp import BenchModel
from gpuvisor.bench.oip_clients import Target
from gpuvisor.launch import NodeProcess

__all__ = [
    "NodeScenario",
    "TenantPlan",
    "cpu_seconds",
    "device_busy_seconds",
    "manifest",
    "start_node",
]


@dataclass(frozen=True)
class TenantPlan:
    """One tenant of a scenario: its model, weight, slice profile and batching."""

    tenant: str
    model: BenchModel
    weight: float = 1.0
    share: float = 0.0  # the Profile's computeShare
    latency_class: str = "standard"
    max_batch_size: int = 8
    pool: str = "default"

    @property
    def deployment(self) -> str:
        return self.model.name


def manifest(
    plans: Sequence[TenantPlan], paths: Mapping[str, Path], pools: Mapping[str, str] | None = None
) -> str:
    """Return the YAML deploying every plan: a Tenant, a Profile (256Mi), a Model and a
    Deployment (maxQueueDelay 0) each, plus ``pools`` (name → scheduler, every device)."""
    docs: list[dict[str, Any]] = [
        {"kind": "Pool", "metadata": {"name": name}, "spec": {"scheduler": scheduler}}
        for name, scheduler in (pools or {}).items()
    ]
    for p in plans:
        profile = f"{p.tenant}-slice"
        docs += [
            {"kind": "Tenant", "metadata": {"name": p.tenant}, "spec": {"weight": p.weight}},
            {
                "kind": "Profile",
                "metadata": {"name": profile},
                "spec": {
                    "memory": "256Mi",
                    "computeShare": p.share,
                    "latencyClass": p.latency_class,
                },
            },
            {
                "kind": "Model",
                "metadata": {"name": p.model.name, "tenant": p.tenant},
                "spec": {"format": "onnx", "source": str(paths[p.model.name])},
            },
            {
                "kind": "Deployment",
                "metadata": {"name": p.deployment, "tenant": p.tenant},
                "spec": {
                    "model": p.model.name,
                    "profile": profile,
                    "pool": p.pool,
                    "batching": {"maxBatchSize": p.max_batch_size, "maxQueueDelay": "0ms"},
                },
            },
        ]
    return str(
        yaml.safe_dump_all([{"apiVersion": "gpuvisor/v1", **d} for d in docs], sort_keys=False)
    )


@dataclass
class NodeScenario:
    """A running node with the scenario's tenants deployed, and a key per tenant."""

    node: NodeProcess
    plans: Sequence[TenantPlan]
    keys: dict[str, str]

    def target(self, tenant: str) -> Target:
        plan = next(p for p in self.plans if p.tenant == tenant)
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"}
        return Target(self.node.address, plan.deployment, headers)

    def busy(self) -> dict[str, float]:
        """Device seconds charged so far, per tenant (see device_busy_seconds)."""
        return device_busy_seconds(self.node.url)


@contextmanager
def start_node(
    plans: Sequence[TenantPlan],
    root: Path,
    pools: Mapping[str, str] | None = None,
    quantum_ms: float | None = None,
    timeout: float = 120.0,
    lookahead_ms: float | None = None,
    extra_env: Mapping[str, str] | None = None,
    batch_nice: int | None = None,
) -> Iterator[NodeScenario]:
    """Build the plans' models under ``root``, start a node (no demo; CPU device with
    ``quantum_ms`` and ``lookahead_ms``, and ``workers.batchNice``, when given), apply the
    manifest, create one key per tenant and wait until every model is ready. The node is
    stopped by PID on exit. Raises RuntimeError when the node or a deployment does not come
    up."""
    paths = {p.model.name: p.model.build(root / "models") for p in plans}
    config = None
    cpu: dict[str, Any] = {}
    if quantum_ms is not None:
        cpu["quantum"] = f"{quantum_ms:g}ms"
    if lookahead_ms is not None:
        cpu["lookahead"] = f"{lookahead_ms:g}ms"
    spec: dict[str, Any] = {"cpu": cpu} if cpu else {}
    if batch_nice is not None:
        spec["workers"] = {"batchNice": batch_nice}
    if spec:
        config = root / "node.yaml"
        doc = {"kind": "Node", "metadata": {"name": "bench"}, "spec": spec}
        config.write_text(yaml.safe_dump({"apiVersion": "gpuvisor/v1", **doc}))
    node = NodeProcess(
        state_dir=root / "node", config=config, demo=False, extra_env=dict(extra_env or {})
    )
    try:
        node.start(timeout)
        admin = node.auth(node.admin_key)
        node.apply_as_admin(manifest(plans, paths, pools))
        keys = {p.tenant: node.create_tenant_key(p.tenant, "bench") for p in plans}
        with httpx.Client(base_url=node.url, timeout=30) as http:
            scenario = NodeScenario(node, plans, keys)
            deadline = time.monotonic() + timeout
            for p in plans:
                headers = scenario.target(p.tenant).headers
                while (
                    http.get(f"/v2/models/{p.deployment}/ready", headers=headers).status_code != 200
                ):
                    if time.monotonic() > deadline:
                        slices = http.get("/api/v1/slices", headers=admin).text
                        raise RuntimeError(f"{p.deployment} not ready in {timeout:.0f}s: {slices}")
                    time.sleep(0.1)
        yield scenario
    finally:
        node.stop()


def device_busy_seconds(node_url: str) -> dict[str, float]:
    """Return ``gpuvisor_device_busy_seconds_total`` from the node's /metrics, summed per
    tenant (over devices, deployments and slices)."""
    text = httpx.get(f"{node_url}/metrics", timeout=10).text
    busy: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "gpuvisor_device_busy_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                tenant = sample.labels["tenant"]
                busy[tenant] = busy.get(tenant, 0.0) + sample.value
    return busy


def cpu_seconds(pid: int) -> float:
    """Return the user + system CPU seconds process ``pid`` has used (children not counted)."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)
