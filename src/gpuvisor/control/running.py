"""The books of the slices this node runs: each instance by id and by deployment, with its
supervisor; adding, forgetting and stopping one.

The controller decides what runs; this holds what does, so that a lookup per request (the
instances of a deployment) costs a dict access."""

from __future__ import annotations

from gpuvisor.control.slices import SliceState, SliceSupervisor
from gpuvisor.telemetry.metrics import Metrics

__all__ = ["RunningSlices"]


class RunningSlices:
    """The instances a node runs, and their supervisors (an instance that is Pending or
    Failed for good has none)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.slices: dict[str, SliceState] = {}
        self.supervisors: dict[str, SliceSupervisor] = {}
        # slices by (tenant, deployment): inference looks them up on every request
        self.by_deployment: dict[tuple[str, str], list[SliceState]] = {}

    def of_replica(self, replica_id: str) -> list[SliceState]:
        """The instances of one replica: one, or two while a rolling update replaces it."""
        return [s for s in self.slices.values() if s.replica_id == replica_id]

    def of_deployment(self, tenant: str, deployment: str) -> list[SliceState]:
        return list(self.by_deployment.get((tenant, deployment), ()))

    def put(self, state: SliceState, replaced: SliceState | None) -> None:
        """Add an instance; ``replaced``: the one that had its id until now, if any."""
        self.slices[state.id] = state
        siblings = self.by_deployment.setdefault((state.tenant, state.deployment), [])
        if replaced is not None and replaced in siblings:
            siblings.remove(replaced)
        siblings.append(state)

    def forget(self, state: SliceState) -> None:
        """Drop an instance from the node's books (its supervisor, if any, is already gone)."""
        if self.slices.get(state.id) is state:
            del self.slices[state.id]
        siblings = self.by_deployment.get((state.tenant, state.deployment), [])
        if state in siblings:
            siblings.remove(state)
        if not siblings:
            self.by_deployment.pop((state.tenant, state.deployment), None)

    async def stop(self, slice_id: str, drain: float = 0.0, reason: str = "") -> None:
        """Stop an instance (after up to ``drain`` seconds for what it has queued), forget it
        and drop its series (memory gauges, device time)."""
        sup = self.supervisors.pop(slice_id, None)
        if sup is not None:
            await sup.stop(drain, reason)
        gone = self.slices.get(slice_id)
        if gone is not None:
            self.forget(gone)
        if gone is not None and gone.device_id is not None:
            labels = (gone.device_id, gone.tenant, gone.deployment, gone.id)
            m = self.metrics
            for series in (m.slice_memory_limit, m.slice_memory_used, m.device_busy):
                m.remove_series(series, *labels)

    def publish_counts(self) -> None:
        """Set the slices gauge: instances by tenant, deployment and state."""
        self.metrics.slices.clear()
        for s in self.slices.values():
            self.metrics.slices.labels(s.tenant, s.deployment, s.state).inc()
