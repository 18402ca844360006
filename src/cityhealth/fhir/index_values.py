"""Search-index rows from FHIR values, per search-parameter type and data type (R4 search.html).

A *valuer* turns one node of a known data type into rows of one parameter; it is made once per
(parameter, data type) and called for every node a compiled path reaches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cityhealth.fhir.chinese import fold
from cityhealth.fhir.datetimes import MAX_US, MIN_US, date_range
from cityhealth.fhir.numbers import number_range

TokenRow = tuple[str, str | None, str | None, str | None]
QuantityRow = tuple[str, str | None, str | None, str | None, float, float, float]


@dataclass(slots=True)
class IndexRows:
    """The rows of one resource for each search-index table."""

    #: (param code, system, code/value, display text)
    token: list[TokenRow] = field(default_factory=list)
    #: (param code, folded value, exact raw value or None for derived forms like pinyin)
    string: list[tuple[str, str, str | None]] = field(default_factory=list)
    #: (param code, low_us, high_us), half-open [low, high)
    date: list[tuple[str, int, int]] = field(default_factory=list)
    #: (param code, value, low, high), low/high the implicit precision range
    number: list[tuple[str, float, float, float]] = field(default_factory=list)
    #: (param code, system, code, unit, value, low, high)
    quantity: list[QuantityRow] = field(default_factory=list)
    #: (param code, target type, target id, url)
    reference: list[tuple[str, str | None, str | None, str | None]] = field(default_factory=list)
    #: (param code, value)
    uri: list[tuple[str, str]] = field(default_factory=list)
    #: composite parameters: see `composites.CompositeRow`
    composite: list[tuple[Any, ...]] = field(default_factory=list)


#: Turns one node into rows.
Valuer = Callable[[Any, IndexRows], None]


@dataclass(frozen=True)
class Target:
    """What a valuer needs to know about the parameter and the element it indexes."""

    code: str
    #: Code system of a `code` element's required binding (token only).
    binding_system: str | None = None
    #: Resource types a `where(resolve() is X)` keeps (reference only; None: all).
    targets: frozenset[str] | None = None
    #: The concrete resource types, to read the type of a literal reference.
    resource_types: frozenset[str] = frozenset()
    #: "family" or "given" when the element is that part of a HumanName (surname readings).
    name_part: str | None = None


# --- token -------------------------------------------------------------------------------


def _folded(text: Any) -> str | None:
    """Token display text, folded like string values so that `:text` ignores case and width."""
    return fold(text)[:256] or None if type(text) is str else None


def _token_coding(t: Target) -> Valuer:
    code = t.code

    def valuer(node: Any, rows: IndexRows) -> None:
        if type(node) is dict:
            row = (code, node.get("system"), node.get("code"), _folded(node.get("display")))
            if row[1] or row[2] or row[3]:
                rows.token.append(row)

    return valuer


def _token_codeable_concept(t: Target) -> Valuer:
    code = t.code

    def valuer(node: Any, rows: IndexRows) -> None:
        if type(node) is not dict:
            return
        for coding in node.get("coding", ()):
            if type(coding) is dict:
                row = (
                    code,
                    coding.get("system"),
                    coding.get("code"),
                    _folded(coding.get("display")),
                )
                if row[1] or row[2] or row[3]:
                    rows.token.append(row)
        text = _folded(node.get("text"))
        if text:
            rows.token.append((code, None, None, text))

    return valuer


def _token_identifier(t: Target) -> Valuer:
    code = t.code

    def valuer(node: Any, rows: IndexRows) -> None:
        if type(node) is not dict:
            return
        kind = node.get("type")
        text = _folded(kind.get("text")) if type(kind) is dict else None
        row = (code, node.get("system"), node.get("value"), text)
        if row[1] or row[2] or text:
            rows.token.append(row)

    return valuer


def _token_contact_point(t: Target) -> Valuer:
    code = t.code

    def valuer(node: Any, rows: IndexRows) -> None:
        if type(node) is dict and node.get("value"):
            rows.token.append((code, None, node["value"], None))

    return valuer


def _token_primitive(t: Target) -> Valuer:
    code, system = t.code, t.binding_system

    def valuer(node: Any, rows: IndexRows) -> None:
        if type(node) is str and node:
            rows.token.append((code, system, node, None))

    return valuer


def _token_boolean(t: Target) -> Valuer:
    code = t.code

    def valuer(node: Any, rows: IndexRows) -> None:
        if type(node) is bool:
            rows.token.append((code, None, "true" if node else "false", None))

    return valuer


# --- date --------------------------------------------------------------------------------


def _date_primitive(t: Target) -> Valuer:
    code = t.code

    def valuer(node: Any, rows: IndexRows) -> None:
        if type(node) is str:
            try:
                low, high = date_range(node)
            except ValueError:
                return  # the validator rejects such values before they are indexed
            rows.date.append((code, low, high))

    return valuer


def _period_range(node: dict[str, Any]) -> tuple[int, int] | None:
    start, end = node.get("start"), node.get("end")
    if start is None and end is None:
        return None
    try:
        low = date_range(start)[0] if type(start) is str else MIN_US
        high = date_range(end)[1] if type(end) is str else MAX_US
    except ValueError:
        return None
    return low, high


def _date_period(t: Target) -> Valuer:
    code = t.code

    def valuer(node: Any, rows: IndexRows) -> None:
        if type(node) is dict:
            found = _period_range(node)
            if found is not None:
                rows.date.append((code, *found))

    return valuer


def _date_timing(t: Target) -> Valuer:
    code = t.code
    add_event = _date_primitive(t)

    def valuer(node: Any, rows: IndexRows) -> None:
        if type(node) is not dict:
            return
        for event in node.get("event", ()):
            add_event(event, rows)
        repeat = node.get("repeat")
        bounds = repeat.get("boundsPeriod") if type(repeat) is dict else None
        if type(bounds) is dict:
            found = _period_range(bounds)
            if found is not None:
                rows.date.append((code, *found))

    return valuer


# --- number and quantity -----------------------------------------------------------------


def _number_of(value: Any) -> tuple[float, float, float] | None:
    if isinstance(value, int | float) and type(value) is not bool:
        try:
            return number_range(value)
        except ValueError:
            return None
    return None


def _number_primitive(t: Target) -> Valuer:
    code = t.code

    def valuer(node: Any, rows: IndexRows) -> None:
        found = _number_of(node)
        if found is not None:
            rows.number.append((code, *found))

    return valuer


def _range_bounds(node: Any) -> tuple[dict[str, Any], float, float, float] | None:
    """(the bound carrying units, value, low, high) of a Range; None when it has no bound.

    An open side extends to infinity; the value is the low bound, else the high one.
    """
    if type(node) is not dict:
        return None
    low_q, high_q = node.get("low"), node.get("high")
    low = _number_of(low_q.get("value")) if type(low_q) is dict else None
    high = _number_of(high_q.get("value")) if type(high_q) is dict else None
    if low is not None:
        assert type(low_q) is dict
        return low_q, low[0], low[0], high[0] if high is not None else math.inf
    if high is not None:
        assert type(high_q) is dict
        return high_q, high[0], -math.inf, high[0]
    return None


def _number_range(t: Target) -> Valuer:
    code = t.code

    def valuer(node: Any, rows: IndexRows) -> None:
        found = _range_bounds(node)
        if found is not None:
            rows.number.append((code, *found[1:]))

    return valuer


def _quantity(t: Target) -> Valuer:
    code = t.code

    def valuer(node: Any, rows: IndexRows) -> None:
        if type(node) is dict:
            found = _number_of(node.get("value"))
            if found is not None:
                row = (code, node.get("system"), node.get("code"), node.get("unit"), *found)
                rows.quantity.append(row)

    return valuer


def _quantity_money(t: Target) -> Valuer:
    code = t.code

    def valuer(node: Any, rows: IndexRows) -> None:
        if type(node) is dict:
            found = _number_of(node.get("value"))
            if found is not None:
                rows.quantity.append((code, None, node.get("currency"), None, *found))

    return valuer


def _quantity_range(t: Target) -> Valuer:
    code = t.code

    def valuer(node: Any, rows: IndexRows) -> None:
        found = _range_bounds(node)
        if found is not None:
            bound, value, low, high = found
            unit = (bound.get("system"), bound.get("code"), bound.get("unit"))
            rows.quantity.append((code, *unit, value, low, high))

    return valuer


# --- reference and uri -------------------------------------------------------------------


def parse_reference(
    reference: str, resource_types: frozenset[str]
) -> tuple[str | None, str | None, str | None] | None:
    """(type, id, url) of a literal reference; None for a local `#id` (contained) one."""
    if reference.startswith("#"):
        return None
    parts = reference.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) == 2:
        if parts[0] in resource_types and parts[1]:
            return parts[0], parts[1], None
    elif len(parts) > 2 and "://" in reference and parts[-2] in resource_types and parts[-1]:
        return parts[-2], parts[-1], "/".join(parts)
    return None, None, reference


def _reference(t: Target) -> Valuer:
    code, targets, resource_types = t.code, t.targets, t.resource_types
    identifier_code = f"{code}:identifier"

    def valuer(node: Any, rows: IndexRows) -> None:
        if type(node) is not dict:
            return
        literal = node.get("reference")
        parsed = parse_reference(literal, resource_types) if type(literal) is str else None
        if targets is not None:
            # References of unknown type stay: resolve() cannot rule them out.
            kind = parsed[0] if parsed is not None else node.get("type")
            if type(kind) is str and kind.rpartition("/")[2] not in targets:
                return
        if parsed is not None:
            rows.reference.append((code, *parsed))
        identifier = node.get("identifier")
        if type(identifier) is dict and (identifier.get("system") or identifier.get("value")):
            rows.token.append(
                (identifier_code, identifier.get("system"), identifier.get("value"), None)
            )

    return valuer


def _reference_uri(t: Target) -> Valuer:
    code = t.code

    def valuer(node: Any, rows: IndexRows) -> None:
        if type(node) is str and node:
            rows.reference.append((code, None, None, node.partition("|")[0]))

    return valuer


def _reference_resource(t: Target) -> Valuer:
    code, targets = t.code, t.targets

    def valuer(node: Any, rows: IndexRows) -> None:
        if type(node) is dict and type(node.get("id")) is str:
            kind = node.get("resourceType")
            if type(kind) is str and (targets is None or kind in targets):
                rows.reference.append((code, kind, node["id"], None))

    return valuer


def _uri(t: Target) -> Valuer:
    code = t.code

    def valuer(node: Any, rows: IndexRows) -> None:
        if type(node) is str and node:
            rows.uri.append((code, node))
            unversioned = node.partition("|")[0]
            if unversioned != node:
                rows.uri.append((code, unversioned))

    return valuer


# --- dispatch ----------------------------------------------------------------------------

#: Primitive types carried as JSON strings.
TEXT_PRIMITIVES = ("string", "markdown", "code", "id", "uri", "url", "canonical", "oid", "uuid")
_QUANTITIES = ("Quantity", "Age", "Duration", "Count", "Distance")

ValuerFactory = Callable[[Target], Valuer]

#: Valuer factories by search-parameter type, then data type (string ones: `index_strings`).
FACTORIES: dict[str, dict[str, ValuerFactory]] = {
    "token": {
        "Coding": _token_coding,
        "CodeableConcept": _token_codeable_concept,
        "Identifier": _token_identifier,
        "ContactPoint": _token_contact_point,
        "boolean": _token_boolean,
        **dict.fromkeys(TEXT_PRIMITIVES, _token_primitive),
    },
    "date": {
        **dict.fromkeys(("date", "dateTime", "instant"), _date_primitive),
        "Period": _date_period,
        "Timing": _date_timing,
    },
    "number": {
        **dict.fromkeys(("decimal", "integer", "positiveInt", "unsignedInt"), _number_primitive),
        "Range": _number_range,
    },
    "quantity": {
        **dict.fromkeys(_QUANTITIES, _quantity),
        "Money": _quantity_money,
        "Range": _quantity_range,
    },
    "reference": {
        "Reference": _reference,
        "Resource": _reference_resource,
        **dict.fromkeys(("uri", "url", "canonical", "oid", "uuid"), _reference_uri),
    },
    "uri": dict.fromkeys(TEXT_PRIMITIVES, _uri),
}
