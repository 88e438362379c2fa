"""gpuvisor.store: desired state and API key records in SQLite or PostgreSQL."""

from gpuvisor.store.db import default_url, make_engine, upgrade_to_head
from gpuvisor.store.repo import ApplyOutcome, Store, StoredKey, StoredObject

__all__ = [
    "ApplyOutcome",
    "Store",
    "StoredKey",
    "StoredObject",
    "default_url",
    "make_engine",
    "upgrade_to_head",
]
