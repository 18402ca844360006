"""`_summary` and `_elements`: return part of a resource, marked SUBSETTED (search.html)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from cityhealth.fhir.definitions import Definitions

SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
    "display": "Resource encoded in summary mode",
}
_ALWAYS = ("resourceType", "id", "meta")


@lru_cache(maxsize=512)
def _top_level(definitions: Definitions, rtype: str, summary_only: bool) -> frozenset[str]:
    """JSON names of top-level elements of `rtype` (only `isSummary` ones when asked)."""
    names: set[str] = set()
    structure = definitions.structures.get(rtype, {})
    for element in structure.get("snapshot", {}).get("element", []):
        path = element["path"]
        if path.count(".") != 1 or (summary_only and not element.get("isSummary")):
            continue
        name = path.split(".", 1)[1]
        if name.endswith("[x]"):
            stem = name[:-3]
            names.update(
                stem + t["code"][0].upper() + t["code"][1:] for t in element.get("type", [])
            )
        else:
            names.add(name)
    return frozenset(names)


def _mark(resource: dict[str, Any]) -> dict[str, Any]:
    meta = dict(resource.get("meta") or {})
    meta["tag"] = [*meta.get("tag", []), SUBSETTED]
    resource["meta"] = meta
    return resource


def _keep(resource: dict[str, Any], names: set[str] | frozenset[str]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k in _ALWAYS or k in names or k[1:] in names}


def subset(
    definitions: Definitions,
    resource: dict[str, Any],
    summary: str | None,
    elements: list[str],
) -> dict[str, Any]:
    """The resource as `_summary` / `_elements` ask (unchanged when they ask for nothing)."""
    rtype = resource.get("resourceType", "")
    if elements:
        return _mark(_keep(resource, set(elements)))
    if summary == "true":
        return _mark(_keep(resource, _top_level(definitions, rtype, True)))
    if summary == "text":
        required = {
            n for n in _top_level(definitions, rtype, False) if _is_required(definitions, rtype, n)
        }
        return _mark(_keep(resource, {"text", *required}))
    if summary == "data":
        return _mark({k: v for k, v in resource.items() if k != "text"})
    return resource


def _is_required(definitions: Definitions, rtype: str, name: str) -> bool:
    structure = definitions.structures.get(rtype, {})
    for element in structure.get("snapshot", {}).get("element", []):
        if element["path"] == f"{rtype}.{name}":
            return int(element.get("min", 0)) > 0
    return False
