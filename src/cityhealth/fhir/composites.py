"""Composite search parameters (search.html#composite): a token and a second value that must
both match on the same element, e.g. `Observation?component-code-value-quantity=
http://loinc.org|8480-6$gt100`.

Every R4 composite the engine supports pairs a token with a token, quantity, date or string.
Their expressions are short paths (`Observation.component`, then `code` and
`value.as(Quantity)`), walked here directly; each element yields one `idx_composite` row per
(token, value) pair. Composites of another shape (MolecularSequence coordinates,
DocumentReference relationship) are refused as unsupported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from itertools import product
from typing import Any

from cityhealth.fhir.chinese import fold
from cityhealth.fhir.datetimes import MAX_US, MIN_US, date_range
from cityhealth.fhir.definitions import Definitions, SearchParam
from cityhealth.fhir.numbers import number_range

SECOND_TYPES = frozenset({"token", "quantity", "date", "string"})
_AS = re.compile(r"^(\w+)(?:\.as\((\w+)\))?$")

#: (param, system, code, v_system, v_code, v_value, v_low, v_high, v_date_low, v_date_high, v_text)
CompositeRow = tuple[
    str,
    str | None,
    str | None,
    str | None,
    str | None,
    float | None,
    float | None,
    float | None,
    int | None,
    int | None,
    str | None,
]


@dataclass(frozen=True)
class Composite:
    code: str
    base: tuple[tuple[str, ...], ...]  # paths below the resource ("component",) or () itself
    first: tuple[tuple[str, str | None], ...]  # (element, type) alternatives of the token
    second: tuple[tuple[str, str | None], ...]
    second_type: str


def _paths(expression: str, rtype: str) -> tuple[tuple[str, ...], ...] | None:
    out = []
    for part in expression.split("|"):
        steps = part.strip().split(".")
        if steps[0] != rtype or not all(s.isidentifier() for s in steps[1:]):
            return None
        out.append(tuple(steps[1:]))
    return tuple(out)


def _alternatives(expression: str) -> tuple[tuple[str, str | None], ...] | None:
    out = []
    for part in expression.split("|"):
        match = _AS.match(part.strip())
        if match is None:
            return None
        out.append((match.group(1), match.group(2)))
    return tuple(out)


@lru_cache(maxsize=4096)
def composite_for(definitions: Definitions, param: SearchParam) -> Composite | None:
    """The walkable form of a composite parameter, or None when the engine does not support it."""
    if param.type != "composite" or not param.expression or len(param.components) != 2:
        return None
    types = [definitions.params_by_url.get(url, {}).get("type") for url, _ in param.components]
    if types[0] != "token" or types[1] not in SECOND_TYPES:
        return None
    base = _paths(param.expression, param.resource_type)
    first = _alternatives(param.components[0][1])
    second = _alternatives(param.components[1][1])
    if base is None or first is None or second is None:
        return None
    return Composite(param.code, base, first, second, str(types[1]))


def _walk(node: Any, path: tuple[str, ...]) -> list[Any]:
    nodes = [node]
    for step in path:
        found = []
        for n in nodes:
            value = n.get(step) if isinstance(n, dict) else None
            found.extend(value if isinstance(value, list) else [] if value is None else [value])
        nodes = found
    return nodes


def _pick(node: dict[str, Any], name: str, as_type: str | None) -> list[Any]:
    if as_type is None:
        if name in node:
            value = node[name]
            return value if isinstance(value, list) else [value]
        # a choice element without a type: whichever value[x] is present
        return [
            v
            for k, v in node.items()
            if k.startswith(name) and k[len(name) : len(name) + 1].isupper()
        ]
    key = name + as_type[0].upper() + as_type[1:]
    value = node.get(key)
    return [] if value is None else value if isinstance(value, list) else [value]


def _tokens(value: Any) -> list[tuple[str | None, str | None]]:
    if isinstance(value, bool):
        return [(None, "true" if value else "false")]
    if isinstance(value, str):
        return [(None, value)]
    if not isinstance(value, dict):
        return []
    if "coding" in value:
        return [(c.get("system"), c.get("code")) for c in value["coding"] if isinstance(c, dict)]
    if "code" in value or "system" in value:
        return [(value.get("system"), value.get("code"))]
    return []


def _second(value: Any, kind: str) -> list[tuple[Any, ...]]:
    """(v_system, v_code, v_value, v_low, v_high, v_date_low, v_date_high, v_text) tuples."""
    empty = (None,) * 8
    if kind == "token":
        return [(s, c, *empty[2:]) for s, c in _tokens(value)]
    if kind == "string":
        return [(*empty[:7], fold(value)[:256])] if isinstance(value, str) else []
    if kind == "date":
        try:
            if isinstance(value, str):
                low, high = date_range(value)
            elif isinstance(value, dict):
                low = date_range(value["start"])[0] if "start" in value else MIN_US
                high = date_range(value["end"])[1] if "end" in value else MAX_US
            else:
                return []
        except ValueError:
            return []
        return [(*empty[:5], low, high, None)]
    if not isinstance(value, dict):
        return []
    if "low" in value or "high" in value:  # Range
        low, high = value.get("low", {}), value.get("high", {})
        if "value" not in low and "value" not in high:
            return []
        unit = low if "value" in low else high
        lo = float(low["value"]) if "value" in low else float("-inf")
        hi = float(high["value"]) if "value" in high else float("inf")
        number = lo if "value" in low else hi
        return [
            (unit.get("system"), unit.get("code"), number, lo, hi, None, None, unit.get("unit"))
        ]
    if "value" not in value or isinstance(value["value"], bool):
        return []
    try:
        number, lo, hi = number_range(value["value"])
    except ValueError:
        return []
    code = value.get("code", value.get("currency"))
    return [(value.get("system"), code, number, lo, hi, None, None, value.get("unit"))]


def composite_rows(composite: Composite, resource: dict[str, Any]) -> list[CompositeRow]:
    rows: list[CompositeRow] = []
    for path in composite.base:
        for node in _walk(resource, path):
            if not isinstance(node, dict):
                continue
            firsts = [
                t
                for name, kind in composite.first
                for v in _pick(node, name, kind)
                for t in _tokens(v)
            ]
            seconds = [
                s
                for name, kind in composite.second
                for v in _pick(node, name, kind)
                for s in _second(v, composite.second_type)
            ]
            rows.extend((composite.code, *f, *s) for f, s in product(firsts, seconds))
    return list(dict.fromkeys(rows))
