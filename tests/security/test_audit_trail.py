"""Every action leaves its AuditEvent: reads and searches once read, writes in their own
transaction, refusals and failures in a transaction of their own; system sign-ins too. Each
record holds who, role, organization, what, patient, purpose of use, legal basis, client
address and outcome, and is valid R4 (both databases)."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient

from access_tokens import bearer
from cityhealth.fhir.access import SYSTEM
from cityhealth.fhir.engine import FhirEngine
from cityhealth.security.audit import verify
from cityhealth.security.audit_events import LEGAL_BASIS
from cityhealth.security.roles import ROLES

DCM = "http://dicom.nema.org/resources/ontology/DCM"


def uid() -> str:
    return uuid.uuid4().hex[:12]


@dataclass
class Scene:
    http: TestClient
    engine: FhirEngine
    hospital: str
    alice: str
    bob: str
    alice_visit: str
    bob_visit: str

    def his(self) -> dict[str, str]:
        return bearer(
            self.http.app, organization=f"Organization/{self.hospital}", client_id="his-audit"
        )  # type: ignore[arg-type]

    def resident(self, pid: str) -> dict[str, str]:
        return bearer(
            self.http.app,
            "resident",
            who=f"Patient/{pid}",
            scopes=("patient/*.read", "patient/Consent.write"),
        )  # type: ignore[arg-type]

    def events(self, **criteria: str) -> list[dict[str, Any]]:
        """AuditEvents (newest first), as the platform finds them in the store."""
        params = [*criteria.items(), ("_sort", "-date"), ("_count", "200")]
        request = self.engine.parse_search("AuditEvent", params)
        import orjson

        return [orjson.loads(hit.body) for hit in self.engine.search(SYSTEM, request).matches]


def make(http: TestClient, resource: dict[str, Any], headers: dict[str, str]) -> str:
    answer = http.post(f"/fhir/{resource['resourceType']}", json=resource, headers=headers)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


def visit(patient: str, org: str) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": f"Patient/{patient}"},
        "serviceProvider": {"reference": f"Organization/{org}"},
    }


@pytest.fixture(scope="module")
def scene(client: TestClient) -> Iterator[Scene]:
    engine: FhirEngine = client.app.state.engine  # type: ignore[attr-defined]
    hospital = make(client, {"resourceType": "Organization", "name": f"医院 {uid()}"}, {})
    his = bearer(client.app, organization=f"Organization/{hospital}", client_id="his-audit")  # type: ignore[arg-type]
    alice = make(client, {"resourceType": "Patient", "name": [{"family": "马"}]}, his)
    bob = make(client, {"resourceType": "Patient", "name": [{"family": "赵"}]}, his)
    yield Scene(
        client,
        engine,
        hospital,
        alice,
        bob,
        make(client, visit(alice, hospital), his),
        make(client, visit(bob, hospital), his),
    )


def requestor(event: dict[str, Any]) -> dict[str, Any]:
    return next(a for a in event["agent"] if a.get("requestor"))


def patients_named(event: dict[str, Any]) -> set[str]:
    return {
        e["what"]["reference"]
        for e in event.get("entity", [])
        if e.get("what", {}).get("reference", "").startswith("Patient/")
    }


def test_a_read_is_recorded_with_who_what_whom_why_and_from_where(scene: Scene) -> None:
    answer = scene.http.get(f"/fhir/Encounter/{scene.alice_visit}", headers=scene.his())
    assert answer.status_code == 200
    (event, *_) = scene.events(entity=f"Encounter/{scene.alice_visit}", action="R")
    agent = requestor(event)
    assert agent["who"]["reference"] == "Device/his-audit"
    assert agent["role"][0]["coding"][0]["code"] == "system"
    assert agent["network"]["address"] == "testclient"
    assert agent["policy"] == [f"{LEGAL_BASIS}#medical-care"]
    assert {"who": {"reference": f"Organization/{scene.hospital}"}, "requestor": False} in event[
        "agent"
    ]
    assert patients_named(event) == {f"Patient/{scene.alice}"}
    assert event["outcome"] == "0" and event["subtype"][0]["code"] == "read"
    assert event["purposeOfEvent"][0]["coding"][0]["code"] == "TREAT"


def test_a_search_over_two_patients_gives_each_a_record_of_their_own(scene: Scene) -> None:
    query = f"_id={scene.alice_visit},{scene.bob_visit}"
    assert scene.http.get(f"/fhir/Encounter?{query}", headers=scene.his()).status_code == 200
    alices = scene.events(patient=scene.alice, subtype="search")[0]
    bobs = scene.events(patient=scene.bob, subtype="search")[0]
    assert patients_named(alices) == {f"Patient/{scene.alice}"}
    assert scene.bob_visit not in str(alices) and scene.bob not in str(alices)
    assert scene.alice_visit not in str(bobs) and scene.alice not in str(bobs)
    # The query itself is in a record that names no patient, for the auditors.
    summary = next(e for e in scene.events(subtype="search") if not patients_named(e))
    (queried,) = [e for e in summary["entity"] if "query" in e]
    assert scene.bob_visit in base64.b64decode(queried["query"]).decode()


def test_a_write_and_its_record_commit_together_and_a_refusal_is_recorded_alone(
    scene: Scene,
) -> None:
    bad = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": visit(scene.alice, scene.hospital),
                "request": {"method": "POST", "url": "Encounter"},
            },
            {
                "resource": {"resourceType": "Encounter", "status": "no-such-status"},
                "request": {"method": "POST", "url": "Encounter"},
            },
        ],
    }
    before = len(scene.events(patient=scene.alice, action="C"))
    assert scene.http.post("/fhir", json=bad, headers=scene.his()).status_code == 400
    assert len(scene.events(patient=scene.alice, action="C")) == before  # nothing written
    refused = scene.events(subtype="transaction")[0]
    assert refused["outcome"] == "4"
    good = scene.http.post(
        "/fhir/Encounter", json=visit(scene.alice, scene.hospital), headers=scene.his()
    )
    created = good.json()["id"]
    (event,) = scene.events(entity=f"Encounter/{created}", action="C")
    assert patients_named(event) == {f"Patient/{scene.alice}"}


def test_a_denied_attempt_is_recorded_without_telling_whose_record_it_was(scene: Scene) -> None:
    alice = scene.resident(scene.alice)
    assert scene.http.get(f"/fhir/Encounter/{scene.bob_visit}", headers=alice).status_code == 404
    denied = scene.events(agent=f"Patient/{scene.alice}", outcome="4")[0]
    assert denied["subtype"][0]["code"] == "read"
    assert f"Encounter/{scene.bob_visit}" in str(denied)
    assert patients_named(denied) == set()
    writes = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}
    assert scene.http.post("/fhir/Observation", json=writes, headers=alice).status_code == 403
    assert (
        scene.events(agent=f"Patient/{scene.alice}", outcome="4")[0]["subtype"][0]["code"]
        == "create"
    )


def test_export_kick_off_and_downloads_are_recorded(scene: Scene) -> None:
    kick = scene.http.get(
        "/fhir/Patient/$export?_type=Encounter", headers={**scene.his(), "Prefer": "respond-async"}
    )
    assert kick.status_code == 202, kick.text
    event = next(e for e in scene.events(subtype="operation") if "$export" in str(e))
    assert requestor(event)["who"]["reference"] == "Device/his-audit"


def test_a_system_signs_in_with_its_credentials_and_it_is_recorded(scene: Scene) -> None:
    accounts = scene.http.app.state.security.accounts  # type: ignore[attr-defined]
    client_id = f"lis-{uid()}"
    _, secret = accounts.create_client(
        client_id,
        name="LIS",
        kind="confidential",
        scopes="system/*.*",
        role="system",
        organization=f"Organization/{scene.hospital}",
    )
    ok = scene.http.post(
        "/oauth/token",
        data={"grant_type": "client_credentials"},
        auth=(client_id, secret),
        headers={"Authorization": ""},
    )
    assert ok.status_code == 200, ok.text
    bad = scene.http.post(
        "/oauth/token",
        data={"grant_type": "client_credentials"},
        auth=(client_id, "wrong"),
        headers={"Authorization": ""},
    )
    assert bad.status_code == 401
    events = scene.events(agent=f"Device/{client_id}")
    assert [e["outcome"] for e in events[:2]] == ["4", "0"]
    assert all(
        e["type"]["code"] == "110114" and e["subtype"][0] == {"system": DCM, "code": "110122"}
        for e in events[:2]
    )


def test_every_recorded_event_is_valid_r4_and_the_chain_holds(scene: Scene) -> None:
    events = scene.events()
    assert len(events) >= 10
    for event in events:
        scene.engine.repository.validate(event, "AuditEvent")
        assert requestor(event)["role"][0]["coding"][0]["code"] in {*ROLES, "unknown"}
    assert verify(scene.engine.db) == []
