"""The demo a first `gpuvisor up` starts: sample models, the demo manifests, tenant keys."""

from __future__ import annotations

import json
import logging
import os
import shutil
from importlib import resources
from pathlib import Path

from gpuvisor.control.checks import check_apply
from gpuvisor.demo.models import build_demo_models
from gpuvisor.security.keys import KeyRing, node_made_key_record
from gpuvisor.spec.kinds import Tenant, resource_key
from gpuvisor.spec.loader import (
    load_documents,
    resource_from_dict,
    resource_to_dict,
)
from gpuvisor.store.audit import NODE_ROLE, AuditEvent
from gpuvisor.store.repo import Store, StoredObject

__all__ = ["DEMO_FACT", "DemoState", "prepare_demo"]

log = logging.getLogger("gpuvisor.demo")

#: The fact the store keeps once the demo's manifests are in it: the keys file they were
#: written to. The database decides, not the state directory: a deleted keys file, or a new
#: state directory on the same database, must not bring the demo back over the operator's
#: changes.
DEMO_FACT = "demo.applied"


class DemoState:
    """Where the demo's files live under the state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "demo"
        self.manifest = self.dir / "demo.yaml"
        self.models = self.dir / "models"
        self.keys_file = self.dir / "tenant-keys.json"
        # where the demo's keys were written when it was applied (here, or by a node with
        # another state directory on the same database)
        self.keys_written_to = self.keys_file

    def tenant_keys(self) -> dict[str, str]:
        if not self.keys_file.exists():
            return {}
        return dict(json.loads(self.keys_file.read_text()))


def prepare_demo(state_dir: Path, store: Store, keys: KeyRing) -> DemoState:
    """Build the demo models, apply the demo manifests and create one key per demo tenant.

    The manifests are applied once, on the first start on a database (``DEMO_FACT``):
    afterwards the store is the truth, so what an operator changed or deleted stays that way,
    even when the keys file is deleted or another state directory uses the same database. They pass the checks an apply
    through the API passes (references, signed models, quotas), and what they create is in
    the audit log like any apply (no actor: the node did it). The model files are rebuilt
    when missing. Returns where the demo lives.
    """
    demo = DemoState(state_dir)
    demo.models.mkdir(parents=True, exist_ok=True)
    build_demo_models(demo.models)
    applied = store.get_fact(DEMO_FACT)
    if applied is None and demo.keys_file.exists():  # applied before the store kept the fact
        store.set_fact(DEMO_FACT, str(demo.keys_file))
        return demo
    if applied is None and store.list():
        # A database that holds objects but no record of the demo: one from before the store
        # kept the fact (its demo applied from another state directory), or an operator's
        # own. The demo is not applied over it.
        log.info("the database holds objects already: the demo is not applied to it")
        store.set_fact(DEMO_FACT, str(demo.keys_file))
        return demo
    if applied is not None:
        demo.keys_written_to = Path(applied)
        return demo
    packaged = resources.files("gpuvisor.demo").joinpath("demo.yaml")
    with resources.as_file(packaged) as path:
        shutil.copyfile(path, demo.manifest)
    docs = load_documents(demo.manifest.read_text(), source=str(demo.manifest), base_dir=demo.dir)
    existing = [resource_from_dict(o.body) for o in store.list()]
    check_apply(docs, existing)
    store.apply(
        [StoredObject(*resource_key(d), body=resource_to_dict(d)) for d in docs],
        audit=lambda applied: [
            AuditEvent(
                action="apply",
                result="ok",
                role=NODE_ROLE,
                tenant=o.tenant,
                object_kind=o.kind,
                object_name=o.name,
                reason=f"{outcome}: the demo, on the node's first start",
            )
            for o, outcome in applied
        ],
    )
    tenant_keys = demo.tenant_keys()
    for doc in docs:
        if isinstance(doc, Tenant) and doc.metadata.name not in tenant_keys:
            _, secret = keys.create(
                "tenant",
                doc.metadata.name,
                description="demo key",
                audit=lambda info: [
                    node_made_key_record(
                        info, f"role tenant, the demo's key written to {demo.keys_file}"
                    )
                ],
            )
            tenant_keys[doc.metadata.name] = secret
    demo.keys_file.write_text(json.dumps(tenant_keys, indent=2))
    os.chmod(demo.keys_file, 0o600)
    store.set_fact(DEMO_FACT, str(demo.keys_file))
    return demo
