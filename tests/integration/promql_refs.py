"""The metric names and label names a PromQL expression refers to (enough of PromQL for the
dashboard's and the alerts' expressions: selectors, functions, aggregations with by/without,
vector matching with on/ignoring/group_*, ranges, numbers and comparison operators)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["References", "references"]

_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"} | _GROUPING
_TOKEN = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*|\{[^}]*\}|\(|\)|,|[^\sA-Za-z_:(){},]+")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")


@dataclass
class References:
    """``selectors``: metric name -> label names matched in its selectors; ``grouping``: label
    names in by/without/on/ignoring/group_* clauses."""

    selectors: dict[str, set[str]] = field(default_factory=dict)
    grouping: set[str] = field(default_factory=set)


def references(expr: str) -> References:
    """Return what ``expr`` refers to; raise ValueError for a selector with no metric name."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors and subqueries' ranges
    tokens = _TOKEN.findall(text)
    out = References()
    i = 0
    while i < len(tokens):
        token = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else ""
        if token.startswith("{"):
            raise ValueError(f"selector without a metric name in {expr!r}")
        if re.fullmatch(r"[A-Za-z_:][A-Za-z0-9_:]*", token):
            if token in _GROUPING and following == "(":
                end = tokens.index(")", i)
                out.grouping |= {t for t in tokens[i + 2 : end] if t != ","}
                i = end + 1
                continue
            if following == "(" or following in ("by", "without") or token in _KEYWORDS:
                i += 1  # a function, an aggregation ("sum by (...) (...)") or a keyword
                continue
            labels = out.selectors.setdefault(token, set())
            if following.startswith("{"):
                labels |= set(_MATCHER.findall(following))
                i += 1
        i += 1
    return out
