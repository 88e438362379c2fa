"""What each replica last served, kept in the store: a node that restarts while a rolling
update is under way (or stalled on a broken version) brings its replicas back on the version
they served, and resumes the update from there.

Without this, a restart would start only the current spec: where the new version fails to
load, the deployment would serve nothing after a power cut or a node upgrade, where before
the restart the old version kept serving beside the failed one. Workers do not outlive their
node, so what served must be known from the store.

A record is written when an instance with its replica's current spec becomes Ready, and
holds the deployment, its model and its profile as they were then. At the node's first
reconcile, a replica with no instance whose record differs from its current spec starts an
instance with the recorded spec first (once); the rolling update then runs as it does
without a restart: the recorded version serves until the new one is Ready. The pool is the
current one, so the pool's present rules (signed models, tenancy) apply to what comes back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence

from gpuvisor.control.desired import DesiredSlice, desired_slices, find_pool, find_tenant
from gpuvisor.errors import SpecError
from gpuvisor.spec.kinds import Deployment, Resource
from gpuvisor.spec.loader import resource_from_dict, resource_to_dict
from gpuvisor.store.repo import ServedRecord, Store

__all__ = ["ServedSpecs", "replica_ids"]

log = logging.getLogger("gpuvisor.control")


def replica_ids(resources: Iterable[Resource]) -> set[str]:
    """The ids of every replica the deployments among ``resources`` ask for (those unloaded
    through the model repository API included: they come back on a restart)."""
    return {
        f"{r.metadata.tenant or ''}/{r.metadata.name}/{i}"
        for r in resources
        if isinstance(r, Deployment)
        for i in range(r.spec.replicas)
    }


class ServedSpecs:
    """The store's records of what each replica served, as the controller keeps them."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._known: dict[str, ServedRecord] | None = None  # read at the first reconcile
        self._to_restore: dict[str, ServedRecord] = {}  # until the first reconcile ends
        self._pending: dict[str, ServedRecord | None] = {}  # None: forget the replica
        self._writer: asyncio.Task[None] | None = None

    async def load(self) -> None:
        """Read the records, once per node start (before its first reconcile)."""
        if self._known is not None:
            return
        records = await asyncio.to_thread(self.store.list_served)
        self._known = {r.replica_id: r for r in records}
        self._to_restore = dict(self._known)

    def has_served(self, replica_id: str) -> bool:
        """Whether the replica has served (had a Ready instance) since it was asked for."""
        return self._known is not None and replica_id in self._known

    def started(self) -> None:
        """The first reconcile is over: what was not restored by now is not restored later."""
        self._to_restore.clear()

    def previous(self, want: DesiredSlice, resources: Sequence[Resource]) -> DesiredSlice | None:
        """The spec ``want``'s replica served before the node started, when it differs from
        ``want``'s and can still be served (each replica is asked about once per start)."""
        record = self._to_restore.pop(want.slice_id, None)
        if record is None or record.spec_hash == want.spec_hash or want.problem:
            return None
        try:
            served = [resource_from_dict(body) for body in record.body.get("resources", [])]
        except SpecError as exc:  # written by another version of gpuvisor
            log.warning("slice %s: its last served spec cannot be read: %s", want.slice_id, exc)
            return None
        deployment = next((r for r in served if isinstance(r, Deployment)), None)
        if deployment is None:
            return None
        current = [
            find_tenant(resources, want.tenant),
            find_pool(resources, deployment.spec.pool),
        ]
        with_rules = [*served, *(r for r in current if r is not None)]
        old = next(
            (d for d in desired_slices(with_rules, set()) if d.slice_id == want.slice_id), None
        )
        if old is None or old.problem or old.spec_hash == want.spec_hash:
            return None
        return old

    def record(self, want: DesiredSlice) -> None:
        """An instance with ``want``'s spec became Ready: that is what its replica serves."""
        known = self._known if self._known is not None else {}
        before = known.get(want.slice_id)
        if before is not None and before.spec_hash == want.spec_hash:
            return
        parts = [want.deployment, want.model, want.profile]
        body = {"resources": [resource_to_dict(r) for r in parts if r is not None]}
        record = ServedRecord(
            want.slice_id, want.tenant, want.deployment.metadata.name, want.spec_hash, body
        )
        known[want.slice_id] = record
        self._write(want.slice_id, record)

    def keep(self, replicas: set[str]) -> None:
        """Forget the replicas that are no longer asked for (deleted, or scaled away)."""
        if self._known is None:
            return
        for rid in [rid for rid in self._known if rid not in replicas]:
            del self._known[rid]
            self._write(rid, None)

    def _write(self, replica_id: str, record: ServedRecord | None) -> None:
        self._pending[replica_id] = record
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(
                self._flush(), name="served-specs"
            )

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, {}
            records = [r for r in batch.values() if r is not None]
            forget = [rid for rid, r in batch.items() if r is None]
            try:
                await asyncio.to_thread(self.store.put_served, records, forget)
            except Exception as exc:  # the database is away: a restart then restores less
                log.warning("could not record what %s serve(s): %s", ", ".join(sorted(batch)), exc)

    async def close(self) -> None:
        """Finish writing what was recorded."""
        if self._writer is not None:
            await self._writer
