"""The official R4 definitions, read from the HL7 package in the FHIR package cache.

Everything that drives behaviour (validation, search parameters, compartments, the
CapabilityStatement) comes from here, not from per-resource code.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson

from cityhealth.config import get_settings
from cityhealth.fhir.packages import PackageError, is_installed, package_dir

FHIR_VERSION = "4.0.1"

#: Files of the package this module reads (definition bundles and two stand-alone resources
#: that a required binding in R4 needs).
SEARCH_PARAMS_FILE = "Bundle-searchParams.json"
RESOURCES_FILE = "Bundle-resources.json"
TYPES_FILE = "Bundle-types.json"
VALUESETS_FILE = "Bundle-valuesets.json"
COMPARTMENT_FILE = "CompartmentDefinition-patient.json"
EXTRA_TERMINOLOGY_FILES = (
    "ValueSet-v3-ConfidentialityClassification.json",
    "CodeSystem-v3-Confidentiality.json",
)
#: Bump when the compiled form changes so stale caches are ignored.
_COMPILED_FORMAT = 1


@dataclass(frozen=True)
class SearchParam:
    """One search parameter as it applies to one resource type."""

    code: str
    type: str  # number date string token reference composite quantity uri special
    resource_type: str
    url: str
    #: The part of the FHIRPath expression that applies to this resource type (None: none).
    expression: str | None
    targets: tuple[str, ...] = ()
    modifiers: tuple[str, ...] = ()
    comparators: tuple[str, ...] = ()
    components: tuple[tuple[str, str], ...] = ()  # composite: (definition url, expression)
    description: str = ""


@dataclass(eq=False)  # compared by identity, so it can key caches
class Definitions:
    #: StructureDefinitions of resources and data types by type name (e.g. "Patient", "HumanName").
    structures: dict[str, dict[str, Any]]
    #: Concrete resource types the engine stores (kind = resource, not abstract).
    resource_types: frozenset[str]
    #: Search parameters by resource type, then code (inherited Resource/DomainResource ones too).
    search_params: dict[str, dict[str, SearchParam]]
    #: Patient compartment: resource type → the parameters that link it to a Patient.
    patient_compartment: dict[str, tuple[str, ...]]
    value_sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    code_systems: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Search parameters by canonical URL (for composite components).
    params_by_url: dict[str, dict[str, Any]] = field(default_factory=dict)

    def is_resource_type(self, name: str) -> bool:
        return name in self.resource_types

    def params_for(self, resource_type: str) -> dict[str, SearchParam]:
        return self.search_params.get(resource_type, {})


def _entries(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", []) if "resource" in e]


def _split_union(expression: str) -> list[str]:
    """Split a FHIRPath expression on its top-level `|` operators."""
    parts, depth, quote, start = [], 0, False, 0
    for i, ch in enumerate(expression):
        if ch == "'" and (i == 0 or expression[i - 1] != "\\"):
            quote = not quote
        elif quote:
            continue
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "|" and depth == 0:
            parts.append(expression[start:i].strip())
            start = i + 1
    parts.append(expression[start:].strip())
    return [p for p in parts if p]


def _root_type(part: str) -> str | None:
    m = re.match(r"^\(*\s*([A-Za-z]+)[.\s)]", part + " ")
    return m.group(1) if m else None


def expression_for(expression: str | None, base: str, resource_type: str) -> str | None:
    """The part of a (possibly multi-type) expression that applies to `resource_type`."""
    if not expression:
        return None
    parts = []
    for part in _split_union(expression):
        root = _root_type(part)
        if root == resource_type:
            parts.append(part)
        elif root in ("Resource", "DomainResource") and root == base:
            parts.append(re.sub(rf"^(\(*\s*){root}\b", rf"\g<1>{resource_type}", part))
    return " | ".join(parts) if parts else None


def _build_search_params(
    params: list[dict[str, Any]], resource_types: frozenset[str]
) -> dict[str, dict[str, SearchParam]]:
    by_type: dict[str, dict[str, SearchParam]] = {t: {} for t in resource_types}
    for sp in params:
        for base in sp.get("base", []):
            applies = (
                sorted(resource_types)
                if base in ("Resource", "DomainResource")
                else [base]
                if base in resource_types
                else []
            )
            for rtype in applies:
                by_type[rtype][sp["code"]] = SearchParam(
                    code=sp["code"],
                    type=sp["type"],
                    resource_type=rtype,
                    url=sp["url"],
                    expression=expression_for(sp.get("expression"), base, rtype),
                    targets=tuple(sp.get("target", ())),
                    modifiers=tuple(sp.get("modifier", ())),
                    comparators=tuple(sp.get("comparator", ())),
                    components=tuple(
                        (c["definition"], c["expression"]) for c in sp.get("component", ())
                    ),
                    description=sp.get("description", ""),
                )
    return by_type


def _read(path: Path) -> Any:
    return orjson.loads(path.read_bytes())


def load_from_dir(directory: Path) -> Definitions:
    """Parse the definition files of an unpacked R4 package."""
    structures: dict[str, dict[str, Any]] = {}
    resource_types = set()
    for name in (TYPES_FILE, RESOURCES_FILE):
        for res in _entries(_read(directory / name)):
            if res["resourceType"] != "StructureDefinition":
                continue
            if res.get("derivation") == "constraint":
                continue  # profiles such as SimpleQuantity are reached through their base
            structures[res["type"]] = res
            if res["kind"] == "resource" and not res.get("abstract"):
                resource_types.add(res["type"])
    # Profiles of data types (SimpleQuantity, MoneyQuantity…) are referenced by URL.
    for name in (TYPES_FILE,):
        for res in _entries(_read(directory / name)):
            if res["resourceType"] == "StructureDefinition" and res.get("derivation") == (
                "constraint"
            ):
                structures[res["id"]] = res
    rtypes = frozenset(resource_types)
    params = _entries(_read(directory / SEARCH_PARAMS_FILE))
    compartment = _read(directory / COMPARTMENT_FILE)
    patient_compartment = {
        r["code"]: tuple(r.get("param", ())) for r in compartment["resource"] if r.get("param")
    }
    value_sets: dict[str, dict[str, Any]] = {}
    code_systems: dict[str, dict[str, Any]] = {}
    terminology = _entries(_read(directory / VALUESETS_FILE))
    terminology += [
        _read(directory / f) for f in EXTRA_TERMINOLOGY_FILES if (directory / f).exists()
    ]
    for res in terminology:
        target = value_sets if res["resourceType"] == "ValueSet" else code_systems
        target[res["url"]] = res
    return Definitions(
        structures=structures,
        resource_types=rtypes,
        search_params=_build_search_params(params, rtypes),
        patient_compartment=patient_compartment,
        value_sets=value_sets,
        code_systems=code_systems,
        params_by_url={p["url"]: p for p in params},
    )


def _compiled_path(directory: Path, var_dir: Path) -> Path:
    stamp = "|".join(
        f"{f}:{(directory / f).stat().st_mtime_ns}:{(directory / f).stat().st_size}"
        for f in (SEARCH_PARAMS_FILE, RESOURCES_FILE, TYPES_FILE, VALUESETS_FILE)
    )
    digest = hashlib.sha256(f"{_COMPILED_FORMAT}|{directory}|{stamp}".encode()).hexdigest()[:16]
    return var_dir / "cache" / f"fhir-definitions-{digest}.pickle"


def load(directory: Path, var_dir: Path | None = None) -> Definitions:
    """Load definitions, from the compiled cache in `var_dir` when it is current."""
    if var_dir is None:
        return load_from_dir(directory)
    cached = _compiled_path(directory, var_dir)
    if cached.exists():
        try:
            with cached.open("rb") as fh:
                result: Definitions = pickle.load(fh)
            return result
        except Exception:
            pass  # a stale or broken cache (any error unpickling it) is rebuilt below
    defs = load_from_dir(directory)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        # One scratch file per process: workers starting together must not write into the same.
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        with tmp.open("wb") as fh:
            pickle.dump(defs, fh, protocol=pickle.HIGHEST_PROTOCOL)
        tmp.replace(cached)
    except OSError:
        pass  # a read-only var dir only costs start-up time
    return defs


@lru_cache
def get_definitions() -> Definitions:
    """The definitions of the configured core package (installed with `cityhealth fhir install`)."""
    settings = get_settings()
    spec = settings.fhir_core_package
    if not is_installed(settings.fhir_package_cache, spec):
        raise PackageError(
            f"FHIR package {spec} is not installed in {settings.fhir_package_cache}; "
            f"run: cityhealth fhir install {spec}"
        )
    return load(package_dir(settings.fhir_package_cache, spec), settings.var_dir)
