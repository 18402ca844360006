"""FHIRPath evaluation over FHIR JSON (dicts), with expressions compiled once and cached.

fhirpathpy has no `resolve()`; the one registered here types a Reference by its
`reference` string (`Patient/1` → a minimal Patient), or returns the contained resource
for a local `#id` reference, which is what search parameter expressions such as
`subject.where(resolve() is Patient)` need.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextvars import ContextVar
from functools import lru_cache
from typing import Any

import fhirpathpy
from fhirpathpy.engine.nodes import ResourceNode
from fhirpathpy.models import models

_R4_MODEL = models["r4"]

#: Type and id of a literal reference: relative (`Patient/1`), absolute
#: (`http://host/fhir/Patient/1`) and versioned (`…/_history/2`).
_LITERAL_REFERENCE = re.compile(
    r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$"
)

#: The resource the current evaluation started from; `resolve()` looks for contained
#: resources there, and the library does not pass its context to user functions.
_root: ContextVar[Any] = ContextVar("fhirpath_root", default=None)


def _resolve_one(item: Any) -> dict[str, Any] | None:
    reference = item.get("reference") if isinstance(item, dict) else item
    if not isinstance(reference, str):
        return None
    if reference.startswith("#"):
        root = _root.get()
        if not isinstance(root, dict):
            return None
        local_id = reference[1:]
        for contained in root.get("contained", ()):
            if isinstance(contained, dict) and contained.get("id") == local_id:
                return contained
        return None
    match = _LITERAL_REFERENCE.search(reference)
    if match is None:
        return None
    return {"resourceType": match.group(1), "id": match.group(2)}


def _resolve(inputs: list[Any]) -> list[ResourceNode]:
    # A node (not a bare dict) carries the resource type that `is`/`as`/`ofType` test.
    return [ResourceNode.create_node(found) for found in map(_resolve_one, inputs) if found]


_OPTIONS = {"userInvocationTable": {"resolve": {"fn": _resolve}}}

#: FHIR's predefined environment variables (%ucum is built into the library); `%vs-name` and
#: `%ext-name` stand for the canonical URLs of core value sets and extensions.
_FHIR_VARIABLES = {"sct": "http://snomed.info/sct", "loinc": "http://loinc.org"}
_CANONICAL_VARIABLE = re.compile(r"%`(vs|ext)-([^`]+)`")
_CANONICAL_BASE = {
    "vs": "http://hl7.org/fhir/ValueSet/",
    "ext": "http://hl7.org/fhir/StructureDefinition/",
}


def _environment(expression: str) -> dict[str, str]:
    found = {
        f"{kind}-{name}": _CANONICAL_BASE[kind] + name
        for kind, name in _CANONICAL_VARIABLE.findall(expression)
    }
    return _FHIR_VARIABLES | found


@lru_cache(maxsize=4096)
def compile_expression(expression: str) -> Callable[..., list[Any]]:
    """Parse `expression` once (R4 model); the result is called as `fn(resource, variables)`."""
    compiled = fhirpathpy.compile(expression, model=_R4_MODEL, options=_OPTIONS)
    environment = _environment(expression)

    def run(resource: Any, variables: dict[str, Any] | None = None) -> list[Any]:
        # Expressions are evaluated from the resource root, so %resource is the root too.
        context = {"resource": resource, "rootResource": resource, **environment}
        if variables:
            context.update(variables)
        token = _root.set(resource)
        try:
            return list(compiled(resource, context))
        finally:
            _root.reset(token)

    return run


def evaluate(resource: Any, expression: str, variables: dict[str, Any] | None = None) -> list[Any]:
    """Evaluate a FHIRPath expression on a FHIR JSON resource (or any JSON node)."""
    return compile_expression(expression)(resource, variables)
