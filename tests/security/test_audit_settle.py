"""AuditEvents are written with the action they record and queued; `settle` indexes, keeps in
history and chains them in the order they were written, on both databases."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from sqlalchemy import func, select, text

from cityhealth.fhir.access import SYSTEM, AccessContext
from cityhealth.fhir.engine import FhirEngine
from cityhealth.fhir.errors import FhirError
from cityhealth.fhir.schema import idx_reference, resource_history
from cityhealth.security import audit
from cityhealth.security.audit import Settler, queued, record, verify
from cityhealth.security.audit_events import RESTFUL, audit_event, record_patients
from cityhealth.security.schema import audit_chain

NURSE = AccessContext("Practitioner/nurse-9", "nurse", "Organization/h-9")


def write(engine: FhirEngine, patient: str) -> str:
    event = audit_event(NURSE, "read", (RESTFUL, "read"), patients=[patient])
    with engine.db.write() as conn:
        return record(engine.repository, conn, event).id


def count(engine: FhirEngine, query: Any) -> int:
    with engine.db.read() as conn:
        return int(conn.execute(query).scalar_one())


def indexed(engine: FhirEngine, event_id: str) -> bool:
    i = idx_reference
    rows = select(func.count()).where(
        i.c.rtype == "AuditEvent", i.c.param == "patient", i.c.rid == _rid(engine, event_id)
    )
    return count(engine, rows) == 1


def _rid(engine: FhirEngine, event_id: str) -> int:
    with engine.db.read() as conn:
        sql = text("SELECT rid FROM resource WHERE type = 'AuditEvent' AND id = :i")
        return int(conn.execute(sql, {"i": event_id}).scalar_one())


def chain(engine: FhirEngine) -> list[str]:
    with engine.db.read() as conn:
        rows = conn.execute(select(audit_chain.c.event_id).order_by(audit_chain.c.seq)).all()
    return [row.event_id.removeprefix("AuditEvent/") for row in rows]


@pytest.fixture(autouse=True)
def settled(engine: FhirEngine) -> None:
    engine.repository.settle_audit()


def test_a_record_is_stored_with_its_action_then_indexed_and_chained_in_order(
    engine: FhirEngine,
) -> None:
    ids = [write(engine, f"p-{n}") for n in range(3)]
    # Stored and readable at once; queued for the rest.
    assert all(engine.repository.read(SYSTEM, "AuditEvent", i).body for i in ids)
    assert queued(engine.db) == 3
    assert not any(indexed(engine, i) for i in ids)
    assert not set(ids) & set(chain(engine))
    assert verify(engine.db) == []  # queued events are not "outside the trail"

    assert engine.repository.settle_audit() == 3
    assert queued(engine.db) == 0
    assert all(indexed(engine, i) for i in ids)
    assert chain(engine)[-3:] == ids
    assert verify(engine.db) == []
    assert engine.repository.settle_audit() == 0  # nothing twice


def test_a_record_is_its_only_version_in_every_history(engine: FhirEngine) -> None:
    ids = [write(engine, f"p-h{n}") for n in range(2)]
    copies = select(func.count()).where(
        resource_history.c.type == "AuditEvent", resource_history.c.id.in_(ids)
    )
    assert count(engine, copies) == 0  # no second copy: the current row is the version
    body = engine.repository.read(SYSTEM, "AuditEvent", ids[0]).body
    assert engine.repository.vread(SYSTEM, "AuditEvent", ids[0], "1").body == body
    with pytest.raises(FhirError):
        engine.repository.vread(SYSTEM, "AuditEvent", ids[0], "2")
    instance = engine.history(SYSTEM, [], "AuditEvent", ids[0]).entries
    assert [(e.id, e.version, e.method) for e in instance] == [(ids[0], 1, "POST")]
    of_type = engine.history(SYSTEM, [("_count", "2")], "AuditEvent")
    assert [e.id for e in of_type.entries] == ids[::-1] and of_type.total is not None
    patient = engine.repository.create(SYSTEM, {"resourceType": "Patient"}).stored
    system = engine.history(SYSTEM, [("_count", "3")]).entries
    assert [e.id for e in system] == [patient.id, *ids[::-1]]


def test_a_rolled_back_action_leaves_no_queued_record(engine: FhirEngine) -> None:
    event = audit_event(NURSE, "read", (RESTFUL, "read"), patients=["p-x"])
    with pytest.raises(RuntimeError), engine.db.write() as conn:
        record(engine.repository, conn, event)
        raise RuntimeError("the action failed")
    assert queued(engine.db) == 0
    assert engine.repository.settle_audit() == 0


def test_a_search_of_the_trail_finds_what_was_just_written(engine: FhirEngine) -> None:
    event_id = write(engine, "p-search")
    request = engine.parse_search("AuditEvent", [("patient", "p-search")])
    found = engine.search(SYSTEM, request)
    assert [hit.id for hit in found.matches] == [event_id]
    assert queued(engine.db) == 0


def test_writers_at_once_all_get_chained_once(engine: FhirEngine) -> None:
    before = len(chain(engine))
    ids: list[str] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        for k in range(5):
            event_id = write(engine, f"p-{n}-{k}")
            with lock:
                ids.append(event_id)
            audit.settle(engine.repository, wait=False)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    engine.repository.settle_audit()
    chained = chain(engine)
    assert len(chained) == before + 20
    assert sorted(chained[before:]) == sorted(ids)
    assert verify(engine.db) == []


def test_the_settler_chains_in_the_background(engine: FhirEngine) -> None:
    settler = Settler(engine.repository, seconds=0.05)
    settler.start()
    try:
        event_id = write(engine, "p-bg")
        deadline = time.monotonic() + 10
        while queued(engine.db) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert queued(engine.db) == 0
        assert event_id in chain(engine)
    finally:
        settler.stop()
    settler.stop()  # stopping twice is harmless


def test_the_patients_of_a_record_are_its_patient_agents_and_entities() -> None:
    event = {
        "agent": [{"who": {"reference": "Patient/self"}}, {"who": {"reference": "Device/d"}}],
        "entity": [
            {"what": {"reference": "Patient/p1"}},
            {"what": {"reference": "Observation/o1"}},
            {"what": {"reference": "Patient/a/b"}},
            {"what": "not a reference"},
            {"query": "cXVlcnk="},
        ],
    }
    assert record_patients(event) == {"self", "p1"}
    assert record_patients({"agent": None, "entity": [None, 3]}) == set()
