"""Read YAML manifests into spec objects, check references, and write them back out.

Every problem found is collected and raised as one ``SpecError`` with one line per problem::

    deployments.yaml doc 3 Deployment/shelf-detector: spec.profile: unknown profile 'rt-smal' (did you mean 'rt-small'?)

A document may also be a List (``kind: List`` or a bare ``items:``), as ``gpuvisor get KIND -o
yaml`` prints one: its items are read in order, and their problems say ``doc 1 item 3``.
Reading the text into those placed objects is ``gpuvisor.spec.documents``; this module
validates each object as a kind and checks what objects name.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from gpuvisor.spec.diagnostics import describe_error, error_path
from gpuvisor.spec.documents import (
    LIST_KIND,
    Problem,
    located_objects,
    parse_documents,
    place,
    raise_problems,
)
from gpuvisor.spec.kinds import (
    API_VERSION,
    DEFAULT_POOL,
    KINDS,
    Deployment,
    Model,
    Node,
    Pool,
    Profile,
    Resource,
    Tenant,
    resource_key,
)
from gpuvisor.spec.types import quoted, shorten

__all__ = [
    "dump_documents",
    "find_model",
    "load_documents",
    "origin_of",
    "resource_from_dict",
    "resource_to_dict",
    "validate_references",
]

RESOURCE_ADAPTER: TypeAdapter[Resource] = TypeAdapter(Resource)
_MAX_LISTED = 12
_MAX_NAME_SHOWN = 80
"""A name is at most 63 characters; one longer is refused, and shown cut to this length."""


def _closest(value: str, known: Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(value, list(known), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _envelope_problem(document: Any) -> tuple[str, str] | None:
    """Return (path, message) when a document cannot be validated as any kind at all."""
    if not isinstance(document, dict):
        got = "nothing" if document is None else f"a {type(document).__name__}"
        return "", f"expected a mapping with apiVersion, kind, metadata and spec, got {got}"
    reported = _reported_thing(document)
    if reported is not None:
        return "", (
            f"this is {reported} as 'gpuvisor get' prints it: what the node reports, not an "
            "object to apply (apply Tenant, Profile, Pool, Model or Deployment manifests)"
        )
    kind = document.get("kind")
    if kind == LIST_KIND:
        return "kind", "a List cannot hold another List: put its items in this one"
    expected = f"expected one of {', '.join(KINDS)}"
    if kind is None:
        return "kind", f"required field is missing ({expected})"
    if kind not in KINDS:
        hint = _closest(kind, KINDS) if isinstance(kind, str) else None
        return "kind", f"unknown kind {quoted(kind)} ({expected})" + (
            f"; did you mean {hint!r}?" if hint else ""
        )
    return None


def _reported_thing(document: dict[str, Any]) -> str | None:
    """Return "a device" or "a slice" for one as ``gpuvisor get devices|slices`` prints it."""
    if "id" not in document or "apiVersion" in document or "metadata" in document:
        return None
    if "backend" in document:
        return "a device"
    return "a slice" if "state" in document else None


def _raw_name(document: dict[str, Any]) -> str | None:
    metadata = document.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    return shorten(name, _MAX_NAME_SHOWN) if isinstance(name, str) else None


def _absolute(path: str, base_dir: Path | None) -> str:
    expanded = Path(path).expanduser()
    if expanded.is_absolute() or base_dir is None:
        return str(expanded)
    return os.path.abspath(base_dir / expanded)


def load_documents(
    text: str, source: str = "<input>", base_dir: Path | None = None
) -> list[Resource]:
    """Return the objects in a multi-document YAML text, in order; empty documents are skipped.

    A List document (``kind: List`` or a bare ``items:``) stands for its items, in order.
    Relative ``Model.spec.source`` (and ``Node.spec.fleet``) paths become absolute against
    ``base_dir`` when it is given. Raises SpecError listing every problem found: invalid YAML,
    unknown kinds or fields, invalid values, tenant-scope mistakes, an object given twice.
    """
    problems: list[Problem] = []
    resources: list[Resource] = []
    first_seen: dict[tuple[str, str, str], str] = {}
    for index, item, document in located_objects(parse_documents(text, source), source, problems):
        if isinstance(document, dict):
            # what the node reports (`gpuvisor get … -o yaml`), not what is asked: ignored, so
            # that a document got can be edited and applied again
            document.pop("status", None)
            if "spec" in document and document["spec"] is None:
                del document["spec"]  # `spec:` with nothing under it, as if it were left out
        envelope = _envelope_problem(document)
        if envelope is not None:
            problems.append(Problem(source, index, None, None, *envelope, item))
            continue
        kind, name = document["kind"], _raw_name(document)
        found = _document_problems(document, kind)
        resource = None
        try:
            resource = RESOURCE_ADAPTER.validate_python(document)
        except ValidationError as exc:
            found.extend(_field_problems(exc, kind))
        if resource is not None and not found:
            key = resource_key(resource)
            if key in first_seen:
                duplicate = f"{_describe_key(key)} is already defined in {first_seen[key]}"
                found.append(
                    ("metadata.name", f"{duplicate}; each object may appear once per apply")
                )
            first_seen.setdefault(key, place(index, item))
        if found or resource is None:
            problems.extend(Problem(source, index, kind, name, *problem, item) for problem in found)
            continue
        resource._origin = f"{source} {place(index, item)}"
        if isinstance(resource, Model):
            resource.spec.source = _absolute(resource.spec.source, base_dir)
        elif isinstance(resource, Node) and resource.spec.fleet is not None:
            resource.spec.fleet = _absolute(resource.spec.fleet, base_dir)
        resources.append(resource)
    raise_problems(problems)
    return resources


def _document_problems(document: dict[str, Any], kind: str) -> list[tuple[str, str]]:
    """Return what a document must say although the Python model has a default for it."""
    if "apiVersion" not in document:
        return [("apiVersion", f"required field is missing (expected {API_VERSION!r})")]
    return []


def _describe_key(key: tuple[str, str, str]) -> str:
    kind, tenant, name = key
    name, _, version = name.partition("@")
    described = f"{kind} {name!r}" + (f" version {version!r}" if version else "")
    return described + (f" of tenant {tenant!r}" if tenant else "")


def _field_problems(exc: ValidationError, kind: str) -> list[tuple[str, str]]:
    """Return (YAML path, message) for each error pydantic found in a document of ``kind``."""
    found = []
    for error in exc.errors():
        loc = error["loc"][1:] if error["loc"][:1] == (kind,) else error["loc"]
        found.append((error_path(loc, error), describe_error(kind, loc, error)))
    return found


def origin_of(resource: Resource) -> str:
    """Return where an object was read from, e.g. ``"deployments.yaml doc 3"``."""
    return resource._origin or "<input>"


def find_model(
    models: Iterable[Model], tenant: str, name: str, version: str | None = None
) -> Model | None:
    """Return the tenant's model ``name`` at ``version``, or its highest version when None.

    Versions compare naturally: numeric parts as integers ("10" > "9", "1.10" > "1.9").
    """
    candidates = [m for m in models if m.metadata.tenant == tenant and m.metadata.name == name]
    if version is not None:
        return next((m for m in candidates if m.spec.version == version), None)
    return max(candidates, key=lambda m: _version_order(m.spec.version), default=None)


_RELEASE = re.compile(r"[vV]?(\d+(?:\.\d+)*)(.*)", re.DOTALL)


def _version_order(
    version: str,
) -> tuple[int, tuple[int, ...], int, tuple[tuple[int, int, str], ...]]:
    """How versions sort, the highest last, as releases do: numbers compare as numbers
    (``1.10`` > ``1.9``), a leading ``v`` is no part of the number (``v2`` is 2), a
    pre-release comes before its release (``1.10-rc1`` < ``1.10``; a suffix that starts
    with ``-`` or a letter), and a version that starts with no number at all comes before
    every one that does."""
    match = _RELEASE.fullmatch(version)
    if match is None:
        return (0, (), 0, _natural(version))
    release = tuple(int(n) for n in match.group(1).split("."))
    rest = match.group(2)
    pre_release = bool(rest) and (rest[0] == "-" or rest[0].isalpha())
    return (1, release, 0 if pre_release else 1, _natural(rest.lstrip("-._")))


def _natural(text: str) -> tuple[tuple[int, int, str], ...]:
    """``text`` with its runs of digits compared as numbers (``rc10`` > ``rc9``)."""
    parts = re.split(r"(\d+)", text)
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in parts if part)


def _suggestion(value: str, known: list[str], plural: str) -> str:
    """Return ' (did you mean ...?)', ' (known ...: a, b)' or ' (no ... are defined)'."""
    hint = _closest(value, known)
    if hint:
        return f" (did you mean {hint!r}?)"
    if known:
        listed = ", ".join(known[:_MAX_LISTED]) + (", ..." if len(known) > _MAX_LISTED else "")
        return f" (known {plural}: {listed})"
    return f" (no {plural} are defined yet)"


def validate_references(new: list[Resource], existing: list[Resource]) -> None:
    """Check that ``new`` objects name profiles, pools, models and tenants that exist.

    ``existing`` is what is already stored; objects in ``new`` replace those with the same key.
    Raises SpecError with one line per dangling reference.
    """
    merged = {resource_key(r): r for r in existing}
    merged.update({resource_key(r): r for r in new})
    everything = list(merged.values())
    tenants = {r.metadata.name: r for r in everything if isinstance(r, Tenant)}
    profiles = sorted(r.metadata.name for r in everything if isinstance(r, Profile))
    pools = sorted({DEFAULT_POOL} | {r.metadata.name for r in everything if isinstance(r, Pool)})
    models = [r for r in everything if isinstance(r, Model)]

    problems: list[Problem] = []
    for resource in new:
        report = _reporter(problems, resource)
        tenant = resource.metadata.tenant
        if tenant is not None and tenant not in tenants:
            hint = _suggestion(tenant, sorted(tenants), "tenants")
            report("metadata.tenant", f"unknown tenant {tenant!r}{hint}")
        if isinstance(resource, Tenant):
            for i, pool in enumerate(resource.spec.pools):
                if pool not in pools:
                    hint = _suggestion(pool, pools, "pools")
                    report(f"spec.pools[{i}]", f"unknown pool {pool!r}{hint}")
        elif isinstance(resource, Deployment):
            _check_deployment(resource, tenants, profiles, pools, models, report)
    raise_problems(problems)


_Report = Callable[[str, str], None]


def _reporter(problems: list[Problem], resource: Resource) -> _Report:
    """Return a function that records a problem (path, message) about ``resource``."""

    origin, kind, name = origin_of(resource), resource.kind, resource.metadata.name

    def report(path: str, message: str) -> None:
        problems.append(Problem.at_origin(origin, kind, name, path, message))

    return report


def _check_deployment(
    deployment: Deployment,
    tenants: dict[str, Tenant],
    profiles: list[str],
    pools: list[str],
    models: list[Model],
    report: _Report,
) -> None:
    spec, tenant = deployment.spec, deployment.metadata.tenant or ""
    if spec.profile not in profiles:
        hint = _suggestion(spec.profile, profiles, "profiles")
        report("spec.profile", f"unknown profile {spec.profile!r}{hint}")
    if spec.pool not in pools:
        report("spec.pool", f"unknown pool {spec.pool!r}{_suggestion(spec.pool, pools, 'pools')}")
    elif (
        tenant in tenants
        and tenants[tenant].spec.pools
        and spec.pool not in tenants[tenant].spec.pools
    ):
        allowed = ", ".join(tenants[tenant].spec.pools)
        advice = f"pick one of those or add {spec.pool!r} to the Tenant's spec.pools"
        report("spec.pool", f"tenant {tenant!r} may only deploy to pools {allowed}: {advice}")
    own = [m for m in models if m.metadata.tenant == tenant]
    names = sorted({m.metadata.name for m in own})
    if spec.model_name not in names:
        hint = _suggestion(spec.model_name, names, "models")
        report("spec.model", f"unknown model {spec.model_name!r} of tenant {tenant!r}{hint}")
    elif (
        spec.model_version is not None
        and find_model(own, tenant, spec.model_name, spec.model_version) is None
    ):
        versions = sorted(
            (m.spec.version for m in own if m.metadata.name == spec.model_name), key=_version_order
        )
        missing = f"model {spec.model_name!r} has no version {spec.model_version!r}"
        report("spec.model", f"{missing} (known versions: {', '.join(versions)})")


def resource_to_dict(resource: Resource) -> dict[str, Any]:
    """Return the object as JSON-ready data with camelCase keys (sizes in bytes, durations in s)."""
    return resource.model_dump(by_alias=True, mode="json")


def resource_from_dict(data: dict[str, Any], origin: str = "<stored>") -> Resource:
    """Rebuild an object from :func:`resource_to_dict` output; SpecError if it is not valid."""
    kind = data.get("kind") if isinstance(data, dict) else None
    kind = kind if kind in KINDS else ""
    name = _raw_name(data) if isinstance(data, dict) else None
    try:
        resource = RESOURCE_ADAPTER.validate_python(data)
    except ValidationError as exc:
        found = _field_problems(exc, kind)
        raise_problems([Problem.at_origin(origin, kind, name or "", *problem) for problem in found])
        raise  # unreachable: pydantic reports at least one error
    resource._origin = origin
    return resource


def dump_documents(resources: Iterable[Resource]) -> str:
    """Return the objects as one multi-document YAML text (camelCase keys, unset fields left out)."""
    documents = [r.model_dump(by_alias=True, mode="json", exclude_none=True) for r in resources]
    text: str = yaml.safe_dump_all(documents, sort_keys=False, default_flow_style=False)
    return text
