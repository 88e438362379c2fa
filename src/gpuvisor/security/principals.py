"""Who a request acts as: the role, tenant and id of its key (a Principal), and what it may see."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

__all__ = ["ROLES", "Principal", "Role"]

Role = Literal["admin", "operator", "tenant"]
ROLES: tuple[str, ...] = get_args(Role)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's role, its tenant (None for admin/operator) and key id."""

    role: Role
    tenant: str | None
    key_id: str

    @property
    def sees_all(self) -> bool:
        """Admin and operator keys read every tenant's objects (and operate devices)."""
        return self.role in ("admin", "operator")

    def may_see(self, tenant: str) -> bool:
        """Whether this key may read what belongs to ``tenant`` ("" for no tenant: no)."""
        return self.sees_all or (tenant != "" and tenant == self.tenant)

    @property
    def kind_of_key(self) -> str:
        """``an admin key``, ``an operator key``, ``a tenant key``: for messages."""
        return f"{'an' if self.role[0] in 'aeiou' else 'a'} {self.role} key"
