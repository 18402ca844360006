"""The page "who accessed my record" (谁看过我的档案): the AuditEvents about the resident,
newest first, a page at a time, searched through the engine with the resident's AccessContext.
A line's texts are in the viewer's language where CityHealth knows the code, else as recorded.

Each line is read from an R4 AuditEvent as follows:
- when: `recorded`, shown in Asia/Shanghai;
- who: the requesting agent (`agent.requestor` true, else the first agent): `who.display`,
  else `name`, else the reference;
- role: that agent's `role` (a CityHealth role code gets its name, others their display or
  text), else its `type`;
- organization: the display of an agent that is an Organization, else of `source.observer`
  when it is one;
- what: `action` (C R U D E) and the entities' `what` (display, else the kind of record);
- purpose: `purposeOfEvent`, else the agent's `purposeOfUse` (known v3 reasons are named);
- outcome: `outcome` 0 is success, anything else a failure or refusal.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Response

from cityhealth.fhir import jsonio
from cityhealth.fhir.access import AccessContext
from cityhealth.fhir.datetimes import date_range
from cityhealth.fhir.errors import FhirError
from cityhealth.portal import i18n
from cityhealth.portal.i18n import N_
from cityhealth.portal.shell import NOT_FOUND, Call, Portal
from cityhealth.security.roles import ROLES
from cityhealth.security.schema import from_us

PAGE_SIZE = 20
_MAX_SEARCHES = 5
_ACTIONS = {
    "C": N_("Created"),
    "R": N_("Viewed"),
    "U": N_("Changed"),
    "D": N_("Deleted"),
    "E": N_("Ran an operation on"),
}
#: Purposes of use (v3 ActReason) a resident meets most.
_PURPOSES = {
    "TREAT": N_("Treatment"),
    "ETREAT": N_("Emergency treatment"),
    "BTG": N_("Emergency access (break-glass)"),
    "PATRQT": N_("At your request"),
    "FAMRQT": N_("At your family's request"),
    "PUBHLTH": N_("Public health"),
    "HOPERAT": N_("Healthcare operations"),
    "HPAYMT": N_("Payment and insurance"),
    "HSYSADMIN": N_("System administration"),
    "HRESCH": N_("Research"),
    "CAREMGT": N_("Care management"),
    "LEGAL": N_("Legal requirement"),
}
#: What a resident calls the records they find most often in the log.
_RECORDS = {
    "Patient": N_("Personal details"),
    "Observation": N_("Test results"),
    "DiagnosticReport": N_("Examination reports"),
    "ImagingStudy": N_("Imaging studies"),
    "MedicationRequest": N_("Prescriptions"),
    "MedicationDispense": N_("Dispensed medicines"),
    "Encounter": N_("Visits"),
    "Condition": N_("Diagnoses"),
    "Procedure": N_("Procedures"),
    "AllergyIntolerance": N_("Allergies"),
    "Immunization": N_("Vaccinations"),
    "DocumentReference": N_("Medical documents"),
    "Consent": N_("Consents"),
}
SUCCESS = N_("Succeeded")
FAILURE = N_("Failed or refused")


@dataclass(frozen=True)
class AccessLine:
    when: datetime | None
    who: str
    role: str
    organization: str
    action: str
    what: str
    purpose: str
    succeeded: bool


def build_access_log_router(portal: Portal) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    engine = portal.engine

    def page_of(
        context: AccessContext, cursor: str | None
    ) -> tuple[list[AccessLine], str | None, str | None]:
        """A page of others' accesses, newest first, and the cursors to the newer and older
        ones. The resident's own doings (opening this page, signing in) are not listed, so
        a page is filled from as many searches as that takes."""
        lines: list[AccessLine] = []
        newer: str | None = None
        for attempt in range(_MAX_SEARCHES):
            params = [("patient", context.patient or ""), ("_sort", "-date")]
            params.append(("_count", str(PAGE_SIZE - len(lines))))
            if cursor:
                params.append(("_cursor", cursor))
            result = engine.search(context, engine.parse_search("AuditEvent", params))
            if attempt == 0:
                newer = result.previous_cursor
            events = [jsonio.loads(hit.body) for hit in result.matches]
            lines += [access_line(e) for e in events if _requestor_ref(e) != context.who]
            cursor = result.next_cursor
            if len(lines) >= PAGE_SIZE or cursor is None:
                break
        return lines, newer, cursor

    def access_log(call: Call) -> Response:
        """One page of the accesses to the patient's record, newest first."""
        context = call.viewer.acting_for(call.request.query_params.get("for"))
        if context is None or context.patient is None:
            return portal.message(call.request, NOT_FOUND, 404, call.viewer)
        cursor = call.request.query_params.get("page")
        try:
            lines, newer, older = page_of(context, cursor)
        except FhirError as error:
            if error.status != 400 or not cursor:
                raise
            # A page link that no longer fits (or was altered): start from the newest again.
            cursor = None
            lines, newer, older = page_of(context, None)
        return portal.render(
            call.request,
            "access_log.html",
            call.viewer,
            patient=context.patient,
            patients=portal.patient_choices(call.viewer, context),
            lines=lines,
            newer=newer,
            older=older,
            first_page=not cursor,
        )

    router.add_api_route(
        "/access-log", portal.page(access_log, residents_only=True), methods=["GET"]
    )
    return router


def access_line(event: dict[str, Any]) -> AccessLine:
    agents = [agent for agent in event.get("agent") or () if isinstance(agent, dict)]
    requestor = next((a for a in agents if a.get("requestor")), agents[0] if agents else {})
    who = requestor.get("who") or {}
    return AccessLine(
        when=_moment(event.get("recorded")),
        who=who.get("display") or requestor.get("name") or who.get("reference") or "",
        role=_role(requestor),
        organization=_organization(agents, event.get("source") or {}),
        action=i18n.gettext(_ACTIONS[event["action"]]) if event.get("action") in _ACTIONS else "",
        what=_what(event.get("entity") or ()),
        purpose=_purpose(event, requestor),
        succeeded=str(event.get("outcome", "0")) == "0",
    )


def _requestor_ref(event: dict[str, Any]) -> str | None:
    agents = [a for a in event.get("agent") or () if isinstance(a, dict)]
    requestor = next((a for a in agents if a.get("requestor")), agents[0] if agents else {})
    reference = (requestor.get("who") or {}).get("reference")
    return reference if isinstance(reference, str) else None


def _moment(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return from_us(date_range(value)[0])
    except ValueError:
        return None


def _role(agent: dict[str, Any]) -> str:
    for concept in [*(agent.get("role") or ()), agent.get("type") or {}]:
        for coding in concept.get("coding") or ():
            role = ROLES.get(coding.get("code") or "")
            if role is not None:
                return i18n.pick(role.name_zh, role.name_en)
            if coding.get("display"):
                return str(coding["display"])
        if concept.get("text"):
            return str(concept["text"])
    return ""


def _organization(agents: list[dict[str, Any]], source: dict[str, Any]) -> str:
    for reference in [*(a.get("who") or {} for a in agents), source.get("observer") or {}]:
        if str(reference.get("reference", "")).startswith("Organization/"):
            return str(reference.get("display") or reference["reference"])
    return ""


def _what(entities: Any) -> str:
    names = []
    for entity in entities:
        what = entity.get("what") or {}
        rtype = str(what.get("reference", "")).partition("/")[0]
        name = what.get("display") or (
            i18n.gettext(_RECORDS[rtype]) if rtype in _RECORDS else rtype
        )
        if name and name not in names:
            names.append(name)
    return "、".join(names) if i18n.current() == i18n.ZH else ", ".join(names)


def _purpose(event: dict[str, Any], agent: dict[str, Any]) -> str:
    for concept in [*(event.get("purposeOfEvent") or ()), *(agent.get("purposeOfUse") or ())]:
        for coding in concept.get("coding") or ():
            if coding.get("code") in _PURPOSES:
                return i18n.gettext(_PURPOSES[coding["code"]])
            if coding.get("display"):
                return str(coding["display"])
        if concept.get("text"):
            return str(concept["text"])
    return ""
