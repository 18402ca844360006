"""The audit trail's hash chain: `verify` finds every altered, removed, reordered or
slipped-in event, on both databases."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from typer.testing import CliRunner

from cityhealth.fhir.access import SYSTEM
from cityhealth.fhir.engine import FhirEngine
from cityhealth.security import audit
from cityhealth.security.cli import audit as audit_cli

_EVENT = "type = 'AuditEvent' AND id = :i"


def _event(n: int) -> dict[str, Any]:
    return {
        "resourceType": "AuditEvent",
        "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110110"},
        "recorded": f"2026-12-04T08:00:{n:02d}+08:00",
        "outcome": "0",
        "agent": [{"who": {"reference": "Practitioner/doc-1"}, "requestor": True}],
        "source": {"observer": {"display": "CityHealth"}},
        "entity": [{"what": {"reference": f"Patient/p-{n}"}}],
    }


@pytest.fixture(scope="module")
def chained(engine: FhirEngine) -> list[str]:
    ids = []
    for n in range(5):
        with engine.db.write() as conn:
            ids.append(audit.record(engine.repository, conn, _event(n)).id)
    assert audit.queued(engine.db) == 5  # written, not yet chained: not "outside the trail"
    assert audit.verify(engine.db) == []
    assert engine.repository.settle_audit() == 5
    assert audit.queued(engine.db) == 0
    return ids


@pytest.fixture
def tampering(engine: FhirEngine, chained: list[str]) -> Iterator[Any]:
    """Raw SQL on the database, undone after the test so that each case starts intact."""
    # Chain what earlier tests' requests queued first: the background settler must not chain
    # it after the chain is saved (the restored chain would leave it outside).
    engine.repository.settle_audit()
    assert audit.verify(engine.db) == []
    with engine.db.read() as conn:
        saved = conn.execute(text("SELECT * FROM audit_chain ORDER BY seq")).all()
        bodies = conn.execute(
            text("SELECT id, body, version FROM resource WHERE type = 'AuditEvent'")
        ).all()
    with engine.db.engine.connect() as raw:
        yield raw
        raw.rollback()
    with engine.db.write() as conn:
        conn.execute(text("DELETE FROM audit_chain"))
        for row in saved:
            conn.execute(
                text("INSERT INTO audit_chain VALUES (:s, :e, :r, :d, :p, :h)"),
                dict(zip("serdph", row, strict=True)),
            )
        for rid_id, body, version in bodies:
            conn.execute(
                text(f"UPDATE resource SET body = :b, version = :v, deleted = :d WHERE {_EVENT}"),
                {"b": body, "v": version, "d": False, "i": rid_id},
            )
    assert audit.verify(engine.db) == []


def _run(raw: Any, sql: str, **params: Any) -> None:
    raw.execute(text(sql), params)
    raw.commit()


def test_an_intact_trail_verifies(engine: FhirEngine, chained: list[str]) -> None:
    assert audit.verify(engine.db) == []
    assert engine.repository.read(SYSTEM, "AuditEvent", chained[0]).body


def test_an_altered_event_is_named(engine: FhirEngine, chained: list[str], tampering: Any) -> None:
    _run(
        tampering,
        f"UPDATE resource SET body = REPLACE(body, 'doc-1', 'doc-2') WHERE {_EVENT}",
        i=chained[2],
    )
    problems = audit.verify(engine.db)
    assert [(p.seq, p.event, p.what) for p in problems] == [
        (3, f"AuditEvent/{chained[2]}", "event altered")
    ]


def test_a_deleted_event_is_named(engine: FhirEngine, chained: list[str], tampering: Any) -> None:
    _run(tampering, f"UPDATE resource SET deleted = :d WHERE {_EVENT}", d=True, i=chained[0])
    problems = audit.verify(engine.db)
    assert [(p.seq, p.what) for p in problems] == [(1, "event removed")]


def test_the_api_appends_and_chains_but_never_changes(
    engine: FhirEngine, chained: list[str], client: TestClient
) -> None:
    posted = client.post("/fhir/AuditEvent", json=_event(30))
    assert posted.status_code == 201
    new_id = f"his-{uuid.uuid4().hex[:8]}"  # a hospital forwarding its own record: appending
    put = client.put(f"/fhir/AuditEvent/{new_id}", json={**_event(31), "id": new_id})
    assert put.status_code == 201
    event = posted.json()
    event["outcome"] = "8"
    assert client.put(f"/fhir/AuditEvent/{event['id']}", json=event).status_code == 405
    patch = [{"op": "replace", "path": "/outcome", "value": "8"}]
    response = client.patch(
        f"/fhir/AuditEvent/{event['id']}",
        content=json.dumps(patch),
        headers={"Content-Type": "application/json-patch+json"},
    )
    assert response.status_code == 405
    assert client.delete(f"/fhir/AuditEvent/{event['id']}").status_code == 405
    assert audit.verify(engine.db) == []  # the posted event is in the chain, unchanged
    statement = client.get("/fhir/metadata").json()
    (entry,) = [r for r in statement["rest"][0]["resource"] if r["type"] == "AuditEvent"]
    assert {i["code"] for i in entry["interaction"]}.isdisjoint({"update", "patch", "delete"})


def test_a_removed_row_is_found(engine: FhirEngine, chained: list[str], tampering: Any) -> None:
    _run(tampering, "DELETE FROM audit_chain WHERE seq = 2")
    problems = audit.verify(engine.db)
    assert problems and problems[0].seq == 3
    assert "missing" in problems[0].what
    assert any(p.seq is None and p.event == f"AuditEvent/{chained[1]}" for p in problems)


def test_reordered_rows_are_found(engine: FhirEngine, chained: list[str], tampering: Any) -> None:
    _run(tampering, "UPDATE audit_chain SET seq = -seq WHERE seq IN (3, 4)")
    _run(tampering, "UPDATE audit_chain SET seq = CASE seq WHEN -3 THEN 4 ELSE 3 END WHERE seq < 0")
    problems = audit.verify(engine.db)
    assert {p.seq for p in problems} >= {3, 4}
    assert any("reordered" in p.what or "altered" in p.what for p in problems)


def test_an_altered_chain_row_is_found(
    engine: FhirEngine, chained: list[str], tampering: Any
) -> None:
    _run(tampering, "UPDATE audit_chain SET recorded_at = recorded_at + 1 WHERE seq = 4")
    assert [(p.seq, p.what) for p in audit.verify(engine.db)] == [(4, "chain row altered")]


def test_the_command_fails_and_says_where(
    engine: FhirEngine, chained: list[str], tampering: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = engine.db.url.render_as_string(hide_password=False)
    monkeypatch.setenv("CITYHEALTH_DATABASE_URL", url)
    from cityhealth.config import get_settings

    get_settings.cache_clear()
    try:
        ok = CliRunner().invoke(audit_cli, ["verify"])
        assert ok.exit_code == 0, ok.output
        assert "intact" in ok.output
        _run(tampering, f"UPDATE resource SET version = 2 WHERE {_EVENT}", i=chained[4])
        bad = CliRunner().invoke(audit_cli, ["verify"])
    finally:
        get_settings.cache_clear()
    assert bad.exit_code == 1
    assert f"seq 5: AuditEvent/{chained[4]}: event altered" in bad.output
