"""The CapabilityStatement: exactly what the engine supports, derived from the definitions."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from cityhealth import __version__
from cityhealth.fhir.composites import composite_for
from cityhealth.fhir.definitions import FHIR_VERSION, Definitions
from cityhealth.fhir.search_parse import REFUSED, SUPPORTED_TYPES
from cityhealth.fhir.store import APPEND_ONLY

TYPE_INTERACTIONS = (
    "read",
    "vread",
    "update",
    "patch",
    "delete",
    "history-instance",
    "history-type",
    "create",
    "search-type",
)


def _resource_entry(definitions: Definitions, rtype: str) -> dict[str, Any]:
    params = definitions.params_for(rtype)
    supported = sorted(
        (
            p
            for p in params.values()
            if p.expression
            and (p.type in SUPPORTED_TYPES or composite_for(definitions, p) is not None)
        ),
        key=lambda p: p.code,
    )
    special = [
        {
            "name": "_id",
            "definition": "http://hl7.org/fhir/SearchParameter/Resource-id",
            "type": "token",
        },
        {
            "name": "_lastUpdated",
            "definition": "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated",
            "type": "date",
        },
    ]
    references = [p.code for p in supported if p.type == "reference"]
    entry: dict[str, Any] = {
        "type": rtype,
        "profile": f"http://hl7.org/fhir/StructureDefinition/{rtype}",
        "interaction": [
            {"code": code}
            for code in TYPE_INTERACTIONS
            if rtype not in APPEND_ONLY or code not in ("update", "patch", "delete")
        ],
        "versioning": "versioned",
        "readHistory": True,
        "updateCreate": True,
        "conditionalCreate": True,
        "conditionalRead": "not-supported",
        "conditionalUpdate": True,
        "conditionalDelete": "single",
        "referencePolicy": ["literal", "logical"],
        "searchInclude": ["*", *[f"{rtype}:{c}" for c in references]],
        "searchRevInclude": [],
        "searchParam": special
        + [
            {"name": p.code, "definition": p.url, "type": p.type}
            for p in supported
            if p.code not in ("_id", "_lastUpdated")
        ],
    }
    if rtype == "Patient":
        entry["operation"] = [
            {
                "name": "everything",
                "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
            }
        ]
    entry["operation"] = [
        *entry.get("operation", []),
        {
            "name": "validate",
            "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate",
        },
    ]
    return entry


@lru_cache(maxsize=8)
def _security(issuer: str) -> dict[str, Any]:
    """SMART App Launch: the OAuth endpoints (also at /.well-known/smart-configuration)."""
    oauth = issuer.rstrip("/") + "/oauth"
    return {
        "service": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                        "code": "SMART-on-FHIR",
                    }
                ]
            }
        ],
        "extension": [
            {
                "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                "extension": [
                    {"url": "authorize", "valueUri": f"{oauth}/authorize"},
                    {"url": "token", "valueUri": f"{oauth}/token"},
                    {"url": "revoke", "valueUri": f"{oauth}/revoke"},
                ],
            }
        ],
        "description": "Every interaction needs an OAuth 2.0 bearer token (SMART scopes); "
        "the access rules of the record's institution, consents and roles apply.",
    }


def capability_statement(definitions: Definitions, base: str, issuer: str) -> dict[str, Any]:
    rev_includes: dict[str, list[str]] = {}
    for rtype in sorted(definitions.resource_types):
        for p in definitions.params_for(rtype).values():
            if p.type == "reference" and p.expression:
                for target in p.targets:
                    rev_includes.setdefault(target, []).append(f"{rtype}:{p.code}")
    resources = []
    for rtype in sorted(definitions.resource_types):
        entry = _resource_entry(definitions, rtype)
        entry["searchRevInclude"] = sorted(rev_includes.get(rtype, []))
        resources.append(entry)
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-25",
        "publisher": "CityHealth",
        "kind": "instance",
        "software": {"name": "CityHealth", "version": __version__},
        "implementation": {"description": "CityHealth FHIR R4 engine", "url": base},
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json", "application/fhir+json"],
        "rest": [
            {
                "mode": "server",
                "security": _security(issuer),
                "documentation": "Refused search parameters: "
                + "; ".join(f"{k}: {v}" for k, v in REFUSED.items())
                + "; special parameters and composites other than token$value pairs are not"
                " supported.",
                "resource": resources,
                "interaction": [
                    {"code": "transaction"},
                    {"code": "batch"},
                    {"code": "history-system"},
                    {"code": "search-system"},
                ],
            }
        ],
    }
