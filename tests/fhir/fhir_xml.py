"""FHIR XML → FHIR JSON, driven by the R4 StructureDefinitions (test support).

The official FHIRPath and FHIR Patch test cases ship their resources as XML; the platform
speaks JSON only. The definitions say which elements repeat, which are primitives of
which JSON type, which are choice elements, and where a nested resource starts.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from cityhealth.fhir.definitions import get_definitions

XHTML_NS = "http://www.w3.org/1999/xhtml"
_FHIR_TYPE_EXT = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"
_INTEGER = frozenset({"integer", "positiveInt", "unsignedInt"})


@dataclass(frozen=True)
class _Child:
    """How one XML child name maps to JSON in a given context."""

    json_name: str
    is_array: bool
    type_code: str
    #: (structure, element path) whose children describe this element's children.
    context: tuple[str, str]


def _type_code(type_: dict[str, Any]) -> str:
    code: str = type_["code"]
    if code.startswith("http://hl7.org/fhirpath/System."):
        for ext in type_.get("extension", ()):
            if ext["url"] == _FHIR_TYPE_EXT:
                return str(ext["valueUrl"])
    return code


def _is_resource_type(code: str) -> bool:
    return code == "Resource" or get_definitions().is_resource_type(code)


@cache
def _children(structure: str, path: str) -> dict[str, _Child]:
    """The XML child names allowed under `path` of `structure`, with their JSON mapping."""
    elements = get_definitions().structures[structure]["snapshot"]["element"]
    paths = {e["path"] for e in elements}
    prefix = path + "."
    result: dict[str, _Child] = {}
    for element in elements:
        full = element["path"]
        if not full.startswith(prefix) or "." in full[len(prefix) :]:
            continue
        name = full[len(prefix) :]
        is_array = element["max"] != "1"
        reference = element.get("contentReference")
        if reference:
            result[name] = _Child(name, is_array, "BackboneElement", (structure, reference[1:]))
            continue
        codes = [_type_code(t) for t in element.get("type", ())]
        if name.endswith("[x]"):
            base = name[:-3]
            for code in codes:
                choice = base + code[0].upper() + code[1:]
                result[choice] = _Child(choice, False, code, (code, code))
            continue
        code = codes[0]
        has_own_children = any(p.startswith(full + ".") for p in paths)
        context = (structure, full) if has_own_children else (code, code)
        result[name] = _Child(name, is_array, code, context)
    return result


def _is_primitive(code: str) -> bool:
    structure = get_definitions().structures.get(code)
    return structure is not None and structure["kind"] == "primitive-type"


def _primitive_value(code: str, text: str) -> Any:
    if code == "boolean":
        return text == "true"
    if code in _INTEGER:
        return int(text)
    if code == "decimal":
        return float(text) if any(c in text for c in ".eE") else int(text)
    return text


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _xhtml(element: ET.Element, outermost: bool = True) -> str:
    """Serialise narrative markup the way FHIR JSON carries it (`xmlns` on the outer `div`)."""
    attributes = [(_local(k), v) for k, v in element.attrib.items()]
    if outermost:
        attributes.insert(0, ("xmlns", XHTML_NS))
    tag = _local(element.tag)
    opening = tag + "".join(f" {k}={quoteattr(v)}" for k, v in attributes)
    inner = escape(element.text or "") + "".join(
        _xhtml(child, outermost=False) + escape(child.tail or "") for child in element
    )
    return f"<{opening}>{inner}</{tag}>" if inner else f"<{opening}/>"


def _add(target: dict[str, Any], child: _Child, value: Any, extra: dict[str, Any]) -> None:
    """Store a value (and a primitive's `_name` companion), keeping arrays aligned."""
    if value is None and not extra:
        return
    name = child.json_name
    if not child.is_array:
        if value is not None:
            target[name] = value
        if extra:
            target["_" + name] = extra
        return
    values = target.setdefault(name, [])
    companions = target.get("_" + name)
    if extra and companions is None:
        companions = target["_" + name] = [None] * len(values)
    values.append(value)
    if companions is not None:
        companions.append(extra or None)


def _complex(element: ET.Element, context: tuple[str, str]) -> dict[str, Any]:
    structure, path = context
    allowed = _children(structure, path)
    result: dict[str, Any] = {}
    for attribute, text in element.attrib.items():
        if attribute in allowed:
            result[attribute] = text
    for node in element:
        name = _local(node.tag)
        child = allowed.get(name)
        if child is None:
            raise ValueError(f"unknown element {name!r} in {path}")
        if child.type_code == "xhtml":
            _add(result, child, _xhtml(node), {})
        elif _is_resource_type(child.type_code):
            _add(result, child, resource_from_element(node[0]), {})
        elif _is_primitive(child.type_code):
            # A primitive's id and extensions go to the `_name` companion.
            value = node.get("value")
            typed = None if value is None else _primitive_value(child.type_code, value)
            _add(result, child, typed, _complex(node, ("Element", "Element")))
        else:
            _add(result, child, _complex(node, child.context), {})
    return result


def resource_from_element(element: ET.Element) -> dict[str, Any]:
    """Convert a parsed FHIR XML resource element to FHIR JSON."""
    resource_type = _local(element.tag)
    return {"resourceType": resource_type, **_complex(element, (resource_type, resource_type))}


def resource_from_xml(text: str | bytes) -> dict[str, Any]:
    """Convert a FHIR XML resource document to FHIR JSON."""
    return resource_from_element(ET.fromstring(text))


def load_resource(path: Path) -> dict[str, Any]:
    """Read a FHIR resource file, XML or JSON, as FHIR JSON."""
    if path.suffix == ".json":
        loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return loaded
    return resource_from_element(ET.parse(path).getroot())
