"""Relations of care are stored with the resources that establish them (care_link), follow
their status, and the migration's rebuild derives the same rows from the stored index."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import text

from cityhealth.fhir.access import SYSTEM
from cityhealth.fhir.engine import FhirEngine
from cityhealth.fhir.indexing import IndexRows
from cityhealth.security.care_links import links, rebuild
from cityhealth.security.policy import RELATIONS


def _encounter(patient: str, status: str, **refs: Any) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "status": status,
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": f"Patient/{patient}"},
        **refs,
    }


def _stored_links(engine: FhirEngine) -> set[tuple[Any, ...]]:
    with engine.db.read() as conn:
        rows = conn.execute(
            text("SELECT rid, shard, rtype, relation, actor, patient_id FROM care_link")
        )
        return {tuple(row) for row in rows}


def test_links_come_from_a_relation_in_force_naming_practitioners_and_organizations() -> None:
    rows = IndexRows()
    rows.token.append(("status", "http://hl7.org/fhir/encounter-status", "in-progress", None))
    rows.reference += [
        ("participant", "Practitioner", "doc-1", None),
        ("participant", "PractitionerRole", "role-1", None),  # not an actor of the rules
        ("service-provider", "Organization", "h-1", None),
        ("subject", "Patient", "p-1", None),  # the patient, not an actor
    ]
    assert links(RELATIONS, "Encounter", rows, {"p-1"}) == [
        ("encounter", "Organization/h-1", "p-1"),
        ("encounter", "Practitioner/doc-1", "p-1"),
    ]
    assert links(RELATIONS, "Observation", rows, {"p-1"}) == []
    rows.token[0] = ("status", "http://hl7.org/fhir/encounter-status", "finished", None)
    assert links(RELATIONS, "Encounter", rows, {"p-1"}) == []


def test_links_follow_writes_and_a_rebuild_finds_the_same(engine: FhirEngine) -> None:
    patient, org, doc = (uuid.uuid4().hex for _ in range(3))
    repository = engine.repository
    repository.create(SYSTEM, {"resourceType": "Patient"}, rid=patient)
    refs = {
        "serviceProvider": {"reference": f"Organization/{org}"},
        "participant": [{"individual": {"reference": f"Practitioner/{doc}"}}],
    }
    visit = repository.create(SYSTEM, _encounter(patient, "in-progress", **refs)).stored
    mine = {row for row in _stored_links(engine) if row[5] == patient}
    assert {(row[0], row[3], row[4]) for row in mine} == {
        (visit.rid, "encounter", f"Organization/{org}"),
        (visit.rid, "encounter", f"Practitioner/{doc}"),
    }
    assert {row[1] for row in mine} == {visit.shard}

    everything = _stored_links(engine)
    with engine.db.write() as conn:
        rebuild(conn, RELATIONS)
    assert _stored_links(engine) == everything

    finished = {**_encounter(patient, "finished", **refs), "id": visit.id}
    repository.update(SYSTEM, "Encounter", visit.id, finished)
    assert not {row for row in _stored_links(engine) if row[5] == patient}
    reopened = {**finished, "status": "arrived"}
    repository.update(SYSTEM, "Encounter", visit.id, reopened)
    assert len({row for row in _stored_links(engine) if row[5] == patient}) == 2
    repository.delete(SYSTEM, "Encounter", visit.id)
    assert not {row for row in _stored_links(engine) if row[5] == patient}
