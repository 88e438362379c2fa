"""The folders a tenant's own key may name Model files in (``Tenant.spec.modelRoots``).

A Model's ``source`` is a path on the node: unconfined, a tenant key could serve another
tenant's model file, or learn whether any path exists. Where the admin gives a tenant model
folders, a Model applied with that tenant's key must name a file inside them, symbolic links
followed (a link inside pointing outside is outside). Admin keys are not confined.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from gpuvisor.errors import Forbidden, IntegrityError
from gpuvisor.quoting import quoted
from gpuvisor.spec.kinds import Model, Resource, Tenant

__all__ = ["check_model_roots", "confining_roots", "inside", "load_check"]


def inside(path: str, roots: Sequence[str]) -> bool:
    """Whether ``path``, its links followed, is one of ``roots`` (their links followed too) or
    lies below one."""
    real = os.path.realpath(path)
    for root in roots:
        base = os.path.realpath(root)
        if real == base or real.startswith(base.rstrip("/") + "/"):
            return True
    return False


def _named_inside(path: str, roots: Sequence[str]) -> bool:
    """Whether ``path`` as written (no link followed) lies in one of ``roots``."""
    written = os.path.normpath(os.path.abspath(path))
    return any(
        written == os.path.normpath(r) or written.startswith(os.path.normpath(r).rstrip("/") + "/")
        for r in roots
    )


def confining_roots(model: Model, tenant: Tenant | None) -> list[str] | None:
    """The folders a load of ``model`` must find its file in: the tenant's, when the source
    is named in them (as a tenant key must name it); None when nothing confines it (no
    folders, or a source an admin named elsewhere)."""
    roots = tenant.spec.model_roots if tenant is not None else None
    if not roots or not _named_inside(model.spec.source, roots):
        return None
    return list(roots)


def load_check(model: Model, tenant: Tenant | None) -> Callable[[], None] | None:
    """What a load of ``model`` checks again, just before it reads the file: a source named in
    the tenant's model folders must still lead inside them. A link there can be pointed
    elsewhere after the apply (at another tenant's model, say); the load then fails instead
    (and the worker checks the file it opens once more, ``LoadModel.roots``). None when there
    is nothing to check (no folders, or a source an admin named elsewhere)."""
    roots = confining_roots(model, tenant)
    source = model.spec.source
    if roots is None:
        return None

    def check() -> None:
        if not inside(source, roots):
            raise IntegrityError(
                f"model file {quoted(source)} now leads outside tenant "
                f"'{tenant.metadata.name if tenant else ''}''s model folders "
                f"({', '.join(roots)}; Tenant spec.modelRoots), through a symbolic link "
                "changed since it was applied: point it back inside",
                reason="outside_model_roots",
            )

    return check


def check_model_roots(tenant: str, new: Sequence[Resource], existing: Sequence[Resource]) -> None:
    """Refuse (Forbidden, 403) a Model in ``new`` that a key of ``tenant`` applies from outside
    the tenant's model folders, when the tenant has any."""
    owner = next((r for r in existing if isinstance(r, Tenant) and r.metadata.name == tenant), None)
    roots = owner.spec.model_roots if owner is not None else None
    if roots is None:
        return
    folders = ", ".join(roots) if roots else "none"
    for model in (r for r in new if isinstance(r, Model)):
        source = model.spec.source
        if not inside(source, roots):
            raise Forbidden(
                f"Model {model.metadata.name}@{model.spec.version}: its source "
                f"{quoted(source)} is outside tenant '{tenant}''s model folders "
                f"({folders}; Tenant spec.modelRoots): put the file in one of them, or ask an "
                "admin to apply this Model"
            )
        if not _named_inside(source, roots):
            # it leads inside through a link named elsewhere: every load checks a source
            # named inside, and that link could be pointed elsewhere after the apply
            raise Forbidden(
                f"Model {model.metadata.name}@{model.spec.version}: its source "
                f"{quoted(source)} leads into tenant '{tenant}''s model folders ({folders}) "
                "through a link named outside them: name the file by its path in the "
                "folders (as written in Tenant spec.modelRoots)"
            )
