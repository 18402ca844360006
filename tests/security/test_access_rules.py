"""The engine's access rules over the FHIR API, each path granting and denying (both databases).

The city of the tests: hospitals A and B and pharmacy P, each writing through its own system
(HIS); resident 爱丽 (alice) with her son, resident 博文 (bob); doctor A at A, doctor B at B,
a nurse at A, a pharmacist at P; a regulator; the administrators. Records carry the holding
institution the engine stamps on them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx import Response

from access_tokens import bearer
from cityhealth.security.consent_shape import ConsentTerms, consent_resource
from cityhealth.security.visibility import HOLDER

LAB = {
    "coding": [
        {
            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": "laboratory",
        }
    ]
}
PSY = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "PSY"}
REVIEW = "https://cityhealth.cn/fhir/CodeSystem/audit-review|pending"


def uid() -> str:
    return uuid.uuid4().hex[:12]


@dataclass
class City:
    http: TestClient
    a: str  # Organization ids
    b: str
    p: str
    alice: str  # Patient ids
    son: str
    bob: str
    doc_a: str  # Practitioner ids
    doc_b: str
    nurse_a: str
    pharmacist: str
    alice_lab: str  # records held by B about alice
    alice_psych: str
    alice_visit_b: str
    bob_visit_a: str  # held by A about bob
    son_allergy: str

    def headers(self, role: str, **kw: Any) -> dict[str, str]:
        return bearer(self.http.app, role, **kw)  # type: ignore[arg-type]

    def his(self, org: str) -> dict[str, str]:
        return bearer(self.http.app, organization=f"Organization/{org}", client_id=f"his-{org}")  # type: ignore[arg-type]

    def resident(self, pid: str, child: str | None = None) -> dict[str, str]:
        scopes = ("patient/*.read", "patient/Consent.write")
        return self.headers(
            "resident",
            who=f"Patient/{pid}",
            patient=f"Patient/{child}" if child else None,
            scopes=scopes,
        )

    def staff(self, role: str, pid: str, org: str) -> dict[str, str]:
        scopes = ("user/*.read", "user/*.write")
        return self.headers(
            role, who=f"Practitioner/{pid}", organization=f"Organization/{org}", scopes=scopes
        )

    def doctor_a(self) -> dict[str, str]:
        return self.staff("doctor", self.doc_a, self.a)

    def doctor_b(self) -> dict[str, str]:
        return self.staff("doctor", self.doc_b, self.b)


def make(http: TestClient, resource: dict[str, Any], headers: dict[str, str] | None = None) -> str:
    response = http.post(f"/fhir/{resource['resourceType']}", json=resource, headers=headers or {})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def ids(response: Response) -> set[str]:
    assert response.status_code == 200, response.text
    return {e["resource"]["id"] for e in response.json().get("entry", [])}


def encounter(
    patient: str, status: str, org: str, practitioner: str | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "Encounter",
        "status": status,
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": f"Patient/{patient}"},
        "serviceProvider": {"reference": f"Organization/{org}"},
    }
    if practitioner:
        body["participant"] = [{"individual": {"reference": f"Practitioner/{practitioner}"}}]
    return body


@pytest.fixture(scope="module")
def city(client: TestClient) -> Iterator[City]:
    http = client
    org = {k: make(http, {"resourceType": "Organization", "name": f"{k} {uid()}"}) for k in "abp"}
    person = {
        k: make(http, {"resourceType": "Practitioner", "name": [{"family": k}]})
        for k in ("doc_a", "doc_b", "nurse_a", "pharmacist")
    }
    alice = make(
        http,
        {
            "resourceType": "Patient",
            "name": [{"family": "马", "given": ["爱丽"]}],
            "birthDate": "1990-05-17",
        },
    )
    son = make(http, {"resourceType": "Patient", "name": [{"family": "马", "given": ["小宝"]}]})
    bob = make(
        http,
        {
            "resourceType": "Patient",
            "name": [{"family": "赵", "given": ["博文"]}],
            "identifier": [{"system": "urn:id", "value": "110101199001011234"}],
        },
    )
    his_b = bearer(http.app, organization=f"Organization/{org['b']}", client_id="his-b")  # type: ignore[arg-type]
    his_a = bearer(http.app, organization=f"Organization/{org['a']}", client_id="his-a")  # type: ignore[arg-type]
    lab = {
        "resourceType": "Observation",
        "status": "final",
        "category": [LAB],
        "code": {"text": "血红蛋白"},
        "subject": {"reference": f"Patient/{alice}", "display": "马爱丽"},
    }
    psych = {**lab, "meta": {"security": [PSY]}, "code": {"text": "心理评估"}}
    yield City(
        http,
        org["a"],
        org["b"],
        org["p"],
        alice,
        son,
        bob,
        person["doc_a"],
        person["doc_b"],
        person["nurse_a"],
        person["pharmacist"],
        make(http, lab, his_b),
        make(http, psych, his_b),
        make(http, encounter(alice, "finished", org["b"]), his_b),
        make(http, encounter(bob, "finished", org["a"]), his_a),
        make(
            http,
            {
                "resourceType": "AllergyIntolerance",
                "patient": {"reference": f"Patient/{son}"},
                "code": {"text": "青霉素"},
            },
            his_a,
        ),
    )


def status(city: City, path: str, headers: dict[str, str]) -> int:
    return city.http.get(path, headers=headers).status_code


# -- holder stamp ----------------------------------------------------------------------------


def test_a_record_names_the_institution_holding_it_and_keeps_it(city: City) -> None:
    body = city.http.get(f"/fhir/Observation/{city.alice_lab}").json()
    assert {"system": HOLDER, "code": f"Organization/{city.b}"} in body["meta"]["tag"]
    # The platform updating it without the tag does not take the record from its holder.
    body.pop("meta")
    assert city.http.put(f"/fhir/Observation/{city.alice_lab}", json=body).status_code == 200
    again = city.http.get(f"/fhir/Observation/{city.alice_lab}").json()
    assert {"system": HOLDER, "code": f"Organization/{city.b}"} in again["meta"]["tag"]


def test_a_client_cannot_claim_another_holder(city: City) -> None:
    forged = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "x"},
        "meta": {"tag": [{"system": HOLDER, "code": f"Organization/{city.b}"}]},
        "subject": {"reference": f"Patient/{city.bob}"},
    }
    rid = make(city.http, forged, city.his(city.a))
    tags = city.http.get(f"/fhir/Observation/{rid}").json()["meta"]["tag"]
    assert [t["code"] for t in tags if t["system"] == HOLDER] == [f"Organization/{city.a}"]


# -- residents -------------------------------------------------------------------------------


def test_a_resident_sees_their_own_record_and_nobody_elses(city: City) -> None:
    me = city.resident(city.alice)
    assert status(city, f"/fhir/Patient/{city.alice}", me) == 200
    assert status(city, f"/fhir/Observation/{city.alice_lab}", me) == 200
    missing = city.http.get(f"/fhir/Patient/{uid()}", headers=me)
    forbidden = city.http.get(f"/fhir/Patient/{city.bob}", headers=me)
    assert forbidden.status_code == missing.status_code == 404
    assert forbidden.json()["issue"][0]["code"] == missing.json()["issue"][0]["code"]
    assert status(city, f"/fhir/Encounter/{city.bob_visit_a}", me) == 404
    assert status(city, f"/fhir/Encounter/{city.bob_visit_a}/_history/1", me) == 404
    assert status(city, f"/fhir/Encounter/{city.bob_visit_a}/_history", me) == 404
    assert status(city, f"/fhir/Patient/{city.bob}/$everything", me) == 404
    # The public directory is open to every signed-in resident.
    assert status(city, f"/fhir/Organization/{city.b}", me) == 200


def test_a_residents_searches_filter_counts_includes_chains_and_has(city: City) -> None:
    me, http = city.resident(city.alice), city.http
    assert ids(http.get("/fhir/Patient?_total=accurate", headers=me)) == {city.alice}
    assert http.get("/fhir/Patient?_summary=count", headers=me).json()["total"] == 1
    assert ids(http.get(f"/fhir/Patient?_id={city.bob}", headers=me)) == set()
    assert ids(http.get("/fhir/Encounter", headers=me)) == {city.alice_visit_b}
    assert ids(http.get("/fhir/Encounter?subject.family=赵", headers=me)) == set()
    assert ids(http.get("/fhir/Patient?_has:Encounter:patient:status=finished", headers=me)) == {
        city.alice
    }
    included = http.get("/fhir/Encounter?_include=Encounter:subject", headers=me).json()
    assert {e["resource"]["id"] for e in included["entry"]} == {city.alice_visit_b, city.alice}
    rev = http.get(
        f"/fhir/Patient?_id={city.alice},{city.bob}&_revinclude=Encounter:subject", headers=me
    )
    assert ids(rev) == {city.alice, city.alice_visit_b}
    everything = ids(http.get(f"/fhir/Patient/{city.alice}/$everything", headers=me))
    assert city.bob_visit_a not in everything and city.alice_lab in everything
    history = http.get("/fhir/Encounter/_history", headers=me).json()
    assert {e["resource"]["id"] for e in history.get("entry", []) if "resource" in e} == {
        city.alice_visit_b
    }
    system = http.get("/fhir?_type=Patient,Encounter", headers=me)
    assert ids(system) == {city.alice, city.alice_visit_b}


def test_a_guardian_sees_the_child_in_context(city: City) -> None:
    path = f"/fhir/AllergyIntolerance/{city.son_allergy}"
    assert status(city, path, city.resident(city.alice)) == 404
    assert status(city, path, city.resident(city.alice, child=city.son)) == 200


def test_a_resident_writes_only_consents_of_their_own(city: City) -> None:
    me = city.resident(city.alice)
    now = datetime.now(UTC)
    mine = consent_resource(
        ConsentTerms(
            f"Patient/{city.alice}",
            f"Patient/{city.alice}",
            f"Organization/{city.a}",
            "A",
            now,
            now + timedelta(days=1),
            None,
        )
    )
    rid = make(city.http, mine, me)
    revoke = city.http.get(f"/fhir/Consent/{rid}", headers=me).json() | {"status": "inactive"}
    assert city.http.put(f"/fhir/Consent/{rid}", json=revoke, headers=me).status_code == 200
    for_bob = {**mine, "patient": {"reference": f"Patient/{city.bob}"}}
    assert city.http.post("/fhir/Consent", json=for_bob, headers=me).status_code == 403
    obs = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "x"},
        "subject": {"reference": f"Patient/{city.alice}"},
    }
    assert city.http.post("/fhir/Observation", json=obs, headers=me).status_code == 403


# -- practitioners ---------------------------------------------------------------------------


def test_a_doctor_sees_the_records_their_institution_holds(city: City) -> None:
    assert status(city, f"/fhir/Encounter/{city.bob_visit_a}", city.doctor_a()) == 200
    assert status(city, f"/fhir/Observation/{city.alice_lab}", city.doctor_a()) == 404
    assert (
        ids(
            city.http.get(
                f"/fhir/Observation?subject=Patient/{city.alice}", headers=city.doctor_a()
            )
        )
        == set()
    )
    assert status(city, f"/fhir/Observation/{city.alice_lab}", city.doctor_b()) == 200


def test_a_treatment_relationship_opens_other_institutions_records_while_active(city: City) -> None:
    doc, path = city.doctor_a(), f"/fhir/Observation/{city.alice_lab}"
    assert status(city, path, doc) == 404
    visit = encounter(city.alice, "in-progress", city.a, city.doc_a)
    rid = make(city.http, visit, city.his(city.a))
    assert status(city, path, doc) == 200
    assert city.alice_visit_b in ids(
        city.http.get(f"/fhir/Encounter?subject=Patient/{city.alice}", headers=doc)
    )
    finished = {**visit, "id": rid, "status": "finished"}
    assert (
        city.http.put(f"/fhir/Encounter/{rid}", json=finished, headers=city.his(city.a)).status_code
        == 200
    )
    assert status(city, path, doc) == 404


def test_a_referral_relates_the_receiving_doctor(city: City) -> None:
    path = f"/fhir/Encounter/{city.alice_visit_b}"
    nurse = city.staff("nurse", city.nurse_a, city.a)
    assert status(city, path, nurse) == 404
    referral = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "3457005"}]}],
        "subject": {"reference": f"Patient/{city.alice}"},
        "performer": [{"reference": f"Practitioner/{city.nurse_a}"}],
    }
    make(city.http, referral, city.his(city.b))
    assert status(city, path, nurse) == 200


def test_consent_grant_access_revoke_denied_on_the_next_request(city: City) -> None:
    doc_b_lab = f"/fhir/Observation/{city.alice_lab}"
    doc = city.staff("doctor", uid(), city.p)  # a doctor at an institution without relation
    assert status(city, doc_b_lab, doc) == 404
    now = datetime.now(UTC)
    terms = ConsentTerms(
        f"Patient/{city.alice}",
        f"Patient/{city.alice}",
        f"Organization/{city.p}",
        "P",
        now - timedelta(minutes=1),
        now + timedelta(days=30),
        frozenset({"lab"}),
    )
    me = city.resident(city.alice)
    rid = make(city.http, consent_resource(terms), me)
    assert status(city, doc_b_lab, doc) == 200
    # Lab results only: not the visit, and not the sensitive (PSY) result she did not name.
    assert status(city, f"/fhir/Encounter/{city.alice_visit_b}", doc) == 404
    assert status(city, f"/fhir/Observation/{city.alice_psych}", doc) == 404
    assert ids(city.http.get(f"/fhir/Observation?subject=Patient/{city.alice}", headers=doc)) == {
        city.alice_lab
    }
    revoked = city.http.get(f"/fhir/Consent/{rid}", headers=me).json() | {"status": "inactive"}
    assert city.http.put(f"/fhir/Consent/{rid}", json=revoked, headers=me).status_code == 200
    assert status(city, doc_b_lab, doc) == 404


def test_break_glass_opens_the_record_for_a_time_logged_and_flagged(city: City) -> None:
    doc, http = city.doctor_a(), city.http
    path = f"/fhir/Observation/{city.alice_psych}"
    assert status(city, path, doc) == 404
    reason = {
        "resourceType": "Parameters",
        "parameter": [{"name": "reason", "valueString": "昏迷送医，需查过敏史"}],
    }
    assert (
        http.post(
            f"/fhir/Patient/{city.alice}/$break-glass",
            json={"resourceType": "Parameters"},
            headers=doc,
        ).status_code
        == 400
    )
    pharmacist = city.staff("pharmacist", city.pharmacist, city.p)
    assert (
        http.post(
            f"/fhir/Patient/{city.alice}/$break-glass", json=reason, headers=pharmacist
        ).status_code
        == 403
    )
    assert (
        http.post(f"/fhir/Patient/{uid()}/$break-glass", json=reason, headers=doc).status_code
        == 404
    )
    declared = http.post(f"/fhir/Patient/{city.alice}/$break-glass", json=reason, headers=doc)
    assert declared.status_code == 201, declared.text
    event_ref = declared.json()["parameter"][0]["valueReference"]["reference"]
    assert status(city, path, doc) == 200
    assert status(city, path, city.doctor_b()) == 200  # B holds it anyway
    other = city.staff("doctor", uid(), city.a)
    assert status(city, path, other) == 404  # the declaration opens it to its declarer only
    event = http.get(f"/fhir/{event_ref}").json()
    assert event["entity"][0]["what"]["reference"] == f"Patient/{city.alice}"
    assert event["entity"][0]["description"] == "昏迷送医，需查过敏史"
    assert {"BTG", "ETREAT"} <= {c["code"] for c in event["purposeOfEvent"][0]["coding"]}
    flagged = ids(http.get(f"/fhir/AuditEvent?_tag={REVIEW}"))
    assert event_ref.split("/")[1] in flagged
    engine = http.app.state.engine  # type: ignore[attr-defined]
    engine.policy.break_glass_minutes = 0  # the time is up
    try:
        assert status(city, path, doc) == 404
    finally:
        engine.policy.break_glass_minutes = 120


def test_a_pharmacist_sees_routed_prescriptions_and_what_their_review_needs(city: City) -> None:
    pharmacist = city.staff("pharmacist", city.pharmacist, city.p)
    allergy = make(
        city.http,
        {
            "resourceType": "AllergyIntolerance",
            "patient": {"reference": f"Patient/{city.bob}"},
            "code": {"text": "磺胺"},
        },
        city.his(city.b),
    )
    rx = {
        "resourceType": "MedicationRequest",
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": {"text": "阿莫西林"},
        "subject": {"reference": f"Patient/{city.bob}"},
        "dispenseRequest": {"performer": {"reference": f"Organization/{city.p}"}},
    }
    assert status(city, f"/fhir/AllergyIntolerance/{allergy}", pharmacist) == 404
    rx_id = make(city.http, rx, city.his(city.a))
    assert status(city, f"/fhir/MedicationRequest/{rx_id}", pharmacist) == 200
    assert status(city, f"/fhir/AllergyIntolerance/{allergy}", pharmacist) == 200
    assert status(city, f"/fhir/Patient/{city.bob}", pharmacist) == 200
    assert status(city, f"/fhir/Encounter/{city.bob_visit_a}", pharmacist) == 404  # not needed
    done = city.http.get(f"/fhir/MedicationRequest/{rx_id}", headers=pharmacist).json() | {
        "status": "completed"
    }
    assert (
        city.http.put(f"/fhir/MedicationRequest/{rx_id}", json=done, headers=pharmacist).status_code
        == 200
    )
    assert status(city, f"/fhir/AllergyIntolerance/{allergy}", pharmacist) == 404  # reviewed


def test_an_institution_changes_only_the_records_it_holds(city: City) -> None:
    record = city.http.get(f"/fhir/Encounter/{city.alice_visit_b}").json()
    record.pop("meta")
    assert (
        city.http.put(
            f"/fhir/Encounter/{city.alice_visit_b}", json=record, headers=city.doctor_b()
        ).status_code
        == 200
    )
    assert (
        city.http.put(
            f"/fhir/Encounter/{city.alice_visit_b}", json=record, headers=city.his(city.a)
        ).status_code
        == 403
    )
    # Deleting what the caller cannot see changes nothing: to them it is not there.
    stranger = city.staff("doctor", uid(), city.a)
    assert city.http.delete(
        f"/fhir/Encounter/{city.alice_visit_b}", headers=stranger
    ).status_code in (200, 204)
    assert status(city, f"/fhir/Encounter/{city.alice_visit_b}", city.doctor_b()) == 200


# -- regulators, administrators, scopes ---------------------------------------------------


def test_a_regulator_sees_de_identified_records_unless_investigating(city: City) -> None:
    regulator = city.headers(
        "regulator",
        who=f"Practitioner/{uid()}",
        organization=f"Organization/{city.a}",
        scopes=("user/*.read",),
        extra={"role_kind": "health_commission"},
    )
    body = city.http.get(f"/fhir/Patient/{city.bob}", headers=regulator).json()
    assert "name" not in body and "identifier" not in body
    lab = city.http.get(f"/fhir/Observation/{city.alice_lab}", headers=regulator).json()
    assert "display" not in lab["subject"]
    assert city.http.get("/fhir/Patient?family=赵", headers=regulator).status_code == 403
    counted = city.http.get("/fhir/Patient?_summary=count", headers=regulator).json()["total"]
    assert counted >= 3
    investigating = {**regulator, "X-Purpose-Of-Use": "HCOMPL", "X-Purpose-Reason": "case-2026-118"}
    named = city.http.get(f"/fhir/Patient/{city.bob}", headers=investigating).json()
    assert named["name"][0]["family"] == "赵"
    without_reason = {**regulator, "X-Purpose-Of-Use": "HCOMPL"}
    assert "name" not in city.http.get(f"/fhir/Patient/{city.bob}", headers=without_reason).json()


def test_administrators_see_no_clinical_record(city: City) -> None:
    platform = city.headers("platform_admin", who=f"Practitioner/{uid()}", scopes=("user/*.*",))
    assert status(city, f"/fhir/Organization/{city.a}", platform) == 200
    assert status(city, f"/fhir/Patient/{city.alice}", platform) == 404
    observation = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}
    assert (
        city.http.post("/fhir/Observation", json=observation, headers=platform).status_code == 403
    )
    auditor = city.headers(
        "audit_admin", who=f"Practitioner/{uid()}", scopes=("user/AuditEvent.rs",)
    )
    assert status(city, f"/fhir/Patient/{city.alice}", auditor) == 403
    assert city.http.get("/fhir/AuditEvent", headers=auditor).status_code == 200
    security = city.headers(
        "security_admin", who=f"Practitioner/{uid()}", scopes=("online_access",)
    )
    assert status(city, f"/fhir/Organization/{city.a}", security) == 403


def test_scopes_limit_every_interaction(city: City) -> None:
    observations_only = city.headers(
        "resident", who=f"Patient/{city.alice}", scopes=("patient/Observation.rs",)
    )
    assert status(city, f"/fhir/Observation/{city.alice_lab}", observations_only) == 200
    assert status(city, f"/fhir/Patient/{city.alice}", observations_only) == 403
    assert city.http.get("/fhir/Encounter", headers=observations_only).status_code == 403
    # A search across types, and includes, leave out the types the token does not cover.
    assert ids(city.http.get("/fhir?_type=Observation", headers=observations_only)) >= {
        city.alice_lab
    }
    included = city.http.get(
        "/fhir/Observation?_include=Observation:subject", headers=observations_only
    ).json()
    assert all(e["resource"]["resourceType"] == "Observation" for e in included["entry"])


def test_a_system_client_sees_what_its_organization_may(city: City) -> None:
    assert status(city, f"/fhir/Observation/{city.alice_lab}", city.his(city.b)) == 200
    assert status(city, f"/fhir/Observation/{city.alice_lab}", city.his(city.p)) == 404
    assert status(city, f"/fhir/Observation/{city.alice_lab}", city.http.headers) == 200  # type: ignore[arg-type]
