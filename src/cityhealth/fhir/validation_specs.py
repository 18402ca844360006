"""Element specs compiled from the StructureDefinition snapshots, once per type.

A `Node` is what one JSON object may hold (the root of a type, a backbone element or a
`contentReference` target); each of its `Child` specs says, for one JSON property name, the
cardinality, the kind of value and the type, already resolved to the spec of that type, so
validating a resource is a walk without look-ups by name.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from cityhealth.fhir.definitions import Definitions
from cityhealth.fhir.validation_terminology import ValueSetExpander

_REGEX_EXT = "http://hl7.org/fhir/StructureDefinition/regex"
_FHIR_TYPE_EXT = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"
_SYSTEM_PREFIX = "http://hl7.org/fhirpath/System."
_SD_PREFIX = "http://hl7.org/fhir/StructureDefinition/"
#: The JSON value of a primitive follows the FHIRPath type of its root primitive type.
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "Boolean": (bool,),
    "Integer": (int,),
    "Decimal": (int, float),
}
_CONTAINED_PATH = "DomainResource.contained"


class Kind(Enum):
    PRIMITIVE = "primitive"
    COMPLEX = "complex"  # a data type or an inline (backbone) element: a JSON object
    RESOURCE = "resource"  # any resource, validated as the type its resourceType names


class Coded(Enum):
    """How a required binding applies to an element of this type."""

    CODE = "code"  # the primitive value itself
    CODING = "Coding"
    CODEABLE_CONCEPT = "CodeableConcept"
    QUANTITY = "Quantity"


@dataclass(eq=False, slots=True)
class Primitive:
    name: str
    json_types: tuple[type, ...]
    pattern: re.Pattern[str] | None
    low: int | None
    high: int | None
    #: What the `_name` companion object may hold (id, extension); set right after creation
    #: because the primitive's own elements refer back to primitives.
    node: Node = field(default_factory=lambda: Node())


@dataclass(eq=False, slots=True)
class Child:
    key: str  # JSON property name, e.g. "valueQuantity"
    array: bool
    min: int
    max: int | None  # None: unbounded
    kind: Kind
    type_name: str
    node: Node | None = None  # COMPLEX: the spec of the object
    primitive: Primitive | None = None  # PRIMITIVE: the spec of the value
    coded: Coded | None = None  # set when a required binding can be checked
    value_set: str = ""
    codes: frozenset[str] = frozenset()  # Coded.CODE
    pairs: frozenset[tuple[str, str]] = frozenset()  # the other Coded kinds
    contained: bool = False  # DomainResource.contained: extra rules for contained resources


@dataclass(eq=False, slots=True)
class Node:
    children: dict[str, Child] = field(default_factory=dict)
    #: Required elements: (element name, JSON keys any of which makes it present).
    required: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    #: Choice elements: (element name, ((key, companion key) per allowed type)).
    choices: list[tuple[str, tuple[tuple[str, str], ...]]] = field(default_factory=list)
    resource: bool = False  # a resource root: `resourceType` is allowed
    #: ext-1 (an extension has either nested extensions or a value, not both): the keys of
    #: the value; None where the rule does not apply.
    extension_values: frozenset[str] | None = None


def _possessive(regex: str) -> str:
    """`regex` with every `*` and `+` made possessive.

    The R4 primitive regexes never let a repeated part overlap what follows it, so they match
    the same strings possessively, and a hostile value cannot make them backtrack
    exponentially (base64Binary's `(\\s*([0-9a-zA-Z\\+/=]){4}\\s*)+` otherwise takes
    seconds on `"AAAA " * 25 + "A"`).
    """
    out: list[str] = []
    i, in_class = 0, False
    while i < len(regex):
        ch = regex[i]
        out.append(ch)
        if ch == "\\":
            out.append(regex[i + 1 : i + 2])
            i += 2
            continue
        if in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
        elif ch in "*+":
            following = regex[i + 1 : i + 2]
            out.append(following if following in ("?", "+") else "+")
            i += 1 if following in ("?", "+") else 0
        i += 1
    return "".join(out)


def _max(text: str) -> int | None:
    return None if text == "*" else int(text)


def _extension_value(items: list[dict[str, Any]], url: str) -> Any:
    for ext in items:
        if ext.get("url") == url:
            return next((v for k, v in ext.items() if k.startswith("value")), None)
    return None


class SpecCompiler:
    """Compiles and caches the element specs of every type on first use.

    Safe to share between threads: specs are compiled under a lock and only published once
    complete, because types refer to each other and are registered before they are filled.
    """

    def __init__(self, definitions: Definitions) -> None:
        self._defs = definitions
        self._expander = ValueSetExpander(definitions)
        self._nodes: dict[str, Node] = {}  # complete, read without the lock
        self._pending: dict[str, Node] = {}  # being compiled under the lock
        self._primitives: dict[str, Primitive] = {}
        self._lock = threading.Lock()
        self._by_url = {
            sd["url"]: name for name, sd in definitions.structures.items() if "url" in sd
        }

    def type_node(self, name: str) -> Node:
        """The spec of a type's root object (for a primitive: its `_name` companion)."""
        node = self._nodes.get(name)
        if node is None:
            with self._lock:
                node = self._node(name)
                self._nodes.update(self._pending)
                self._pending.clear()
        return node

    def primitive(self, name: str) -> Primitive:
        """The spec of a primitive type's JSON value."""
        with self._lock:
            spec = self._primitive(name)
            self._nodes.update(self._pending)
            self._pending.clear()
        return spec

    def _node(self, name: str) -> Node:
        node = self._nodes.get(name) or self._pending.get(name)
        if node is None:
            node = self._pending[name] = Node()  # registered first: types refer to each other
            self._compile(name, node)
        return node

    def _primitive(self, name: str) -> Primitive:
        spec = self._primitives.get(name)
        if spec is None:
            spec = self._primitives[name] = self._compile_primitive(name)
            spec.node = self._node(name)
        return spec

    def _compile_primitive(self, name: str) -> Primitive:
        pattern: re.Pattern[str] | None = None
        low = high = None
        json_types: tuple[type, ...] = (str,)
        current: str | None = name
        while current in self._defs.structures:
            sd = self._defs.structures[current]
            value = next(e for e in sd["snapshot"]["element"] if e["path"] == f"{current}.value")
            regex = _extension_value(value["type"][0].get("extension", []), _REGEX_EXT)
            if pattern is None and regex:
                # XML-schema regexes: \s means ASCII white space only, as re.ASCII does.
                pattern = re.compile(_possessive(regex), re.ASCII)
            low = value.get("minValueInteger") if low is None else low
            high = value.get("maxValueInteger") if high is None else high
            system_type = value["type"][0]["code"].removeprefix(_SYSTEM_PREFIX)
            json_types = _JSON_TYPES.get(system_type, (str,))
            base = sd.get("baseDefinition", "").removeprefix(_SD_PREFIX)
            current = base if base != "Element" else None
        if float in json_types:
            pattern = None  # a parsed float no longer has its source text
        return Primitive(name, json_types, pattern, low, high)

    def _compile(self, name: str, root: Node) -> None:
        sd = self._defs.structures[name]
        root_path = sd["type"]
        elements = [e for e in sd["snapshot"]["element"] if ":" not in e["id"]]
        parents = {e["path"].rsplit(".", 1)[0] for e in elements if "." in e["path"]}
        nodes = {path: Node() for path in parents if path != root_path}
        nodes[root_path] = root
        root_element = elements[0]
        root.resource = sd["kind"] == "resource"
        is_primitive = sd["kind"] == "primitive-type"
        for element in elements[1:]:
            path = element["path"]
            parent, element_name = path.rsplit(".", 1)
            if is_primitive and path == f"{root_path}.value":
                continue  # the JSON value itself, checked through `primitive()`
            node = nodes[parent]
            if path in nodes:
                inline: Node | None = nodes[path]
            elif "contentReference" in element:
                inline = nodes[element["contentReference"].split("#", 1)[1]]
            else:
                inline = None
            # R4 gives Resource.id the FHIRPath type String, but a resource id is an `id`.
            id_override = "id" if root.resource and path == f"{root_path}.id" else None
            self._add_element(node, element, element_name, inline, id_override)
        if any(c.get("key") == "ext-1" for c in root_element.get("constraint", ())):
            root.extension_values = frozenset(
                key
                for name, variants in root.choices
                if name == "value[x]"
                for pair in variants
                for key in pair
            )

    def _add_element(
        self,
        node: Node,
        element: dict[str, Any],
        element_name: str,
        inline: Node | None,
        id_override: str | None,
    ) -> None:
        choice = element_name.endswith("[x]")
        base_name = element_name.removesuffix("[x]")
        keys: list[str] = []
        variants: list[tuple[str, str]] = []
        types = element.get("type") or [{"code": "BackboneElement"}]
        for type_ref in types:
            type_name = id_override or self._type_name(type_ref)
            code = type_name if id_override else self._type_name(type_ref, profiled=False)
            key = base_name + code[0].upper() + code[1:] if choice else base_name
            child = self._child(element, key, type_name, inline)
            node.children[key] = child
            keys.append(key)
            if child.kind is Kind.PRIMITIVE:
                keys.append("_" + key)
            variants.append((key, "_" + key))
        if element.get("min", 0) > 0:
            node.required.append((element_name, tuple(keys)))
        if choice and len(variants) > 1:
            node.choices.append((element_name, tuple(variants)))

    def _type_name(self, type_ref: dict[str, Any], profiled: bool = True) -> str:
        """The type an element holds; with `profiled`, the constrained type it must meet."""
        code: str = type_ref["code"]
        if code.startswith(_SYSTEM_PREFIX):
            fhir_type = _extension_value(type_ref.get("extension", []), _FHIR_TYPE_EXT)
            return str(fhir_type or "string")
        for profile in type_ref.get("profile", ()) if profiled else ():
            # A constrained data type (SimpleQuantity) validates against its own snapshot.
            if profile in self._by_url:
                return self._by_url[profile]
        return code

    def _child(
        self, element: dict[str, Any], key: str, type_name: str, inline: Node | None
    ) -> Child:
        max_count = _max(element.get("max", "*"))
        base_max = _max(element.get("base", {}).get("max", element.get("max", "*")))
        child = Child(
            key=key,
            # The JSON shape follows the base definition: a profile limiting 0..* to 0..1 is
            # still an array.
            array=base_max is None or base_max > 1,
            min=element.get("min", 0),
            max=max_count,
            kind=Kind.COMPLEX,
            type_name=type_name,
            contained=element.get("base", {}).get("path") == _CONTAINED_PATH,
        )
        if inline is not None:
            child.node = inline
        elif type_name == "Resource":
            child.kind = Kind.RESOURCE
        elif self._defs.structures[type_name]["kind"] == "primitive-type":
            child.kind = Kind.PRIMITIVE
            child.primitive = self._primitive(type_name)
        else:
            child.node = self._node(type_name)
        self._bind(child, element.get("binding"))
        return child

    def _bind(self, child: Child, binding: dict[str, Any] | None) -> None:
        if not binding or binding.get("strength") != "required" or "valueSet" not in binding:
            return
        if child.kind is Kind.PRIMITIVE:
            coded = Coded.CODE
        else:
            base = self._defs.structures.get(child.type_name, {}).get("type", child.type_name)
            kinds = {c.value: c for c in Coded if c is not Coded.CODE}
            if base not in kinds:
                return
            coded = kinds[base]
        expansion = self._expander.expand(binding["valueSet"])
        if expansion is None:
            return  # external or unknown content: cannot be judged here
        child.coded = coded
        child.value_set = binding["valueSet"].split("|", 1)[0]
        child.pairs = expansion
        child.codes = frozenset(code for _, code in expansion)
