"""Compile the FHIRPath expressions of search parameters into plain-Python path walkers.

Nearly every R4 search-parameter expression is a union of simple paths: child steps,
choice-type selection (``value as Quantity``, ``onset.as(Age)``), filters such as
``where(system='phone')`` or ``where(resolve() is Patient)``, an index ``[0]`` and
``extension('url')``. Such a path is resolved once against the StructureDefinitions, so that
every result has a data type known in advance (a ``code`` with its required binding, a
``CodeableConcept``, a ``Reference``...) and walking a resource costs only dictionary lookups.
Expressions outside this subset raise `UnsupportedExpression`; the caller evaluates those with
the FHIRPath engine instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from cityhealth.fhir.definitions import Definitions

#: A step of a compiled path: the collection of nodes in, the next collection out.
Op = Callable[[list[Any]], list[Any]]

_TOKEN = re.compile(
    r"\s*(?:(?P<str>'(?:[^'\\]|\\.)*')|(?P<num>\d+)|(?P<id>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<op>!=|[().\[\]|=]))"
)
_FHIRPATH_SYSTEM = "http://hl7.org/fhirpath/System."
_FHIR_TYPE_EXTENSION = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"
#: Element types whose children are defined inline in the same StructureDefinition.
_INLINE_TYPES = frozenset({"BackboneElement", "Element"})
#: Types that may carry a code from a required binding without naming its system.
_BOUND_PRIMITIVES = frozenset({"code", "string", "uri"})


class UnsupportedExpression(Exception):
    """The expression uses FHIRPath beyond the compiled subset."""


@dataclass(frozen=True)
class Branch:
    """One typed path of an expression: the nodes it reaches all have `type_code`."""

    #: The top-level key of the resource the path starts with.
    key: str
    #: Steps applied to the value(s) of `key`.
    ops: tuple[Op, ...]
    #: FHIR data type of the nodes reached ("CodeableConcept", "code", "Reference"…).
    type_code: str
    #: System of the single code system of the element's required binding, if any.
    binding_system: str | None = None
    #: Resource types a `where(resolve() is X)` filter keeps (None: no filter).
    targets: frozenset[str] | None = None


@dataclass(frozen=True)
class ExistsNotFalse:
    """``X.exists() and X != false``: a boolean computed from the branches of X."""

    branches: tuple[Branch, ...]


# --- parsing -----------------------------------------------------------------------------

Step = tuple[str, ...]  # ("child", name) ("as", type) ("eq", field, value) ("is", type) …


def _tokens(expression: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = expression.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            raise UnsupportedExpression(f"cannot read {text[pos:]!r}")
        kind = match.lastgroup
        assert kind is not None
        out.append((kind, match.group(kind)))
        pos = match.end()
    return out


class _Parser:
    """Recursive descent over the path subset; anything else is unsupported."""

    def __init__(self, expression: str, resource_type: str) -> None:
        self.tokens = _tokens(expression)
        self.pos = 0
        self.resource_type = resource_type

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, kind: str, text: str | None = None) -> str:
        token = self.peek()
        if token is None or token[0] != kind or (text is not None and token[1] != text):
            raise UnsupportedExpression(f"expected {text or kind} at token {self.pos}")
        self.pos += 1
        return token[1]

    def at(self, kind: str, text: str | None = None) -> bool:
        token = self.peek()
        return token is not None and token[0] == kind and (text is None or token[1] == text)

    def union(self) -> list[list[Step]]:
        terms = [self.term()]
        while self.at("op", "|"):
            self.take("op", "|")
            terms.append(self.term())
        if self.peek() is not None:
            raise UnsupportedExpression(f"unexpected token {self.peek()}")
        return terms

    def term(self) -> list[Step]:
        if self.at("op", "("):
            self.take("op", "(")
            steps = self.term()
            if self.at("id", "as"):
                self.take("id", "as")
                steps.append(("as", self.type_name()))
            self.take("op", ")")
        else:
            first = self.take("id")
            # The root names the resource type; a few official expressions omit it.
            steps = [] if first == self.resource_type else [("child", first)]
        while True:
            if self.at("op", "."):
                self.take("op", ".")
                steps.append(self.step())
            elif self.at("op", "["):
                self.take("op", "[")
                steps.append(("index", self.take("num")))
                self.take("op", "]")
            else:
                return steps

    def step(self) -> Step:
        name = self.take("id")
        if not self.at("op", "("):
            return ("child", name)
        self.take("op", "(")
        if name in ("as", "ofType"):
            step: Step = ("as", self.type_name())
        elif name == "extension":
            step = ("extension", _literal(self.take("str")))
        elif name == "where":
            step = self.condition()
        else:
            raise UnsupportedExpression(f"function {name}()")
        self.take("op", ")")
        return step

    def condition(self) -> Step:
        name = self.take("id")
        if name == "resolve":
            self.take("op", "(")
            self.take("op", ")")
            self.take("id", "is")
            return ("is", self.type_name())
        self.take("op", "=")
        return ("eq", name, _literal(self.take("str")))

    def type_name(self) -> str:
        name = self.take("id")
        if name in ("FHIR", "System") and self.at("op", "."):
            self.take("op", ".")
            name = self.take("id")
        return name


def _literal(quoted: str) -> str:
    return re.sub(r"\\(.)", r"\1", quoted[1:-1])


# --- runtime steps -----------------------------------------------------------------------


def _child_op(key: str) -> Op:
    def child(nodes: list[Any]) -> list[Any]:
        out: list[Any] = []
        for node in nodes:
            if type(node) is dict:
                value = node.get(key)
                if type(value) is list:
                    out.extend(value)
                elif value is not None:
                    out.append(value)
        return out

    return child


def _equals_op(field: str, expected: str) -> Op:
    def where(nodes: list[Any]) -> list[Any]:
        return [n for n in nodes if type(n) is dict and n.get(field) == expected]

    return where


def _index_op(index: int) -> Op:
    def item(nodes: list[Any]) -> list[Any]:
        return nodes[index : index + 1]

    return item


# --- type resolution ---------------------------------------------------------------------


@dataclass(frozen=True)
class _State:
    key: str | None
    ops: tuple[Op, ...]
    type_code: str
    #: Where children are looked up: (StructureDefinition name, element path).
    context: tuple[str, str] | None
    binding_system: str | None = None
    targets: frozenset[str] | None = None

    def to(self, key: str, type_code: str, context: tuple[str, str] | None) -> _State:
        """The state after stepping into child `key` of type `type_code`."""
        ops = self.ops if self.key is None else (*self.ops, _child_op(key))
        return replace(
            self,
            key=self.key or key,
            ops=ops,
            type_code=type_code,
            context=context,
            binding_system=None,
        )


class PathCompiler:
    """Resolves parsed paths against the StructureDefinitions; one instance per Definitions."""

    def __init__(self, definitions: Definitions) -> None:
        self.definitions = definitions
        self._elements: dict[str, dict[str, dict[str, Any]]] = {}
        self._bindings: dict[str, str | None] = {}

    def compile(self, expression: str, resource_type: str) -> tuple[Branch, ...] | ExistsNotFalse:
        """Typed branches of `expression` on `resource_type`; raises UnsupportedExpression."""
        exists = re.fullmatch(r"(.+)\.exists\(\) and (.+) != false", expression.strip())
        if exists and exists.group(1) == exists.group(2):
            return ExistsNotFalse(self.compile_union(exists.group(1), resource_type))
        return self.compile_union(expression, resource_type)

    def compile_union(self, expression: str, resource_type: str) -> tuple[Branch, ...]:
        branches: list[Branch] = []
        for steps in _Parser(expression, resource_type).union():
            start = _State(None, (), resource_type, (resource_type, resource_type))
            for state in self._walk(start, steps):
                if state.key is None:
                    raise UnsupportedExpression("the path selects the resource itself")
                branches.append(
                    Branch(
                        state.key, state.ops, state.type_code, state.binding_system, state.targets
                    )
                )
        return tuple(branches)

    def _walk(self, start: _State, steps: list[Step]) -> list[_State]:
        states = [start]
        for step in steps:
            next_states: list[_State] = []
            failures = 0
            for state in states:
                try:
                    next_states.extend(self._apply(state, step))
                except UnsupportedExpression:
                    # After a choice fork, a step that only some of the types have empties the
                    # other branches (FHIRPath semantics); on a single path it is an error.
                    if len(states) == 1:
                        raise
                    failures += 1
            if states and failures == len(states):
                raise UnsupportedExpression(f"no branch admits {step}")
            states = next_states
        return states

    def _apply(self, state: _State, step: Step) -> list[_State]:
        kind = step[0]
        if kind == "child":
            return self._child(state, step[1])
        if kind == "as":
            # A choice element was forked into one branch per type: `as` keeps the ones of that
            # type or a specialisation of it (a canonical is a uri, an Age a Quantity).
            return [state] if self._is_a(state.type_code, step[1]) else []
        if kind == "eq":
            return [replace(state, ops=(*state.ops, _equals_op(step[1], step[2])))]
        if kind == "is":
            keep = frozenset({step[1]})
            return [replace(state, targets=keep if state.targets is None else state.targets & keep)]
        if kind == "index":
            if state.key is None:
                raise UnsupportedExpression("index on the resource itself")
            return [replace(state, ops=(*state.ops, _index_op(int(step[1]))))]
        if kind == "extension":
            return [
                replace(state, ops=(*state.ops, _equals_op("url", step[1])))
                for state in self._child(state, "extension")
            ]
        raise UnsupportedExpression(f"step {step}")

    def _child(self, state: _State, name: str) -> list[_State]:
        if state.context is None:
            raise UnsupportedExpression(f"{name} below primitive {state.type_code}")
        sd_name, path = state.context
        elements = self._elements_of(sd_name)
        element = elements.get(f"{path}.{name}")
        if element is not None:
            return [self._enter(state, name, element, sd_name)]
        element = elements.get(f"{path}.{name}[x]")
        if element is None:
            raise UnsupportedExpression(f"no element {path}.{name}")
        return [
            state.to(name + code[0].upper() + code[1:], code, self._context_of(code))
            for code in (_type_code(t) for t in element.get("type", ()))
        ]

    def _enter(self, state: _State, name: str, element: dict[str, Any], sd_name: str) -> _State:
        reference = element.get("contentReference")
        if reference:
            return state.to(name, "BackboneElement", (sd_name, reference.lstrip("#")))
        types = element.get("type", ())
        if len(types) != 1:
            raise UnsupportedExpression(f"element {element['path']} has {len(types)} types")
        code = _type_code(types[0])
        context = (sd_name, element["path"]) if code in _INLINE_TYPES else self._context_of(code)
        entered = state.to(name, code, context)
        binding = element.get("binding")
        if code in _BOUND_PRIMITIVES and binding and binding.get("strength") == "required":
            system = self._binding_system(binding.get("valueSet", ""))
            return replace(entered, binding_system=system)
        return entered

    def _is_a(self, type_code: str, name: str) -> bool:
        """Whether `type_code` is `name` or derives from it (baseDefinition chain)."""
        current: str | None = type_code
        while current is not None:
            if current == name:
                return True
            structure = self.definitions.structures.get(current)
            base = structure.get("baseDefinition") if structure is not None else None
            current = base.rpartition("/")[2] if base else None
        return False

    def _context_of(self, type_code: str) -> tuple[str, str] | None:
        return (type_code, type_code) if type_code in self.definitions.structures else None

    def _elements_of(self, sd_name: str) -> dict[str, dict[str, Any]]:
        elements = self._elements.get(sd_name)
        if elements is None:
            structure = self.definitions.structures.get(sd_name)
            if structure is None:
                raise UnsupportedExpression(f"no StructureDefinition for {sd_name}")
            elements = {}
            for element in structure.get("snapshot", {}).get("element", ()):
                elements.setdefault(element["path"], element)
            self._elements[sd_name] = elements
        return elements

    def _binding_system(self, value_set_url: str) -> str | None:
        url = value_set_url.partition("|")[0]
        if url not in self._bindings:
            systems = self._systems_of(url, set())
            self._bindings[url] = (
                systems.pop() if systems is not None and len(systems) == 1 else None
            )
        return self._bindings[url]

    def _systems_of(self, url: str, seen: set[str]) -> set[str] | None:
        """Code systems a value set draws from (None: not known, e.g. an external value set)."""
        value_set = self.definitions.value_sets.get(url)
        if value_set is None or url in seen:
            return None
        seen.add(url)
        systems: set[str] = set()
        for include in value_set.get("compose", {}).get("include", ()):
            if "system" in include:
                systems.add(include["system"])
            for nested in include.get("valueSet", ()):
                found = self._systems_of(nested.partition("|")[0], seen)
                if found is None:
                    return None
                systems |= found
        return systems


def _type_code(element_type: dict[str, Any]) -> str:
    code: str = element_type["code"]
    if code.startswith(_FHIRPATH_SYSTEM):
        for extension in element_type.get("extension", ()):
            if extension.get("url") == _FHIR_TYPE_EXTENSION:
                fhir_type: str = extension["valueUrl"]
                return fhir_type
        return code.removeprefix(_FHIRPATH_SYSTEM).lower()
    return code
