"""What every apply must pass against what is stored, whoever applies: the admin API, and the
demo on a node's first start."""

from __future__ import annotations

from collections.abc import Sequence

from gpuvisor.control.quotas import check_quotas
from gpuvisor.security.signed_models import check_signed_models
from gpuvisor.spec.kinds import Resource
from gpuvisor.spec.loader import validate_references

__all__ = ["check_apply"]


def check_apply(new: Sequence[Resource], existing: Sequence[Resource]) -> None:
    """Refuse ``new`` unless its references resolve, its models satisfy their pools' signing
    rules and its tenants stay within their quotas, given ``existing``; raises the first
    failure (a SpecError, an integrity error or a quota error, each saying what to fix)."""
    validate_references(list(new), list(existing))
    check_signed_models(new, existing)
    check_quotas(new, existing)
