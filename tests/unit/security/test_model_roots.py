"""Tenant model folders: a tenant key names Model files only inside them, links followed."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuvisor.errors import Forbidden
from gpuvisor.security.model_roots import check_model_roots, inside
from gpuvisor.spec.loader import load_documents


def _tenant(roots: str) -> str:
    return f"apiVersion: gpuvisor/v1\nkind: Tenant\nmetadata: {{name: shop}}\nspec: {roots}\n"


def _model(source: Path | str) -> str:
    return (
        "apiVersion: gpuvisor/v1\nkind: Model\nmetadata: {name: m, tenant: shop}\n"
        f"spec: {{source: '{source}'}}\n"
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/ (the tenant's folder) with a model and a link out; other/ beside it; rootx/, a
    folder whose name only starts like the root's."""
    for folder in ("root", "other", "rootx"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "model.onnx").write_bytes(b"x")
    (tmp_path / "root" / "sub").mkdir()
    (tmp_path / "root" / "sub" / "deep.onnx").write_bytes(b"x")
    (tmp_path / "root" / "escape.onnx").symlink_to(tmp_path / "other" / "model.onnx")
    return tmp_path


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("root/model.onnx", True),
        ("root/sub/deep.onnx", True),
        ("root/missing.onnx", True),  # not there yet: the apply warns, the folder is right
        ("root/../other/model.onnx", False),
        ("root/escape.onnx", False),  # a link inside that points outside
        ("rootx/model.onnx", False),  # a sibling folder whose name starts like the root's
        ("other/model.onnx", False),
    ],
)
def test_a_path_is_inside_only_when_its_real_path_is(tree: Path, path: str, allowed: bool) -> None:
    assert inside(str(tree / path), [str(tree / "root")]) is allowed


def test_a_tenant_without_folders_is_not_confined_and_one_with_none_may_name_nothing(
    tree: Path,
) -> None:
    outside = load_documents(_model(tree / "other" / "model.onnx"), "m.yaml")
    check_model_roots("shop", outside, load_documents(_tenant("{}"), "t.yaml"))  # no modelRoots
    with pytest.raises(Forbidden) as refused:
        check_model_roots("shop", outside, load_documents(_tenant("{modelRoots: []}"), "t.yaml"))
    assert "outside tenant 'shop''s model folders (none; Tenant spec.modelRoots)" in str(
        refused.value
    )


def test_a_model_outside_the_tenants_folders_is_refused_with_the_way_out(tree: Path) -> None:
    tenant = load_documents(_tenant(f"{{modelRoots: ['{tree / 'root'}']}}"), "t.yaml")
    check_model_roots(
        "shop", load_documents(_model(tree / "root" / "model.onnx"), "m.yaml"), tenant
    )
    with pytest.raises(Forbidden) as refused:
        check_model_roots(
            "shop", load_documents(_model(tree / "root" / "escape.onnx"), "m.yaml"), tenant
        )
    assert refused.value.http_status == 403
    assert str(refused.value).endswith(
        "put the file in one of them, or ask an admin to apply this Model"
    )


def test_a_link_pointed_outside_after_the_apply_fails_the_next_load(tree: Path) -> None:
    """Applied while the link led inside; pointed at another tenant's file afterwards: the
    load checks again and refuses. A source an admin named outside the folders is left be."""
    from gpuvisor.errors import IntegrityError
    from gpuvisor.security.model_roots import load_check
    from gpuvisor.spec.kinds import Model, Tenant

    link = tree / "root" / "link.onnx"
    link.symlink_to(tree / "root" / "model.onnx")
    tenant, model = load_documents(
        _tenant(f"{{modelRoots: ['{tree / 'root'}']}}") + "---\n" + _model(link)
    )
    assert isinstance(tenant, Tenant) and isinstance(model, Model)
    check = load_check(model, tenant)
    assert check is not None
    check()  # still inside: nothing to say
    link.unlink()
    link.symlink_to(tree / "other" / "model.onnx")
    with pytest.raises(IntegrityError, match="now leads outside tenant 'shop''s model folders"):
        check()
    (_, elsewhere) = load_documents(_tenant("{}") + "---\n" + _model(tree / "other" / "model.onnx"))
    assert isinstance(elsewhere, Model) and load_check(elsewhere, tenant) is None
    assert load_check(model, None) is None


def test_a_tenant_names_its_file_in_its_folders_not_through_a_link_from_elsewhere(
    tree: Path,
) -> None:
    """A link named outside the folders that leads inside would be checked at apply only:
    pointed at another tenant's file afterwards, nothing at load would see it. So is a file
    named by the real path of a folder the Tenant names through a link."""
    tenant = load_documents(_tenant(f"{{modelRoots: ['{tree / 'root'}']}}"), "t.yaml")
    into = tree / "other" / "into.onnx"
    into.symlink_to(tree / "root" / "model.onnx")
    with pytest.raises(Forbidden) as refused:
        check_model_roots("shop", load_documents(_model(into), "m.yaml"), tenant)
    assert "through a link named outside them: name the file by its path in the folders" in str(
        refused.value
    )
    real = tree / "real-root"
    real.mkdir()
    (real / "model.onnx").write_bytes(b"x")
    (tree / "linked-root").symlink_to(real)
    linked = load_documents(_tenant(f"{{modelRoots: ['{tree / 'linked-root'}']}}"), "t.yaml")
    check_model_roots("shop", load_documents(_model(tree / "linked-root" / "model.onnx")), linked)
    with pytest.raises(Forbidden):
        check_model_roots("shop", load_documents(_model(real / "model.onnx")), linked)
