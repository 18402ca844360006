"""The two patch formats of the FHIR patch interaction, applied to FHIR JSON resources.

JSON Patch (RFC 6902) is delegated to `jsonpatch`. FHIRPath Patch (a Parameters resource,
https://hl7.org/fhir/R4/fhirpatch.html) needs the *locations* its paths select, not just
their values, so paths are walked here over the JSON with the StructureDefinitions at hand:
they say which names are choice elements (`value` → `valueQuantity`) and which repeat.
Supported paths: dotted names, `[n]`, `first()`, `last()` and `where(…)` (evaluated with
FHIRPath on each candidate). Extensions of primitive values are not addressed.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from functools import cache
from typing import Any

import jsonpatch
import jsonpointer

from cityhealth.fhir.definitions import get_definitions
from cityhealth.fhir.fhirpath import evaluate


class PatchError(Exception):
    """A patch that is malformed or cannot be applied to the resource."""

    def __init__(self, message: str, expression: str | None = None) -> None:
        super().__init__(message)
        #: The path (JSON Pointer or FHIRPath) of the operation that failed, if known.
        self.expression = expression


def apply_json_patch(resource: dict[str, Any], operations: Any) -> dict[str, Any]:
    """Apply an RFC 6902 JSON Patch; returns a new resource, the input is left untouched."""
    if not isinstance(operations, list):
        raise PatchError("A JSON Patch document must be an array of operations")
    result = copy.deepcopy(resource)
    for operation in operations:
        # One operation at a time, so an error names the path that failed.
        path = operation.get("path") if isinstance(operation, dict) else None
        try:
            result = jsonpatch.JsonPatch([operation]).apply(result, in_place=True)
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as error:
            op = operation.get("op") if isinstance(operation, dict) else operation
            raise PatchError(
                f"JSON Patch operation {op!r} at {path!r} failed: {error}", path
            ) from error
    if not isinstance(result, dict):
        raise PatchError("A JSON Patch must leave a resource (a JSON object)")
    return result


# --- element definitions -------------------------------------------------------------------

_FHIR_TYPE_EXT = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"
#: Where an element's children are defined: (StructureDefinition type, element path).
_Context = tuple[str, str]


@dataclass(frozen=True)
class _Element:
    is_array: bool
    #: For a choice element (`value[x]` named `value`): the JSON name prefix.
    choice: bool = False
    #: For a typed name of a choice (`valueQuantity`): the choice name (`value`).
    choice_of: str | None = None
    children: _Context | None = None


def _type_code(type_: dict[str, Any]) -> str:
    code: str = type_["code"]
    if code.startswith("http://hl7.org/fhirpath/System."):
        for ext in type_.get("extension", ()):
            if ext["url"] == _FHIR_TYPE_EXT:
                return str(ext["valueUrl"])
    return code


def _children_of_type(code: str) -> _Context | None:
    structure = get_definitions().structures.get(code)
    if structure is None or structure["kind"] in ("primitive-type", "resource"):
        return None  # primitives have no children here; a resource says its own type
    return (code, code)


@cache
def _elements(structure: str, path: str) -> dict[str, _Element]:
    """The child elements of `path` in `structure`, by FHIRPath and by JSON name."""
    definition = get_definitions().structures.get(structure)
    if definition is None:
        return {}
    snapshot = definition["snapshot"]["element"]
    prefix = path + "."
    result: dict[str, _Element] = {}
    for element in snapshot:
        full: str = element["path"]
        name = full[len(prefix) :]
        if not full.startswith(prefix) or "." in name:
            continue
        is_array = element["max"] != "1"
        codes = [_type_code(t) for t in element.get("type", ())]
        if name.endswith("[x]"):
            base = name[:-3]
            result[base] = _Element(is_array=False, choice=True)
            for code in codes:
                typed = _Element(False, choice_of=base, children=_children_of_type(code))
                result[base + code[0].upper() + code[1:]] = typed
        elif "contentReference" in element:
            reference = (structure, element["contentReference"][1:])
            result[name] = _Element(is_array, children=reference)
        elif any(e["path"].startswith(full + ".") for e in snapshot):
            result[name] = _Element(is_array, children=(structure, full))
        else:
            result[name] = _Element(is_array, children=_children_of_type(codes[0]))
    return result


def _elements_in(context: _Context | None) -> dict[str, _Element]:
    return _elements(*context) if context else {}


def _child(context: _Context | None, name: str, expression: str) -> _Element:
    element = _elements_in(context).get(name)
    if element is None:
        where = context[1] if context else "this element"
        raise PatchError(f"{where} has no element {name!r}", expression)
    return element


# --- locating elements ---------------------------------------------------------------------


@dataclass
class _Location:
    value: Any
    parent: _Location | None = None  # None: the resource itself
    key: str = ""
    index: int | None = None  # position in the parent's array, if the element repeats
    element: _Element | None = None

    @property
    def container(self) -> dict[str, Any]:
        assert self.parent is not None
        container: dict[str, Any] = self.parent.value
        return container

    def context(self) -> _Context | None:
        if isinstance(self.value, dict) and "resourceType" in self.value:
            return (self.value["resourceType"], self.value["resourceType"])
        return self.element.children if self.element else None


_SEGMENT = re.compile(
    r"(?:(?P<function>where|first|last)\((?P<argument>.*)\)|(?P<name>[A-Za-z][A-Za-z0-9_]*))"
    r"(?:\[(?P<index>\d+)\])?",
    re.DOTALL,
)


def _segments(path: str) -> list[str]:
    """Split a path on the dots that are outside parentheses, brackets and strings."""
    parts, depth, quoted, start = [], 0, False, 0
    for i, char in enumerate(path):
        if char == "'" and (i == 0 or path[i - 1] != "\\"):
            quoted = not quoted
        elif quoted:
            continue
        elif char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        elif char == "." and depth == 0:
            parts.append(path[start:i].strip())
            start = i + 1
    parts.append(path[start:].strip())
    return parts


def _step(locations: list[_Location], name: str, path: str) -> list[_Location]:
    found = []
    for location in locations:
        if not isinstance(location.value, dict):
            raise PatchError(f"{name!r} cannot be selected inside a primitive value", path)
        elements = _elements_in(location.context())
        element = _child(location.context(), name, path)
        if element.choice:
            keys = [k for k in location.value if k in elements and elements[k].choice_of == name]
        else:
            keys = [name] if name in location.value else []
        for key in keys:
            typed = elements[key]
            value = location.value[key]
            if isinstance(value, list):
                found += [
                    _Location(item, location, key, i, typed)
                    for i, item in enumerate(value)
                    if item is not None
                ]
            else:
                found.append(_Location(value, location, key, None, typed))
    return found


def _select(resource: dict[str, Any], path: str) -> list[_Location]:
    """The elements a FHIRPath Patch path selects, as locations in `resource`."""
    first, *rest = _segments(path)
    if first != resource.get("resourceType"):
        return []
    locations = [_Location(resource)]
    for segment in rest:
        match = _SEGMENT.fullmatch(segment)
        if match is None:
            raise PatchError(f"Unsupported path segment {segment!r}", path)
        function = match["function"]
        if function == "where":
            locations = [loc for loc in locations if _holds(resource, loc, match["argument"], path)]
        elif function in ("first", "last"):
            locations = locations[:1] if function == "first" else locations[-1:]
        else:
            locations = _step(locations, match["name"], path)
        if match["index"] is not None:
            index = int(match["index"])
            locations = locations[index : index + 1]
    return locations


def _holds(resource: dict[str, Any], location: _Location, criteria: str, path: str) -> bool:
    variables = {"resource": resource, "rootResource": resource}
    try:
        return evaluate(location.value, criteria, variables) == [True]
    except Exception as error:  # the library signals syntax and type errors as bare Exception
        raise PatchError(f"Cannot evaluate where({criteria}): {error}", path) from error


def _one(resource: dict[str, Any], path: str, operation: str) -> _Location:
    locations = _select(resource, path)
    if not locations:
        raise PatchError(f"No content found at {path} when {operation}", path)
    if len(locations) > 1:
        raise PatchError(f"{path} matches {len(locations)} elements; {operation} needs one", path)
    return locations[0]


def _list_at(resource: dict[str, Any], path: str, operation: str) -> tuple[_Location, list[Any]]:
    """The repeating element a path selects (all its items, in one parent)."""
    locations = _select(resource, path)
    if not locations:
        raise PatchError(f"No content found at {path} when {operation}", path)
    first = locations[0]
    if first.index is None or any(
        loc.parent is not first.parent or loc.key != first.key for loc in locations
    ):
        raise PatchError(f"{path} is not a single list; {operation} needs one", path)
    items: list[Any] = first.container[first.key]
    return first, items


# --- values --------------------------------------------------------------------------------


def _typed_value(part: dict[str, Any], children: _Context | None, path: str) -> tuple[str, Any]:
    """A `value` part as (type suffix of its value[x] name or "", JSON value)."""
    for key, value in part.items():
        if key.startswith("value") and len(key) > len("value"):
            return key[len("value") :], value
    if "resource" in part:
        return "", part["resource"]
    if "part" in part:
        return "", _from_parts(part["part"], children, path)
    raise PatchError("The operation has no value", path)


def _from_parts(parts: list[dict[str, Any]], context: _Context | None, path: str) -> Any:
    """A complex value given as named parts (for types with no value[x] name)."""
    result: dict[str, Any] = {}
    for part in _dicts(parts):
        name = part.get("name")
        if not isinstance(name, str):
            raise PatchError("Every part of a value needs a name", path)
        element = _child(context, name, path)
        key, value = _json_entry(part, name, element, path)
        if element.is_array:
            result.setdefault(key, []).append(value)
        else:
            result[key] = value
    return result


def _json_entry(part: dict[str, Any], name: str, element: _Element, path: str) -> tuple[str, Any]:
    """The JSON name and value for `part` given to element `name`."""
    suffix, value = _typed_value(part, element.children, path)
    if not element.choice:
        return name, value
    if not suffix:
        raise PatchError(f"A value for the choice element {name!r} needs a type", path)
    return name + suffix, value


# --- operations ----------------------------------------------------------------------------


def _remove(location: _Location) -> None:
    """Take an element out of its parent, with its `_name` companion (primitive extensions)."""
    container, key = location.container, location.key
    if location.index is None:
        del container[key]
        container.pop("_" + key, None)
        return
    del container[key][location.index]
    companions = container.get("_" + key)
    if isinstance(companions, list) and location.index < len(companions):
        del companions[location.index]
    if not container[key]:
        del container[key]
        container.pop("_" + key, None)


def _add(resource: dict[str, Any], op: dict[str, Any], path: str) -> None:
    target = _one(resource, path, "adding")
    name = _text(op, "name", path)
    element = _child(target.context(), name, path)
    key, value = _json_entry(op["value"], name, element, path)
    node = target.value
    if element.is_array:
        node.setdefault(key, []).append(value)
        return
    elements = _elements_in(target.context())
    present = [k for k in node if k == key or (k in elements and elements[k].choice_of == name)]
    if present:
        raise PatchError(f"{path} already has {present[0]!r}; use replace", path)
    node[key] = value


def _insert(resource: dict[str, Any], op: dict[str, Any], path: str) -> None:
    first, items = _list_at(resource, path, "inserting")
    index = _index(op, "index", len(items), path)
    _, value = _typed_value(op["value"], first.element.children if first.element else None, path)
    items.insert(index, value)
    companions = first.container.get("_" + first.key)
    if isinstance(companions, list):
        companions.insert(index, None)


def _delete(resource: dict[str, Any], op: dict[str, Any], path: str) -> None:
    locations = _select(resource, path)
    if not locations:
        return  # deleting what is not there is not an error (FHIR Patch)
    if len(locations) > 1:
        raise PatchError(f"{path} matches {len(locations)} elements; delete removes one", path)
    location = locations[0]
    if location.parent is None:
        raise PatchError("A patch cannot delete the resource itself", path)
    _remove(location)
    # Elements the deletion left empty go too: FHIR JSON has no empty objects.
    parent = location.parent
    while parent.parent is not None and parent.value == {}:
        _remove(parent)
        parent = parent.parent


def _replace(resource: dict[str, Any], op: dict[str, Any], path: str) -> None:
    location = _one(resource, path, "replacing")
    if location.parent is None or location.element is None:
        raise PatchError("A patch cannot replace the resource itself", path)
    suffix, value = _typed_value(op["value"], location.element.children, path)
    container = location.container
    key, choice = location.key, location.element.choice_of
    if choice is not None:
        if not suffix:
            raise PatchError(f"A value for the choice element {choice!r} needs a type", path)
        # A choice element changes its JSON name with its type (valueString → valueQuantity).
        key = choice + suffix
        if key != location.key:
            del container[location.key]
            container.pop("_" + location.key, None)
    if location.index is None:
        container[key] = value
    else:
        container[key][location.index] = value


def _move(resource: dict[str, Any], op: dict[str, Any], path: str) -> None:
    first, items = _list_at(resource, path, "moving")
    source = _index(op, "source", len(items) - 1, path)
    destination = _index(op, "destination", len(items) - 1, path)
    items.insert(destination, items.pop(source))
    companions = first.container.get("_" + first.key)
    if isinstance(companions, list) and len(companions) == len(items):
        companions.insert(destination, companions.pop(source))


def _required(op: dict[str, Any], name: str, path: str | None) -> Any:
    part = op.get(name)
    if part is None:
        raise PatchError(f"The operation has no {name!r}", path)
    return _typed_value(part, None, path or "")[1]


def _text(op: dict[str, Any], name: str, path: str | None) -> str:
    value = _required(op, name, path)
    if not isinstance(value, str) or not value:
        raise PatchError(f"The operation's {name!r} must be a non-empty string", path)
    return value


def _index(op: dict[str, Any], name: str, highest: int, path: str) -> int:
    index = _required(op, name, path)
    if type(index) is not int or not 0 <= index <= highest:
        raise PatchError(f"{name} {index!r} is outside 0..{highest}", path)
    return index


def _operations(parameters: dict[str, Any]) -> list[dict[str, Any]]:
    """The operations of a FHIRPath Patch, each as {part name: part}."""
    if not isinstance(parameters, dict) or parameters.get("resourceType") != "Parameters":
        raise PatchError("A FHIRPath Patch must be a Parameters resource")
    operations = []
    for parameter in _dicts(parameters.get("parameter", [])):
        if parameter.get("name") != "operation":
            raise PatchError(f"Unexpected patch parameter {parameter.get('name')!r}")
        operations.append(
            {str(part.get("name")): part for part in _dicts(parameter.get("part", []))}
        )
    return operations


def _dicts(items: Any) -> list[dict[str, Any]]:
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise PatchError("Malformed FHIRPath Patch: parameters and parts must be JSON objects")
    return items


_HANDLERS = {"add": _add, "insert": _insert, "delete": _delete, "replace": _replace, "move": _move}


def apply_fhir_patch(resource: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
    """Apply a FHIRPath Patch; returns a new resource, the input is left untouched."""
    result = copy.deepcopy(resource)
    for op in _operations(parameters):
        kind = _text(op, "type", None)
        path = _text(op, "path", None)
        if kind in ("add", "insert", "replace") and "value" not in op:
            raise PatchError(f"A {kind} operation needs a value", path)
        handler = _HANDLERS.get(kind)
        if handler is None:
            raise PatchError(f"Unknown FHIRPath Patch operation type {kind!r}", path)
        handler(result, op, path)
    return result
