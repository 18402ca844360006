"""Retention of the audit trail: records of access kept ≥ 6 months, the others ≥ 3 years;
pruning removes only the expired start of the chain, which stays verifiable (both databases)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from sqlalchemy import delete, select

from cityhealth.config import Settings
from cityhealth.fhir.access import SYSTEM, AccessContext
from cityhealth.fhir.clock import now_us
from cityhealth.fhir.engine import FhirEngine
from cityhealth.security.audit import prune, record, verify
from cityhealth.security.audit_events import RESTFUL, audit_event
from cityhealth.security.schema import audit_anchor, audit_chain

DAY = 86_400_000_000
NURSE = AccessContext(who="Practitioner/n1", role="nurse", organization="Organization/h1")


def write_events(engine: FhirEngine, interactions: list[str]) -> list[str]:
    ids = []
    with engine.db.write() as conn:
        for interaction in interactions:
            event = audit_event(NURSE, interaction, (RESTFUL, interaction), patients=["p1"])
            ids.append(record(engine.repository, conn, event).id)
    engine.repository.settle_audit()  # chained, as the server's settler does within a second
    return ids


def stored(engine: FhirEngine) -> set[str]:
    with engine.db.read() as conn:
        rows = conn.execute(select(audit_chain.c.event_id)).all()
    return {row.event_id.removeprefix("AuditEvent/") for row in rows}


def test_the_settings_refuse_less_than_the_law_requires() -> None:
    with pytest.raises(ValidationError):
        Settings(audit_access_days=30)
    with pytest.raises(ValidationError):
        Settings(audit_processing_days=365)
    assert Settings().audit_access_days >= 183 and Settings().audit_processing_days >= 1095


def test_pruning_removes_the_expired_start_of_the_chain_only(engine: FhirEngine) -> None:
    reads = write_events(engine, ["read", "search", "read"])
    (write,) = write_events(engine, ["update"])
    later = write_events(engine, ["read"])
    now = now_us()
    assert prune(engine.db, now + 100 * DAY, 183, 1095) == 0  # nothing has expired yet
    # Seven months on, the first three reads go; the write keeps itself and what follows.
    assert prune(engine.db, now + 210 * DAY, 183, 1095) == 3
    left = stored(engine)
    assert not left & set(reads) and {write, *later} <= left
    request = engine.parse_search("AuditEvent", [("_id", ",".join(reads))])
    assert engine.search(SYSTEM, request).matches == []
    assert verify(engine.db) == []
    write_events(engine, ["read"])  # the chain goes on from where it now starts
    assert verify(engine.db) == []
    # Four years on, everything has expired.
    assert prune(engine.db, now + 4 * 365 * DAY, 183, 1095) == len(left) + 1
    assert stored(engine) == set() and verify(engine.db) == []
    with engine.db.read() as conn:
        anchors = conn.execute(select(audit_anchor.c.events).order_by(audit_anchor.c.seq)).all()
    assert [a.events for a in anchors] == [3, len(left) + 1]


def test_removing_a_kept_row_after_pruning_is_still_found(engine: FhirEngine) -> None:
    first, _ = write_events(engine, ["read", "read"])
    with engine.db.write() as conn:
        conn.execute(delete(audit_chain).where(audit_chain.c.event_id == f"AuditEvent/{first}"))
    problems = verify(engine.db)
    assert problems and any("missing" in p.what or "follow" in p.what for p in problems)
