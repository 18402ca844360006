"""The access rules of the engine, defined once (DOMAIN.md "Security"; PIPL, 等保 level 3).

The repository asks this module, for every read, search, include, history, $everything,
export, bundle entry and write, what the caller may see (`Policy.visibility`) and whether a
write is allowed (`Policy.check_write`); routes never decide it.

- A resident sees their own compartment, and their child's when acting as guardian (the child
  is the patient in context of the token), plus the public directory and definitions.
- A doctor or nurse sees the records held by their organization; records of other
  institutions of patients they are in an active treatment relationship with (an Encounter,
  Appointment, referral or consultation, episode or care team naming them or their
  organization); what a resident's Consent in force grants them or their organization; and,
  after declaring an emergency (break-glass, cityhealth.security.break_glass), the whole
  record of that patient for a limited time, every access logged and flagged.
- A pharmacist sees the records held by their pharmacy and, for prescriptions routed to it,
  what reviewing them needs: the patient, their medications, allergies, conditions and
  observations.
- A regulator sees every record de-identified; identifiable records only when the request
  states an investigation (purpose of use and reason), which the audit trail keeps.
- A system client acting for an organization sees what that organization's staff would (no
  break-glass); a platform client without one sees everything its scopes allow.
- Administrators see the directory and definitions; the audit administrator sees the audit
  trail and nothing else; the security administrator sees no record (三员分立).
A forbidden record looks exactly like a missing one: reads answer 404, searches leave it out.
SMART scopes cut every rule down further: a type without a read scope is never seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection

from cityhealth.fhir import jsonio, store
from cityhealth.fhir.access import AccessContext
from cityhealth.fhir.errors import FhirError
from cityhealth.fhir.indexing import IndexRows
from cityhealth.fhir.store import Stored
from cityhealth.security.break_glass import open_emergencies
from cityhealth.security.care_links import ACTOR_TYPES, Link, Relation, links
from cityhealth.security.consent_shape import read_consent
from cityhealth.security.scopes import allows, parse_scopes
from cityhealth.security.visibility import HOLDER, Grant, Visibility, held_by

#: Types outside the patient compartment that every signed-in caller may read: the directory
#: of institutions and people, and definitions (codes, medicines, forms, profiles).
PUBLIC_TYPES = frozenset(
    {
        "Organization",
        "OrganizationAffiliation",
        "Location",
        "Practitioner",
        "PractitionerRole",
        "HealthcareService",
        "Endpoint",
        "InsurancePlan",
        "Medication",
        "MedicationKnowledge",
        "Substance",
        "CodeSystem",
        "ValueSet",
        "ConceptMap",
        "NamingSystem",
        "StructureDefinition",
        "StructureMap",
        "SearchParameter",
        "OperationDefinition",
        "CapabilityStatement",
        "CompartmentDefinition",
        "ImplementationGuide",
        "Questionnaire",
        "ActivityDefinition",
        "PlanDefinition",
        "ObservationDefinition",
        "SpecimenDefinition",
        "Library",
        "Measure",
    }
)

#: Relations of care that open a patient's whole record to the practitioners they name.
TREATMENT = (
    Relation(
        "encounter",
        "Encounter",
        ("participant", "service-provider"),
        ("planned", "arrived", "triaged", "in-progress", "onleave"),
    ),
    Relation(
        "appointment",
        "Appointment",
        ("actor",),
        ("proposed", "pending", "booked", "arrived", "checked-in", "waitlist"),
    ),
    Relation(
        "referral", "ServiceRequest", ("performer",), ("active", "on-hold")
    ),  # consultation too
    Relation("episode", "EpisodeOfCare", ("care-manager", "organization"), ("active",)),
    Relation("care-team", "CareTeam", ("participant",), ("active",)),  # a family doctor's team
)
#: What reviewing a prescription needs (处方审核): the patient, medicines, allergies, problems,
#: observations (weight, renal and liver function).
REVIEW_TYPES = frozenset(
    {
        "Patient",
        "MedicationRequest",
        "MedicationDispense",
        "MedicationStatement",
        "MedicationAdministration",
        "AllergyIntolerance",
        "Condition",
        "Observation",
    }
)
#: A prescription routed to a pharmacy names it as the intended dispenser.
DISPENSING = Relation(
    "dispensing", "MedicationRequest", ("intended-dispenser",), ("active", "on-hold"), REVIEW_TYPES
)

#: Every relation of care, whoever it opens records to.
RELATIONS = (*TREATMENT, DISPENSING)
_RELATION_TYPES = frozenset(relation.rtype for relation in RELATIONS)

#: Purposes of use (v3-PurposeOfUse) under which a regulator, giving a reason, sees
#: identifiable records: compliance and legal investigations, fraud, public-health cases.
INVESTIGATION_PURPOSES = frozenset({"HCOMPL", "HLEGAL", "FRAUD", "PUBHLTH"})


@dataclass(frozen=True)
class Rules:
    everything: bool = False
    public: bool = True
    own_compartments: bool = False
    holder: bool = False
    relations: tuple[Relation, ...] = ()
    consents: bool = False
    break_glass: bool = False
    only_types: frozenset[str] | None = None
    deidentified: bool = False

    @property
    def clinical(self) -> bool:
        """Whether the role reaches patients' records at all (not only the directory)."""
        return self.everything or self.own_compartments or self.holder


#: The Consents naming one of the actors (`named`: one condition per actor); a fixed statement
#: per number of actors, so that it is prepared once rather than built at every request.
_CONSENTS = (
    "SELECT r.body FROM resource r WHERE r.type = 'Consent' AND NOT r.deleted"
    " AND (r.shard, r.rid) IN (SELECT k.shard, k.rid FROM idx_reference k"
    " WHERE k.rtype = 'Consent' AND k.param = 'actor' AND ({named}))"
)


def rules_for(ctx: AccessContext) -> Rules:
    role = ctx.role
    if role == "resident":
        return Rules(own_compartments=True)
    if role in ("doctor", "nurse"):
        return Rules(holder=True, relations=TREATMENT, consents=True, break_glass=True)
    if role == "pharmacist":
        return Rules(holder=True, relations=(DISPENSING,))
    if role == "system":
        if ctx.organization:
            return Rules(holder=True, relations=RELATIONS, consents=True)
        return Rules(everything=True)
    if role == "regulator":
        investigating = ctx.purpose in INVESTIGATION_PURPOSES and bool(ctx.reason)
        return Rules(everything=True, deidentified=not investigating)
    if role == "audit_admin":
        return Rules(everything=True, public=False, only_types=frozenset({"AuditEvent"}))
    if role in ("platform_admin", "institution_admin"):
        return Rules()
    return Rules(public=False)


@lru_cache(maxsize=256)
def readable_types(scopes: frozenset[str]) -> frozenset[str] | None:
    """The types some scope lets the caller read or search; None: every type."""
    parsed = parse_scopes(sorted(scopes)).resource
    seen = [s for s in parsed if s.interactions & {"r", "s"}]
    if any(s.resource_type == "*" for s in seen):
        return None
    return frozenset(s.resource_type for s in seen)


@lru_cache(maxsize=4096)
def _allowed(scopes: frozenset[str], rtype: str, interaction: str) -> bool:
    return allows(parse_scopes(sorted(scopes)).resource, rtype, interaction)


def forbidden(message: str) -> FhirError:
    return FhirError(403, "forbidden", message)


def _id(reference: str | None) -> str | None:
    return reference.partition("/")[2] or None if reference else None


class Policy:
    def __init__(self, break_glass_minutes: int = 120) -> None:
        self.break_glass_minutes = break_glass_minutes

    # -- scopes ---------------------------------------------------------------------------
    @staticmethod
    def require(ctx: AccessContext, rtype: str, interaction: str) -> None:
        """403 unless the caller's scopes grant `interaction` on `rtype` (scopes.INTERACTIONS)."""
        if not _allowed(ctx.scopes, rtype, interaction):
            raise forbidden(f"The access token does not allow {interaction} on {rtype}")

    # -- reading --------------------------------------------------------------------------
    def visibility(self, ctx: AccessContext, conn: Connection) -> Visibility:
        rules = rules_for(ctx)
        dialect = conn.dialect.name
        types = readable_types(ctx.scopes)
        if rules.only_types is not None:
            types = rules.only_types if types is None else types & rules.only_types
        if rules.everything:
            return Visibility(
                dialect, everything=True, types=types, deidentified=rules.deidentified
            )
        actors = tuple(
            (kind, rid)
            for kind, rid in (
                ctx.who.partition("/")[::2],
                ("Organization", _id(ctx.organization) or ""),
            )
            if kind in ACTOR_TYPES and rid
        )
        patients = set()
        if rules.own_compartments:
            patients |= {p for p in (_id(ctx.who), _id(ctx.patient)) if p}
        return Visibility(
            dialect,
            types=types,
            public_types=PUBLIC_TYPES if rules.public else frozenset(),
            patients=frozenset(patients),
            holder=ctx.organization if rules.holder else None,
            relations=rules.relations,
            actors=actors,
            consents=(lambda: self.grants(actors, conn)) if rules.consents and actors else None,
            emergencies=(
                (lambda: frozenset(self.emergency_patients(ctx, conn)))
                if rules.break_glass
                else None
            ),
        )

    @staticmethod
    def care_links(rtype: str, rows: IndexRows, patients: set[str]) -> list[Link]:
        """The relations of care a resource with these index rows establishes (stored with it,
        read by `Visibility` for whoever it relates)."""
        return links(RELATIONS, rtype, rows, patients) if rtype in _RELATION_TYPES else []

    @staticmethod
    def grants(actors: tuple[tuple[str, str], ...], conn: Connection) -> tuple[Grant, ...]:
        """The Consents in force that name one of `actors` as recipient (read on every request,
        so that a revocation takes effect on the next one)."""
        named = " OR ".join(["(k.target_type = ? AND k.target_id = ?)"] * len(actors))
        values = tuple(v for actor in actors for v in actor)
        rows = store.run(conn, _CONSENTS.format(named=named), values)
        now = datetime.now(UTC)
        recipients = {f"{kind}/{rid}" for kind, rid in actors}
        found = []
        for (body,) in rows:
            terms = read_consent(jsonio.loads(body))
            if terms and terms.in_force(now) and terms.recipient in recipients:
                patient = _id(terms.patient)
                if patient:
                    found.append(Grant(patient, terms))
        return tuple(found)

    def emergency_patients(self, ctx: AccessContext, conn: Connection) -> set[str]:
        return open_emergencies(conn, ctx.who, self.break_glass_minutes)

    # -- writing --------------------------------------------------------------------------
    def check_write(
        self,
        ctx: AccessContext,
        conn: Connection,
        rtype: str,
        interaction: str,
        patients: set[str],
        previous: Stored | None,
    ) -> None:
        """403 unless the caller may write this version: create, update (also patch) or delete
        `rtype` whose new version belongs to `patients`' compartments, over `previous`."""
        self.require(ctx, rtype, interaction)
        rules = rules_for(ctx)
        if rtype == "AuditEvent" and ctx.role != "system":
            # People's actions are recorded by the platform; systems report their own (ATNA).
            raise forbidden("Only systems may report AuditEvents")
        if rules.everything and rules.only_types is None and not rules.deidentified:
            return
        if rules.own_compartments:
            own = {p for p in (_id(ctx.who), _id(ctx.patient)) if p}
            if interaction != "delete" and not (patients and patients <= own):
                raise forbidden(f"A resident writes only records of their own ({rtype})")
            if (
                previous is not None
                and not previous.deleted
                and not self.visibility(ctx, conn).sees(conn, previous)
            ):
                raise forbidden(f"{rtype}/{previous.id} may not be changed")
            return
        live = previous is not None and not previous.deleted
        if rules.holder:
            if not live:
                return  # a new record is held by the writer's organization (stamp_holder)
            assert previous is not None and previous.body is not None
            if held_by(previous.body) == ctx.organization:
                return
            if (
                rules.relations == (DISPENSING,)
                and rtype == "MedicationRequest"
                and self.visibility(ctx, conn).sees(conn, previous)
            ):
                return  # the pharmacist's review changes the routed prescription's status
            raise forbidden(f"{rtype}/{previous.id} is held by another institution")
        if rules.public and rtype in PUBLIC_TYPES:
            if not live or ctx.role == "platform_admin":
                return
            assert previous is not None and previous.body is not None
            if held_by(previous.body) in (None, ctx.organization):
                return
        raise forbidden(f"This account may not write {rtype}")

    @staticmethod
    def stamp_holder(ctx: AccessContext, body: dict[str, Any], previous: Stored | None) -> None:
        """Name the institution holding the record in meta.tag: the writer's organization for a
        new record; a changed record keeps its holder. The platform itself (no organization)
        may load records on behalf of the institution their tag names."""
        kept = held_by(previous.body) if previous is not None and previous.body else None
        holder = kept or ctx.organization
        if holder is None:
            return
        meta = dict(body.get("meta") or {})
        tags = [
            t
            for t in meta.get("tag") or ()
            if not (isinstance(t, dict) and t.get("system") == HOLDER)
        ]
        meta["tag"] = [*tags, {"system": HOLDER, "code": holder}]
        body["meta"] = meta
