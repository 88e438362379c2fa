"""Where the bootstrap admin key lives in a state directory, and reading it back. Kept apart
from ``keys`` (which loads the key store, SQLAlchemy and Alembic) so that the CLI's client
can find the key without that import."""

from __future__ import annotations

from pathlib import Path

__all__ = ["ADMIN_KEY_FILE", "admin_key_path", "read_admin_key"]

ADMIN_KEY_FILE = "admin.key"


def admin_key_path(state_dir: Path) -> Path:
    """Return where the bootstrap admin key is written: ``<state_dir>/admin.key``."""
    return Path(state_dir).expanduser() / ADMIN_KEY_FILE


def read_admin_key(state_dir: Path) -> str | None:
    """Return the admin key written by ``KeyRing.ensure_admin_key``, or None if there is none."""
    try:
        text = admin_key_path(state_dir).read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return text or None
