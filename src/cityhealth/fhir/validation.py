"""Validation of R4 resources in JSON form against the official StructureDefinitions.

Checks what the snapshots and the JSON format (https://hl7.org/fhir/R4/json.html) define:
element names (with choice types and `_name` primitive companions), JSON shapes, cardinality,
primitive formats and ranges, required bindings, extensions and contained resources. FHIRPath
invariants are not evaluated, apart from a few that need no expression engine (ele-1, ext-1
and the rules for contained resources).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cityhealth.fhir.datetimes import date_range
from cityhealth.fhir.definitions import Definitions
from cityhealth.fhir.jsonio import DecimalText
from cityhealth.fhir.validation_specs import Child, Coded, Kind, Node, Primitive, SpecCompiler

#: Stands for a property that is not in the object (None is a JSON null).
_ABSENT: Any = object()
_JSON_NAMES = {bool: "boolean", int: "number", float: "number", str: "string"}

_CALENDAR_TYPES = frozenset({"date", "dateTime", "instant"})
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


@dataclass(frozen=True)
class Issue:
    severity: str  # "error" | "warning"
    code: str  # OperationOutcome issue type
    diagnostics: str
    expression: str  # FHIRPath-style location, e.g. "Patient.name[0].given[1]"


class _Issues(list[Issue]):
    def error(self, code: str, expression: str, diagnostics: str) -> None:
        self.append(Issue("error", code, diagnostics, expression))


def _json_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _local_references(value: Any) -> Iterator[str]:
    """Every string in `value` that starts with '#' (a local reference)."""
    if type(value) is dict:
        for item in value.values():
            yield from _local_references(item)
    elif type(value) is list:
        for item in value:
            yield from _local_references(item)
    elif type(value) is str and value[:1] == "#":
        yield value


class Validator:
    """Validates resources; compiles the specs of each type on first use and keeps them."""

    def __init__(self, definitions: Definitions) -> None:
        self._resource_types = definitions.resource_types
        self._specs = SpecCompiler(definitions)

    def validate(self, resource: Any, expected_type: str | None = None) -> list[Issue]:
        """All problems found in `resource`; an empty list means it is valid."""
        issues = _Issues()
        try:
            self._resource(resource, "", expected_type, issues)
        except RecursionError:
            issues.error("too-costly", expected_type or "", "The resource is nested too deeply")
        return issues

    def _resource(self, resource: Any, path: str, expected: str | None, issues: _Issues) -> None:
        if type(resource) is not dict:
            where = path or expected or ""
            issues.error(
                "structure", where, f"A resource must be a JSON object, not {_json_name(resource)}"
            )
            return
        rtype = resource.get("resourceType")
        if type(rtype) is not str or not rtype:
            where = path or expected or ""
            issues.error("required", where, "A resource needs a string 'resourceType'")
            return
        where = path or rtype
        if rtype not in self._resource_types:
            issues.error("not-supported", where, f"Unknown resource type {_show(rtype)}")
            return
        if expected is not None and rtype != expected:
            issues.error("invalid", where, f"Expected a {expected} resource, got {rtype}")
        self._object(resource, self._specs.type_node(rtype), where, issues)
        contained = resource.get("contained")
        if type(contained) is list and contained:
            self._contained_referenced(resource, contained, where, issues)

    def _object(self, obj: dict[str, Any], node: Node, path: str, issues: _Issues) -> None:
        children = node.children
        for key, value in obj.items():
            child = children.get(key)
            if child is None:
                if key[:1] == "_":
                    child = children.get(key[1:])
                    if child is not None and child.kind is Kind.PRIMITIVE:
                        if key[1:] not in obj:  # otherwise checked together with the value
                            self._primitive(_ABSENT, value, child, path, issues)
                        continue
                elif (key == "resourceType" and node.resource) or key == "fhir_comments":
                    continue
                issues.error("structure", f"{path}.{key}", f"Unknown element '{key}'")
            elif child.max == 0:
                issues.error("structure", f"{path}.{key}", f"Element '{key}' is not allowed here")
            elif child.kind is Kind.PRIMITIVE:
                self._primitive(value, obj.get("_" + key, _ABSENT), child, path, issues)
            else:
                self._complex(value, child, path, issues)
        for element, keys in node.required:
            if not any(key in obj for key in keys):
                name = element.removesuffix("[x]")
                issues.error("required", f"{path}.{name}", f"Missing required element '{element}'")
        for element, variants in node.choices:
            present = [key for key, companion in variants if key in obj or companion in obj]
            if len(present) > 1:
                issues.error(
                    "structure",
                    f"{path}.{present[1]}",
                    f"Only one type of '{element}' is allowed, found {', '.join(present)}",
                )
        if node.extension_values is not None:
            self._extension_rule(obj, node.extension_values, path, issues)

    @staticmethod
    def _extension_rule(
        obj: dict[str, Any], value_keys: frozenset[str], path: str, issues: _Issues
    ) -> None:
        nested = "extension" in obj
        if nested == any(key in obj for key in value_keys):
            which = "both" if nested else "neither"
            issues.error(
                "invariant",
                path,
                f"An extension needs nested extensions or a value, it has {which} (ext-1)",
            )

    @staticmethod
    def _list(value: Any, name: str, child: Child, here: str, issues: _Issues) -> list[Any] | None:
        if type(value) is not list:
            issues.error(
                "structure", here, f"'{name}' must be a JSON array, not {_json_name(value)}"
            )
            return None
        if not value:
            issues.error("value", here, f"'{name}' must not be an empty array")
            return None
        if child.max is not None and len(value) > child.max:
            issues.error("structure", here, f"'{name}' allows at most {child.max} items")
        if len(value) < child.min:
            issues.error("required", here, f"'{name}' needs at least {child.min} items")
        return value

    def _primitive(
        self, value: Any, companion: Any, child: Child, path: str, issues: _Issues
    ) -> None:
        here = f"{path}.{child.key}"
        spec = child.primitive
        assert spec is not None
        if not child.array:
            if type(value) is list:
                issues.error(
                    "structure", here, f"'{child.key}' must be a single value, not an array"
                )
            elif value is not _ABSENT:
                self._value(value, child, spec, here, issues)
            if companion is not _ABSENT:
                self._companion(companion, spec, "_" + child.key, here, issues)
            return
        values = None if value is _ABSENT else self._list(value, child.key, child, here, issues)
        extras = (
            None
            if companion is _ABSENT
            else self._list(companion, "_" + child.key, child, here, issues)
        )
        if values is not None and extras is not None and len(values) != len(extras):
            issues.error(
                "structure", here, f"'_{child.key}' must have as many items as '{child.key}'"
            )
        for i in range(max(len(values or ()), len(extras or ()))):
            item = values[i] if values is not None and i < len(values) else None
            extra = extras[i] if extras is not None and i < len(extras) else None
            at = f"{here}[{i}]"
            if item is not None:
                self._value(item, child, spec, at, issues)
            elif extra is None:
                issues.error("value", at, f"Item {i} of '{child.key}' is null and has no extension")
            if extra is not None:
                self._companion(extra, spec, "_" + child.key, at, issues)

    @staticmethod
    def _value(value: Any, child: Child, spec: Primitive, here: str, issues: _Issues) -> None:
        kind = float if type(value) is DecimalText else type(value)
        if kind not in spec.json_types:
            expected = (
                "whole number" if spec.json_types == (int,) else _JSON_NAMES[spec.json_types[0]]
            )
            got = _show(value) if kind is float else _json_name(value)
            issues.error(
                "structure", here, f"Expected a JSON {expected} for type {spec.name}, got {got}"
            )
            return
        if kind is str:
            if not value:
                issues.error("value", here, "Empty strings are not allowed")
                return
            if _CONTROL.search(value):
                # R4 datatypes: no code points below 32 except tab, CR and LF.
                issues.error("value", here, "Control characters are not allowed in strings")
                return
            if spec.pattern is not None and spec.pattern.fullmatch(value) is None:
                issues.error("value", here, f"{_show(value)} is not a valid {spec.name}")
                return
            if spec.name in _CALENDAR_TYPES:
                try:
                    date_range(value)  # the regexes let through days such as 02-30
                except ValueError:
                    issues.error("value", here, f"{_show(value)} is not a calendar {spec.name}")
                    return
        elif kind is int and (
            (spec.pattern is not None and spec.pattern.fullmatch(str(value)) is None)
            or (spec.low is not None and value < spec.low)
            or (spec.high is not None and value > spec.high)
        ):
            issues.error("value", here, f"{value} is out of range for {spec.name}")
            return
        if child.coded is Coded.CODE and value not in child.codes:
            issues.error(
                "code-invalid",
                here,
                f"{_show(value)} is not in the required value set {child.value_set}",
            )

    def _companion(
        self, extra: Any, spec: Primitive, name: str, here: str, issues: _Issues
    ) -> None:
        if type(extra) is not dict:
            issues.error(
                "structure", here, f"'{name}' must be a JSON object, not {_json_name(extra)}"
            )
        elif not extra:
            issues.error("value", here, f"'{name}' must not be an empty object")
        else:
            self._object(extra, spec.node, here, issues)

    def _complex(self, value: Any, child: Child, path: str, issues: _Issues) -> None:
        here = f"{path}.{child.key}"
        if child.array:
            items = self._list(value, child.key, child, here, issues)
            for i, item in enumerate(items or ()):
                self._item(item, child, f"{here}[{i}]", issues)
        elif type(value) is list:
            issues.error("structure", here, f"'{child.key}' must be a single value, not an array")
        else:
            self._item(value, child, here, issues)

    def _item(self, item: Any, child: Child, here: str, issues: _Issues) -> None:
        if child.kind is Kind.RESOURCE:
            self._resource(item, here, None, issues)
            if child.contained and type(item) is dict:
                self._contained_rules(item, here, issues)
            return
        if type(item) is not dict:
            issues.error(
                "structure", here, f"'{child.key}' must be a JSON object, not {_json_name(item)}"
            )
            return
        if not item:
            issues.error("value", here, f"'{child.key}' must not be an empty object")
            return
        assert child.node is not None
        self._object(item, child.node, here, issues)
        if child.coded is not None:
            self._coded(item, child, here, issues)

    @staticmethod
    def _coded(item: dict[str, Any], child: Child, here: str, issues: _Issues) -> None:
        if child.coded is Coded.CODEABLE_CONCEPT:
            codings = item.get("coding")
            if type(codings) is list and any(
                type(c) is dict and (c.get("system"), c.get("code")) in child.pairs for c in codings
            ):
                return
            message = f"No coding from the required value set {child.value_set}"
        else:
            code = item.get("code")
            if code is None and child.coded is Coded.QUANTITY:
                return  # a quantity without a coded unit
            if (item.get("system"), code) in child.pairs:
                return
            message = f"{_show(code)} is not in the required value set {child.value_set}"
        issues.error("code-invalid", here, message)

    @staticmethod
    def _contained_referenced(
        resource: dict[str, Any], contained: list[Any], path: str, issues: _Issues
    ) -> None:
        """dom-3: each contained resource is referenced from the resource, or refers to it.

        Any string "#id" in the resource counts as a reference (a superset of the
        reference, canonical and uri values the invariant names), so no valid resource fails.
        """
        local = set(_local_references(resource))
        for i, item in enumerate(contained):
            if type(item) is not dict or type(item.get("id")) is not str:
                continue  # reported by the other contained rules
            if "#" + item["id"] not in local and "#" not in set(_local_references(item)):
                issues.error(
                    "invariant",
                    f"{path}.contained[{i}]",
                    f"Contained resource '{item['id']}' is not referenced from the resource "
                    "and does not refer to it (dom-3)",
                )

    @staticmethod
    def _contained_rules(item: dict[str, Any], here: str, issues: _Issues) -> None:
        if "id" not in item:
            issues.error("required", here, "A contained resource needs an id to be referenced")
        if "contained" in item:
            issues.error(
                "invariant",
                f"{here}.contained",
                "A contained resource cannot contain resources itself (dom-2)",
            )
        meta = item.get("meta")
        if type(meta) is dict:
            for key, rule in (
                ("versionId", "dom-4"),
                ("lastUpdated", "dom-4"),
                ("security", "dom-5"),
            ):
                if key in meta:
                    issues.error(
                        "invariant",
                        f"{here}.meta.{key}",
                        f"A contained resource cannot have meta.{key} ({rule})",
                    )
