"""Read a manifest text into objects, each with its place, and report problems by that place.

A text holds YAML documents (or one JSON object). A List document (``kind: List`` or a bare
``items:``) stands for its items, so an object's place is ``doc 3`` or ``doc 1 item 3``; every
problem is one line naming that place, and all of them are raised together as one SpecError.
"""

from __future__ import annotations

import json
import re
from collections.abc import Hashable
from dataclasses import asdict, dataclass
from typing import Any

import yaml

from gpuvisor.errors import SpecError
from gpuvisor.spec.diagnostics import format_path, type_name
from gpuvisor.spec.kinds import API_VERSION
from gpuvisor.spec.types import quoted

__all__ = [
    "LIST_KIND",
    "MAX_EXPANDED_VALUES",
    "Problem",
    "located_objects",
    "parse_documents",
    "place",
    "raise_problems",
]

LIST_KIND = "List"
_LIST_FIELDS = ("apiVersion", "kind", "items")
_ORIGIN_RE = re.compile(r"^(?P<source>.*) doc (?P<doc>\d+)(?: item (?P<item>\d+))?$")

MAX_EXPANDED_VALUES = 100_000
"""Most values (scalars, lists, mappings) a document that uses YAML aliases may expand to.
An alias repeats its anchor's value, so aliases of aliases grow a short text exponentially (a
455-byte "billion laughs" is 10^8 values); real manifests, Lists of many objects included,
hold some thousands."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one document, rendered as one line of the SpecError."""

    source: str
    doc: int | None
    kind: str | None
    name: str | None
    path: str
    message: str
    item: int | None = None
    """The object's place in a List document, counted from 1; None for a document of its own."""

    @classmethod
    def at_origin(cls, origin: str, kind: str, name: str, path: str, message: str) -> Problem:
        match = _ORIGIN_RE.match(origin)
        if match:
            item = int(match["item"]) if match["item"] else None
            return cls(match["source"], int(match["doc"]), kind, name, path, message, item)
        return cls(origin, None, kind, name, path, message)

    def fields(self) -> dict[str, Any]:
        """Return the problem as the SpecError's ``problems`` list holds it (``item`` if any)."""
        fields = asdict(self)
        if self.item is None:
            del fields["item"]
        return fields

    def line(self) -> str:
        where = self.source if self.doc is None else f"{self.source} {place(self.doc, self.item)}"
        if self.kind:
            where += f" {self.kind}/{self.name}" if self.name else f" {self.kind}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


def raise_problems(problems: list[Problem]) -> None:
    """Raise one SpecError with a line per problem; return if there are none."""
    if problems:
        raise SpecError(
            "\n".join(problem.line() for problem in problems),
            problems=[problem.fields() for problem in problems],
        )


def place(doc: int, item: int | None) -> str:
    """Return where an object is in its text: ``doc 3``, or ``doc 1 item 3`` in a List."""
    return f"doc {doc}" if item is None else f"doc {doc} item {item}"


class _AliasBomb(Exception):
    """A document whose aliases expand it beyond ``MAX_EXPANDED_VALUES``; ``alias`` grows most."""

    def __init__(self, alias: str) -> None:
        super().__init__(alias)
        self.alias = alias


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Return how many values ``node`` stands for once every alias in it is written out.

    Each node is counted once (``sizes``), so this takes time in the size of the text, not of
    the expansion; a count stops a little over ``MAX_EXPANDED_VALUES``, as does an alias inside
    its own anchor (an endless value).
    """
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        return MAX_EXPANDED_VALUES + 1
    open_nodes.add(key)
    children: list[yaml.Node] = []
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    total = 1
    for child in children:
        total += _expanded_size(child, sizes, open_nodes)
        if total > MAX_EXPANDED_VALUES:
            break
    open_nodes.discard(key)
    sizes[key] = min(total, MAX_EXPANDED_VALUES + 1)
    return sizes[key]


class _StrictLoader(yaml.SafeLoader):  # type: ignore[misc,unused-ignore]
    """A safe YAML loader that refuses a key given twice in one mapping (YAML keeps the last)
    and a document whose aliases expand it beyond ``MAX_EXPANDED_VALUES`` (a "billion laughs").
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases: list[tuple[str, yaml.Node]] = []
        """(anchor name, node) of each alias in the document being read."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        alias = None
        if self.check_event(yaml.AliasEvent):
            event: yaml.AliasEvent = self.peek_event()  # type: ignore[no-untyped-call]  # stub
            alias = event.anchor
        node: yaml.Node | None = super().compose_node(parent, index)
        if alias is not None and node is not None:
            self._aliases.append((alias, node))
        return node

    def construct_document(self, node: yaml.Node) -> Any:
        """Return the document's value; raise _AliasBomb before building an expanding one."""
        aliases, self._aliases = self._aliases, []
        if aliases:
            sizes: dict[int, int] = {}
            if _expanded_size(node, sizes, set()) > MAX_EXPANDED_VALUES:
                largest = max(aliases, key=lambda alias: _expanded_size(alias[1], sizes, set()))
                raise _AliasBomb(largest[0])
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Hashable] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable):
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {quoted(key)}", key_node.start_mark
                    )
                seen.add(key)
        mapping: dict[Hashable, Any] = super().construct_mapping(node, deep=deep)
        return mapping


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    mapping = dict(pairs)
    if len(mapping) != len(pairs):
        raise ValueError("duplicate key")  # the YAML reader then says which, and where
    return mapping


def parse_documents(text: str, source: str) -> list[Any]:
    """Return every YAML document in ``text`` (None for empty ones); SpecError on bad syntax.

    A JSON object (``gpuvisor get … -o json``) is read as JSON: YAML 1.1 would read a number
    like ``1e-05`` as a string. A document whose YAML aliases expand it beyond
    ``MAX_EXPANDED_VALUES`` values is refused before it is built.
    """
    try:
        return _parse(text, source)
    except RecursionError:  # no manifest nests this deep: a deliberate bomb, or a broken file
        message = "nests deeper than a manifest can (hundreds of levels): it cannot be read"
        raise_problems([Problem(source, None, None, None, "", message)])
        raise  # unreachable: a problem was raised


def _parse(text: str, source: str) -> list[Any]:
    if text.lstrip().startswith("{"):
        try:
            return [json.loads(text, object_pairs_hook=_unique_keys)]
        except ValueError:
            pass  # YAML written in flow style, or JSON with a mistake: the YAML reader says where
    documents: list[Any] = []
    try:
        for document in yaml.load_all(text, Loader=_StrictLoader):
            documents.append(document)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "unreadable document"
        if exc.context and exc.problem and exc.context_mark and exc.problem_mark:
            problem += f" ({exc.context} at line {exc.context_mark.line + 1})"
        message = f"invalid YAML{where}: {problem}"
        raise_problems([Problem(source, None, None, None, "", message)])
    except yaml.YAMLError as exc:
        raise_problems([Problem(source, None, None, None, "", f"invalid YAML: {exc}")])
    except _AliasBomb as exc:
        message = (
            f"expands to more than {MAX_EXPANDED_VALUES} values through its YAML aliases "
            f"(*{exc.alias}): write it out, or use fewer aliases"
        )
        raise_problems([Problem(source, len(documents) + 1, None, None, "", message)])
    return documents


def _is_list(document: Any) -> bool:
    """Whether a document is a List: ``kind: List``, or ``items`` with no kind."""
    return isinstance(document, dict) and (
        document.get("kind") == LIST_KIND or ("kind" not in document and "items" in document)
    )


def _list_items(document: dict[str, Any]) -> tuple[list[Any], list[tuple[str, str]]]:
    """Return a List's items and what is wrong with the List itself, as (path, message)."""
    found = []
    version = document.get("apiVersion", API_VERSION)
    if version != API_VERSION:
        found.append(("apiVersion", f"unknown value {quoted(version)}; accepted: {API_VERSION}"))
    accepted = ", ".join(_LIST_FIELDS)
    found.extend(
        (format_path((str(field),)), f"unknown field {quoted(field)} (accepted fields: {accepted})")
        for field in document
        if field not in _LIST_FIELDS
    )
    items = document.get("items")
    if "items" not in document:
        found.append(("items", "required field is missing (the list of objects)"))
    elif items is not None and not isinstance(items, list):
        found.append(("items", f"expected a list of objects, got a {type_name(items)}"))
    return items if isinstance(items, list) else [], found


def located_objects(
    documents: list[Any], source: str, problems: list[Problem]
) -> list[tuple[int, int | None, Any]]:
    """Return (doc, item, body) for each object in ``documents``, a List's items one by one,
    in order; empty documents are left out, and what is wrong with a List goes to ``problems``.
    """
    objects: list[tuple[int, int | None, Any]] = []
    for index, document in enumerate(documents, start=1):
        if document is None:
            continue
        if not _is_list(document):
            objects.append((index, None, document))
            continue
        items, found = _list_items(document)
        problems.extend(Problem(source, index, LIST_KIND, None, *problem) for problem in found)
        objects.extend((index, position, item) for position, item in enumerate(items, start=1))
    return objects
