"""The resident's consent pages (授权调阅): list, grant, revoke. Consents are R4 `Consent`
resources of the shape of cityhealth.security.consent_shape, read and written through the
engine with the resident's AccessContext. A guardian chooses which child they act for."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import RedirectResponse

from cityhealth.fhir import jsonio
from cityhealth.fhir.access import AccessContext
from cityhealth.fhir.errors import FhirError
from cityhealth.portal import i18n
from cityhealth.portal.consent_form import ALL, SOME, read_consent_form
from cityhealth.portal.i18n import N_
from cityhealth.portal.names import display_name
from cityhealth.portal.shell import NOT_FOUND, Call, Portal
from cityhealth.security.consent_shape import (
    ACTIVE,
    CATEGORIES,
    CATEGORY_BY_CODE,
    INACTIVE,
    RECIPIENT_TYPES,
    SENSITIVE,
    ConsentTerms,
    consent_resource,
    read_consent,
)

RECIPIENT_UNKNOWN = N_("That organization or doctor was not found. Search again and choose one.")
CHANGED_MEANWHILE = N_("The consent was changed meanwhile. Please look at it again.")
_MAX_QUERY = 50
_RESULTS = 10
_LISTED = 50


@dataclass(frozen=True)
class Recipient:
    reference: str
    name: str
    kind: str  # Organization or Practitioner


@dataclass(frozen=True)
class ConsentRow:
    id: str
    terms: ConsentTerms
    state: str  # in_force, expired or revoked
    data: tuple[str, ...]  # what it covers, in the viewer's language
    sensitive: tuple[str, ...]


def build_consent_router(portal: Portal) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    engine = portal.engine

    def acting(call: Call) -> tuple[str, AccessContext] | None:
        """The patient the page is for (a guardian may choose a child) and its context."""
        chosen = call.request.query_params.get("for") or call.field("for") or None
        context = call.viewer.acting_for(chosen)
        if context is None or context.patient is None:
            return None
        return context.patient, context

    def consents(call: Call) -> Response:
        """The patient's consents, newest first: those in force, then the others."""
        found = acting(call)
        if found is None:
            return portal.message(call.request, NOT_FOUND, 404, call.viewer)
        patient, context = found
        params = [("patient", patient), ("_sort", "-date"), ("_count", str(_LISTED))]
        result = engine.search(context, engine.parse_search("Consent", params))
        now = portal.sessions.accounts.clock()
        rows = [_row(hit.id, jsonio.loads(hit.body), now) for hit in result.matches]
        listed = [row for row in rows if row is not None]
        return portal.render(
            call.request,
            "consents.html",
            call.viewer,
            patient=patient,
            patients=portal.patient_choices(call.viewer, context),
            in_force=[row for row in listed if row.state == "in_force"],
            others=[row for row in listed if row.state != "in_force"],
            more=result.next_cursor is not None,
            granted=call.request.query_params.get("granted") == "1",
            revoked=call.request.query_params.get("revoked") == "1",
        )

    def new_consent(call: Call) -> Response:
        """The grant form; a search (without JavaScript, by reloading) fills its choices."""
        found = acting(call)
        if found is None:
            return portal.message(call.request, NOT_FOUND, 404, call.viewer)
        patient, context = found
        query = call.request.query_params.get("q", "").strip()[:_MAX_QUERY]
        return _form_page(portal, call, context, patient, query, {}, {})

    def recipients(call: Call) -> Response:
        """The search results alone, for htmx; a plain request gets the whole form."""
        query = call.request.query_params.get("q", "").strip()[:_MAX_QUERY]
        if not call.htmx:
            target = "/consents/new?" + str(call.request.query_params)
            return RedirectResponse(target, 303)
        found = acting(call)
        if found is None:
            return portal.message(call.request, NOT_FOUND, 404, call.viewer)
        return portal.render(
            call.request,
            "_recipients.html",
            call.viewer,
            q=query,
            results=_search(portal, found[1], query),
            chosen="",
            errors={},
        )

    def grant(call: Call) -> Response:
        """Create the consent when the whole form is valid; otherwise show it with its errors."""
        viewer = call.viewer
        clock = portal.sessions.accounts.clock
        links = [link.patient for link in viewer.patients]
        choice, errors = read_consent_form(call.form, links, i18n.local_date(clock()))
        # A patient not theirs is refused by the form; the page shows their own again.
        chosen = call.field("for") if call.field("for") in links else ""
        context = viewer.acting_for(chosen) or viewer.context
        chosen = chosen or context.patient or ""
        recipient = None
        if choice is not None:
            recipient = _recipient(portal, context, choice.recipient)
            if recipient is None:
                errors["recipient"] = RECIPIENT_UNKNOWN
        if choice is None or recipient is None:
            query = call.field("q")[:_MAX_QUERY]
            return _form_page(portal, call, context, chosen, query, errors, call.form, 422)
        now = clock()
        last_day = datetime.combine(choice.end, time(23, 59, 59), i18n.SHANGHAI)
        terms = ConsentTerms(
            patient=choice.patient,
            performer=viewer.account.fhir_user,
            recipient=recipient.reference,
            recipient_name=recipient.name,
            start=now,
            end=last_day,
            categories=choice.categories,
            sensitive=choice.sensitive,
            granted=now,
        )
        engine.create(context, "Consent", consent_resource(terms))
        return RedirectResponse(f"/consents?for={choice.patient}&granted=1", 303)

    def revoke(call: Call) -> Response:
        """Set the consent inactive: the engine stops honouring it on the next request."""
        viewer = call.viewer
        consent_id = call.request.path_params["consent_id"]
        stored = engine.repository.read(viewer.context, "Consent", consent_id)
        body = jsonio.loads(stored.body or "{}")
        terms = read_consent(body)
        context = viewer.acting_for(terms.patient) if terms else None
        if terms is None or context is None:
            return portal.message(call.request, NOT_FOUND, 404, viewer)
        if body["status"] == ACTIVE:
            body["status"] = INACTIVE
            try:
                engine.update(context, "Consent", consent_id, body, if_match=stored.version)
            except FhirError as error:
                if error.status != 412:
                    raise
                return portal.message(call.request, CHANGED_MEANWHILE, 409, viewer)
        return RedirectResponse(f"/consents?for={terms.patient}&revoked=1", 303)

    page = portal.page
    router.add_api_route("/consents", page(consents, residents_only=True), methods=["GET"])
    router.add_api_route("/consents", page(grant, residents_only=True), methods=["POST"])
    router.add_api_route("/consents/new", page(new_consent, residents_only=True), methods=["GET"])
    router.add_api_route(
        "/consents/recipients", page(recipients, residents_only=True), methods=["GET"]
    )
    router.add_api_route(
        "/consents/{consent_id}/revoke", page(revoke, residents_only=True), methods=["POST"]
    )
    return router


def _form_page(
    portal: Portal,
    call: Call,
    context: AccessContext,
    patient: str,
    query: str,
    errors: dict[str, str],
    form: Any,
    status: int = 200,
) -> Response:
    def values(name: str) -> list[str]:
        return list(form.get(name) or [])

    chosen = (values("recipient") or [""])[0]
    results = _search(portal, context, query)
    if chosen and chosen not in {r.reference for r in results}:
        known = _recipient(portal, context, chosen)
        results = [known, *results] if known else results
    return portal.render(
        call.request,
        "consent_new.html",
        call.viewer,
        status,
        patient=patient,
        patients=portal.patient_choices(call.viewer, context),
        q=query,
        results=results,
        chosen=chosen,
        errors=errors,
        scope=(values("scope") or [ALL])[0],
        categories=set(values("category")),
        sensitive=set(values("sensitive")),
        end=(values("end") or [""])[0],
        all_scope=ALL,
        some_scope=SOME,
        data_categories=[(c.code, i18n.pick(c.name_zh, c.name_en)) for c in CATEGORIES],
        sensitive_categories=[(c.label, i18n.pick(c.name_zh, c.name_en)) for c in SENSITIVE],
    )


def _search(portal: Portal, context: AccessContext, query: str) -> list[Recipient]:
    """Organizations and practitioners whose name contains the query."""
    if not query:
        return []
    found = []
    for rtype in RECIPIENT_TYPES:
        params = [("name:contains", query), ("_count", str(_RESULTS))]
        result = portal.engine.search(context, portal.engine.parse_search(rtype, params))
        for hit in result.matches:
            name = display_name(jsonio.loads(hit.body))
            found.append(Recipient(f"{rtype}/{hit.id}", name or hit.id, rtype))
    return found


def _recipient(portal: Portal, context: AccessContext, reference: str) -> Recipient | None:
    rtype, _, rid = reference.partition("/")
    if rtype not in RECIPIENT_TYPES:
        return None
    try:
        stored = portal.engine.repository.read(context, rtype, rid)
    except FhirError as error:
        if error.status in (404, 410):
            return None
        raise
    name = display_name(jsonio.loads(stored.body or "{}"))
    return Recipient(reference, name or reference, rtype)


def _row(consent_id: str, body: dict[str, Any], now: datetime) -> ConsentRow | None:
    terms = read_consent(body)
    if terms is None:
        return None  # another kind of Consent: the portal does not show what it cannot explain
    if terms.status != ACTIVE:
        state = "revoked"
    elif terms.in_force(now):
        state = "in_force"
    else:
        state = "expired"
    chosen = [c for c in CATEGORY_BY_CODE.values() if c.code in (terms.categories or ())]
    data = tuple(i18n.pick(c.name_zh, c.name_en) for c in chosen)
    sensitive = tuple(
        i18n.pick(c.name_zh, c.name_en) for c in SENSITIVE if c.label in terms.sensitive
    )
    return ConsentRow(consent_id, terms, state, data, sensitive)
