"""The AuditEvent CityHealth records for an action (R4 AuditEvent, as IHE BALP shapes it):
who (agent: the person or client, their role, organization and network address), what
(action, entities), about whom (the patient entities), why (purpose of use, legal basis in
`policy`), when (`recorded`) and the outcome. The portal's access log reads this shape."""

from __future__ import annotations

import base64
from collections.abc import Iterable
from typing import Any

from cityhealth.fhir.access import AccessContext
from cityhealth.fhir.clock import instant, now_us

DCM = "http://dicom.nema.org/resources/ontology/DCM"
EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL = "http://hl7.org/fhir/restful-interaction"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
PURPOSE_OF_USE = "http://terminology.hl7.org/CodeSystem/v3-PurposeOfUse"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
ROLE = "https://cityhealth.cn/fhir/CodeSystem/role"
SUBTYPE = "https://cityhealth.cn/fhir/CodeSystem/audit-subtype"
REVIEW = "https://cityhealth.cn/fhir/CodeSystem/audit-review"
#: Legal bases a record names in `entity.detail`/`policy` (PIPL art. 13).
LEGAL_BASIS = "https://cityhealth.cn/fhir/CodeSystem/legal-basis"

#: FHIR interactions and the AuditEvent action that records each.
ACTIONS = {
    "create": "C",
    "read": "R",
    "vread": "R",
    "history": "R",
    "search": "E",
    "update": "U",
    "patch": "U",
    "delete": "D",
    "operation": "E",
    "login": "E",
    "logout": "E",
}
#: Outcome codes of R4: success, minor failure (refused), serious failure.
SUCCESS, REFUSED, FAILED = "0", "4", "8"
#: Codes of http://hl7.org/fhir/restful-interaction this trail uses as subtypes.
RESTFUL_CODES = frozenset(
    {"read", "vread", "update", "patch", "delete", "history", "create", "search", "batch"}
    | {"transaction", "operation"}
)
BREAK_GLASS_PURPOSE = [
    {"coding": [{"system": ACT_REASON, "code": code} for code in ("BTG", "ETREAT")]}
]
PENDING_REVIEW = {"system": REVIEW, "code": "pending", "display": "待复核 (to be reviewed)"}
#: The legal basis of processing by role (PIPL art. 13, 28; 基本医疗卫生与健康促进法 art. 92):
#: the resident's own request; medical care and emergencies; statutory duties.
_BASIS = {
    "resident": "own-request",
    "doctor": "medical-care",
    "nurse": "medical-care",
    "pharmacist": "medical-care",
    "system": "medical-care",
    "regulator": "statutory-duty",
    "audit_admin": "statutory-duty",
    "platform_admin": "operations",
    "institution_admin": "operations",
}


def legal_basis(ctx: AccessContext, emergency: bool = False) -> str:
    if emergency:
        return "emergency"
    return _BASIS.get(ctx.role, "operations")


#: The purpose of use of an action whose request states none, by role (v3-ActReason).
_DEFAULT_PURPOSE = {
    "resident": "PATRQT",
    "doctor": "TREAT",
    "nurse": "TREAT",
    "pharmacist": "TREAT",
    "regulator": "HOPERAT",
    "audit_admin": "HOPERAT",
    "platform_admin": "HSYSADMIN",
    "institution_admin": "HOPERAT",
    "security_admin": "HSYSADMIN",
}


def purposes(ctx: AccessContext) -> list[dict[str, Any]]:
    code = ctx.purpose or _DEFAULT_PURPOSE.get(ctx.role)
    if code is None and ctx.role == "system":  # a hospital's system treats; the platform runs
        code = "TREAT" if ctx.organization else "HOPERAT"
    if not code:
        return []
    system = ACT_REASON if code in ("BTG", "ETREAT", "TREAT", "PATRQT") else PURPOSE_OF_USE
    return [{"coding": [{"system": system, "code": code}]}]


def audit_event(
    ctx: AccessContext,
    interaction: str,
    subtype: tuple[str, str],
    outcome: str = SUCCESS,
    patients: Iterable[str] = (),
    entities: Iterable[str] = (),
    description: str | None = None,
    query: str | None = None,
    purpose: list[dict[str, Any]] | None = None,
    legal_basis: str | None = None,
    tags: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One AuditEvent: `subtype` is (system, code), e.g. (RESTFUL, "read"); `patients` are
    Patient ids whose records were touched; `entities` other references ("Type/id")."""
    kind = (
        {"system": EVENT_TYPE, "code": "rest", "display": "RESTful Operation"}
        if subtype[0] == RESTFUL
        else {"system": DCM, "code": "110113", "display": "Security Alert"}
        if subtype[0] == SUBTYPE
        else {"system": DCM, "code": "110114", "display": "User Authentication"}
    )
    agent: dict[str, Any] = {
        "type": {"coding": [{"system": ROLE, "code": ctx.role}]},
        "role": [{"coding": [{"system": ROLE, "code": ctx.role}]}],
        "who": {"reference": ctx.who} if "/" in ctx.who else {"display": ctx.who},
        "requestor": True,
    }
    if ctx.client_address:
        agent["network"] = {"address": ctx.client_address, "type": "2"}
    why = purpose if purpose is not None else purposes(ctx)
    if why:
        agent["purposeOfUse"] = why
    if legal_basis:
        agent["policy"] = [f"{LEGAL_BASIS}#{legal_basis}"]
    agents = [agent]
    if ctx.organization:
        agents.append({"who": {"reference": ctx.organization}, "requestor": False})
    found: list[dict[str, Any]] = [
        {
            "what": {"reference": f"Patient/{pid}"},
            "type": {"system": ENTITY_TYPE, "code": "1", "display": "Person"},
            "role": {"system": OBJECT_ROLE, "code": "1", "display": "Patient"},
        }
        for pid in sorted(set(patients))
    ]
    found += [
        {"what": {"reference": ref}, "type": {"system": ENTITY_TYPE, "code": "2"}}
        for ref in dict.fromkeys(entities)
    ]
    if query:  # as IHE BALP records a search: the query, base64, in an entity of its own
        found.append(
            {
                "type": {"system": ENTITY_TYPE, "code": "2", "display": "System Object"},
                "role": {"system": OBJECT_ROLE, "code": "24", "display": "Query"},
                "query": base64.b64encode(query.encode()).decode(),
                "description": query,
            }
        )
    if description and found:
        found[0]["description"] = description
    elif description:
        found.append({"type": {"system": ENTITY_TYPE, "code": "4"}, "description": description})
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": kind,
        "subtype": [{"system": subtype[0], "code": subtype[1]}],
        "action": ACTIONS.get(interaction, "E"),
        "recorded": instant(now_us()),
        "outcome": outcome,
        "agent": agents,
        "source": {"observer": {"display": "CityHealth"}},
    }
    if why:
        event["purposeOfEvent"] = why
    if found:
        event["entity"] = found
    if tags:
        event["meta"] = {"tag": tags}
    return event


def record_patients(event: dict[str, Any]) -> set[str]:
    """The patients an AuditEvent is about: R4's `patient` search parameter (the agents and
    entities that are Patients)."""
    agents = [agent.get("who") for agent in event.get("agent") or () if isinstance(agent, dict)]
    found = [entity.get("what") for entity in event.get("entity") or () if isinstance(entity, dict)]
    refs = [ref.get("reference") for ref in agents + found if isinstance(ref, dict)]
    return {
        ref.removeprefix("Patient/")
        for ref in refs
        if isinstance(ref, str) and ref.startswith("Patient/") and "/" not in ref[8:]
    }
