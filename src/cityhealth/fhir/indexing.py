"""Search-index extraction: a resource in, the rows of the search-index tables out.

Every R4 search parameter of type token, string, date, number, quantity, reference and uri
is compiled once per resource type (`index_paths`) into typed path walkers joined with the
valuer of their data type (`index_values`). Walkers are grouped by the top-level key they
start from, so indexing a resource touches only the parameters whose data is present.
Expressions the compiler does not support are evaluated with the FHIRPath engine, their
results typed by shape.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from cityhealth.fhir import fhirpath
from cityhealth.fhir.composites import Composite, composite_for, composite_rows
from cityhealth.fhir.definitions import Definitions, SearchParam
from cityhealth.fhir.index_paths import (
    Branch,
    ExistsNotFalse,
    Op,
    PathCompiler,
    UnsupportedExpression,
)
from cityhealth.fhir.index_strings import STRING_FACTORIES
from cityhealth.fhir.index_values import FACTORIES, IndexRows, Target, Valuer, ValuerFactory

__all__ = ["IndexRows", "Indexer"]

log = logging.getLogger(__name__)

INDEXED_TYPES = frozenset({"token", "string", "date", "number", "quantity", "reference", "uri"})
#: Parameters with their own columns or machinery elsewhere in the engine.
NOT_INDEXED = frozenset(
    {"_id", "_lastUpdated", "_text", "_content", "_query", "_filter", "_list", "_has", "_type"}
)

_FACTORIES: dict[str, dict[str, ValuerFactory]] = {**FACTORIES, "string": STRING_FACTORIES}

#: Called with the value of the emitter's top-level key.
KeyEmitter = Callable[[Any, IndexRows], None]
#: Called with the whole resource.
ResourceEmitter = Callable[[dict[str, Any], IndexRows], None]


@dataclass
class _Plan:
    by_key: dict[str, list[KeyEmitter]] = field(default_factory=dict)
    always: list[ResourceEmitter] = field(default_factory=list)


class Indexer:
    """Extracts the search-index rows of resources; compiles every parameter at construction."""

    def __init__(self, definitions: Definitions) -> None:
        self._resource_types = definitions.resource_types
        compiler = PathCompiler(definitions)
        #: Number of (resource type, parameter) expressions compiled to path walkers.
        self.compiled = 0
        #: (resource type, parameter code, expression) evaluated with FHIRPath instead.
        self.fallbacks: list[tuple[str, str, str]] = []
        self._plans: dict[str, _Plan] = {}
        self._composites: dict[str, list[Composite]] = {}
        for resource_type in sorted(definitions.resource_types):
            plan = _Plan()
            self._composites[resource_type] = [
                c
                for p in definitions.params_for(resource_type).values()
                if (c := composite_for(definitions, p)) is not None
            ]
            for param in definitions.params_for(resource_type).values():
                if param.type in INDEXED_TYPES and param.code not in NOT_INDEXED:
                    expression = _expression_of(param, definitions)
                    if expression:
                        self._add(plan, compiler, param, expression)
            self._plans[resource_type] = plan

    def index(self, resource: dict[str, Any]) -> IndexRows:
        """The deduplicated index rows of a parsed resource (no rows for an unknown type)."""
        rows = IndexRows()
        plan = self._plans.get(resource.get("resourceType", ""))
        if plan is None:
            return rows
        by_key = plan.by_key
        for key, value in resource.items():
            emitters = by_key.get(key)
            if emitters is not None:
                for emit in emitters:
                    emit(value, rows)
        for emit_all in plan.always:
            emit_all(resource, rows)
        for composite in self._composites[resource["resourceType"]]:
            rows.composite.extend(composite_rows(composite, resource))
        _dedupe(rows)
        return rows

    def _add(
        self, plan: _Plan, compiler: PathCompiler, param: SearchParam, expression: str
    ) -> None:
        try:
            compiled = compiler.compile(expression, param.resource_type)
        except UnsupportedExpression:
            self.fallbacks.append((param.resource_type, param.code, expression))
            plan.always.append(self._fallback_emitter(param, expression))
            return
        self.compiled += 1
        if isinstance(compiled, ExistsNotFalse):
            plan.always.append(_exists_not_false_emitter(param.code, compiled.branches))
            return
        name_part = next(
            (part for part in ("family", "given") if expression.endswith(f".name.{part}")), None
        )
        for branch in compiled:
            target = Target(
                param.code, branch.binding_system, branch.targets, self._resource_types, name_part
            )
            valuer = _make_valuer(param.type, branch.type_code, target)
            if valuer is not None:
                plan.by_key.setdefault(branch.key, []).append(_key_emitter(branch.ops, valuer))

    def _fallback_emitter(self, param: SearchParam, expression: str) -> ResourceEmitter:
        valuers: dict[str, Valuer | None] = {}
        target = Target(param.code, resource_types=self._resource_types)

        def emit(resource: dict[str, Any], rows: IndexRows) -> None:
            try:
                values = fhirpath.evaluate(resource, expression)
            except Exception:
                # A third-party evaluator must not fail a write; the parameter stays unindexed.
                log.warning("FHIRPath failed for %s.%s", param.resource_type, param.code)
                return
            for value in values:
                type_code = _type_by_shape(value, param.type)
                if type_code is None:
                    continue
                if type_code not in valuers:
                    valuers[type_code] = _make_valuer(param.type, type_code, target)
                valuer = valuers[type_code]
                if valuer is not None:
                    valuer(value, rows)

        return emit


def _make_valuer(param_type: str, type_code: str, target: Target) -> Valuer | None:
    """The valuer for nodes of `type_code` in a parameter of `param_type` (None: not indexed)."""
    factory = _FACTORIES.get(param_type, {}).get(type_code)
    return factory(target) if factory is not None else None


def _expression_of(param: SearchParam, definitions: Definitions) -> str | None:
    if param.expression:
        return param.expression
    # A few official expressions omit the type name ("name | alias"); they apply to their
    # single base as they stand.
    source = definitions.params_by_url.get(param.url, {})
    if source.get("base") == [param.resource_type]:
        expression: str | None = source.get("expression")
        return expression
    return None


def _walk(value: Any, ops: tuple[Op, ...]) -> list[Any]:
    nodes = value if type(value) is list else [value]
    for op in ops:
        nodes = op(nodes)
        if not nodes:
            break
    return nodes


def _key_emitter(ops: tuple[Op, ...], valuer: Valuer) -> KeyEmitter:
    if not ops:

        def emit_direct(value: Any, rows: IndexRows) -> None:
            if type(value) is list:
                for node in value:
                    valuer(node, rows)
            else:
                valuer(value, rows)

        return emit_direct

    def emit(value: Any, rows: IndexRows) -> None:
        for node in _walk(value, ops):
            valuer(node, rows)

    return emit


def _exists_not_false_emitter(code: str, branches: tuple[Branch, ...]) -> ResourceEmitter:
    """`X.exists() and X != false` as a token: 'true' when X is present and not false."""

    def emit(resource: dict[str, Any], rows: IndexRows) -> None:
        present = False
        for branch in branches:
            value = resource.get(branch.key)
            if value is None:
                continue
            for node in _walk(value, branch.ops):
                if node is False:
                    rows.token.append((code, None, "false", None))
                    return
                present = True
        rows.token.append((code, None, "true" if present else "false", None))

    return emit


_CONTACT_SYSTEMS = frozenset({"phone", "fax", "email", "pager", "url", "sms", "other"})
_ADDRESS_KEYS = ("line", "city", "district", "state", "postalCode", "country")
_STRING_TYPES = {"date": "dateTime", "reference": "uri", "uri": "uri"}


def _type_by_shape(value: Any, param_type: str) -> str | None:
    """The data type of an untyped FHIRPath result, judged by its JSON shape."""
    kind = type(value)
    if kind is bool:
        return "boolean"
    if isinstance(value, int | float):
        return "decimal"
    if kind is str:
        return _STRING_TYPES.get(param_type, "string")
    if kind is not dict:
        return None
    if "resourceType" in value:
        return "Resource"
    if "reference" in value or (param_type == "reference" and "identifier" in value):
        return "Reference"
    if "coding" in value:
        return "CodeableConcept"
    if "start" in value or "end" in value:
        return "Period"
    if "low" in value or "high" in value:
        return "Range"
    if "currency" in value:
        return "Money"
    if "event" in value or "repeat" in value:
        return "Timing"
    if "family" in value or "given" in value:
        return "HumanName"
    if any(key in value for key in _ADDRESS_KEYS):
        return "Address"
    if "value" in value:
        if isinstance(value["value"], int | float) and type(value["value"]) is not bool:
            return "Quantity"
        return "ContactPoint" if value.get("system") in _CONTACT_SYSTEMS else "Identifier"
    if "code" in value or "system" in value:
        return "Coding"
    return "CodeableConcept" if "text" in value else None


_ROW_KINDS = tuple(f.name for f in fields(IndexRows))


def _dedupe(rows: IndexRows) -> None:
    for kind in _ROW_KINDS:
        values = getattr(rows, kind)
        if len(values) > 1:
            setattr(rows, kind, list(dict.fromkeys(values)))
