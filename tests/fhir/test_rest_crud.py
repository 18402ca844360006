"""Create, read, vread, update, delete, history, conditional and patch interactions, Prefer,
$validate, content negotiation and the CapabilityStatement (hl7.org/fhir/R4/http.html)."""

from __future__ import annotations

import email.utils
import re
from datetime import datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import (
    FHIR_JSON,
    JSON_PATCH,
    assert_outcome,
    create,
    history_total,
    link,
    observation,
    patient,
    read,
    relative,
    system,
    total,
    unique,
)

VERSION_LOCATION = re.compile(
    r"^https?://[^/]+/fhir/Patient/([A-Za-z0-9\-.]{1,64})/_history/(\d+)$"
)


def _seconds(instant: str) -> datetime:
    return datetime.fromisoformat(instant).replace(microsecond=0)


def _history(client: TestClient, path: str) -> dict[str, Any]:
    response = client.get(path)
    assert response.status_code == 200, response.text
    bundle: dict[str, Any] = response.json()
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "history"
    return bundle


def _versions(bundle: dict[str, Any]) -> list[str]:
    return [e["response"]["etag"] for e in bundle.get("entry", [])]


# -- create / read / vread -------------------------------------------------------------------


def test_create_assigns_an_id_and_answers_201_with_version_headers(client: TestClient) -> None:
    family = unique("Create")
    response = client.post(
        "/fhir/Patient",
        json=patient(id="chosen-by-client", name=[{"family": family}], gender="female"),
    )
    assert response.status_code == 201, response.text
    assert response.headers["content-type"].startswith(FHIR_JSON)
    body = response.json()
    location = VERSION_LOCATION.match(response.headers["location"])
    assert location is not None, response.headers["location"]
    assert location.group(1) == body["id"]
    assert location.group(2) == "1"
    assert body["id"] != "chosen-by-client"
    assert response.headers["etag"] == 'W/"1"'
    assert body["meta"]["versionId"] == "1"
    assert body["name"] == [{"family": family}]
    modified = email.utils.parsedate_to_datetime(response.headers["last-modified"])
    assert modified == _seconds(body["meta"]["lastUpdated"])
    assert read(client, "Patient", body["id"]) == body


def test_decimal_precision_is_preserved(client: TestClient) -> None:
    # datatypes.html, decimal: the precision of the value is significant (0.010 is not 0.01).
    body = b'{"resourceType": "Observation", "status": "final", "code": {"text": "weight"},'
    body += b' "valueQuantity": {"value": 5.40, "unit": "kg"}}'
    response = client.post("/fhir/Observation", content=body, headers={"Content-Type": FHIR_JSON})
    assert response.status_code == 201, response.text
    assert b'"value":5.40' in response.content.replace(b" ", b"")
    stored = client.get(f"/fhir/Observation/{response.json()['id']}")
    assert b'"value":5.40' in stored.content.replace(b" ", b"")


def test_read_and_vread_answer_the_version_with_its_etag(client: TestClient) -> None:
    created = create(client, patient(name=[{"family": unique("Read")}]))
    rid = created["id"]
    response = client.get(f"/fhir/Patient/{rid}")
    assert response.status_code == 200
    assert response.headers["etag"] == 'W/"1"'
    assert response.headers["last-modified"]
    assert response.json() == created
    version = client.get(f"/fhir/Patient/{rid}/_history/1")
    assert version.status_code == 200
    assert version.headers["etag"] == 'W/"1"'
    assert version.json() == created
    assert_outcome(client.get(f"/fhir/Patient/{rid}/_history/2"), 404)


# -- update / delete -------------------------------------------------------------------------


def test_update_stores_version_2(client: TestClient) -> None:
    created = create(client, patient(name=[{"family": unique("Update")}], gender="male"))
    rid = created["id"]
    changed = {**created, "gender": "female"}
    response = client.put(f"/fhir/Patient/{rid}", json=changed)
    assert response.status_code == 200, response.text
    assert response.headers["etag"] == 'W/"2"'
    location = VERSION_LOCATION.match(response.headers["location"])
    assert location is not None and location.groups() == (rid, "2")
    body = response.json()
    assert body["meta"]["versionId"] == "2"
    assert body["gender"] == "female"
    assert read(client, "Patient", rid)["gender"] == "female"
    assert client.get(f"/fhir/Patient/{rid}/_history/1").json()["gender"] == "male"


def test_update_with_a_new_client_id_creates_the_resource(client: TestClient) -> None:
    rid = unique("client-id-")
    response = client.put(f"/fhir/Patient/{rid}", json=patient(id=rid, gender="other"))
    assert response.status_code == 201, response.text
    assert response.headers["etag"] == 'W/"1"'
    assert response.json()["id"] == rid
    assert read(client, "Patient", rid)["meta"]["versionId"] == "1"


def test_delete_leaves_a_gone_resource_whose_old_versions_stay_readable(
    client: TestClient,
) -> None:
    family = unique("Delete")
    rid = create(client, patient(name=[{"family": family}]))["id"]
    assert client.delete(f"/fhir/Patient/{rid}").status_code == 204
    assert_outcome(client.get(f"/fhir/Patient/{rid}"), 410)
    assert client.get(f"/fhir/Patient/{rid}/_history/1").status_code == 200
    assert total(client, "Patient", f"family={family}") == 0
    # Deleting what is already deleted changes nothing (http.html#delete).
    assert client.delete(f"/fhir/Patient/{rid}").status_code in (200, 204)
    assert _history(client, f"/fhir/Patient/{rid}/_history")["total"] == 2


def test_update_after_delete_brings_the_resource_back(client: TestClient) -> None:
    rid = create(client, patient(gender="male"))["id"]
    client.delete(f"/fhir/Patient/{rid}")
    response = client.put(f"/fhir/Patient/{rid}", json=patient(id=rid, gender="female"))
    assert response.status_code == 201, response.text
    assert response.json()["meta"]["versionId"] == "3"
    assert read(client, "Patient", rid)["gender"] == "female"


# -- history ---------------------------------------------------------------------------------


def test_instance_history_lists_every_version_newest_first(client: TestClient) -> None:
    created = create(client, patient(gender="male"))
    rid = created["id"]
    client.put(f"/fhir/Patient/{rid}", json={**created, "gender": "female"})
    client.put(f"/fhir/Patient/{rid}", json={**created, "gender": "other"})
    client.delete(f"/fhir/Patient/{rid}")
    bundle = _history(client, f"/fhir/Patient/{rid}/_history")
    assert bundle["total"] == 4
    assert _versions(bundle) == ['W/"4"', 'W/"3"', 'W/"2"', 'W/"1"']
    methods = [e["request"]["method"] for e in bundle["entry"]]
    assert methods == ["DELETE", "PUT", "PUT", "POST"]
    assert "resource" not in bundle["entry"][0]
    assert [e["resource"]["gender"] for e in bundle["entry"][1:]] == ["other", "female", "male"]
    assert_outcome(client.get(f"/fhir/Patient/{unique('never')}/_history"), 404)


def test_history_pages_with_count_and_next_links(client: TestClient) -> None:
    created = create(client, patient(gender="male"))
    rid = created["id"]
    for gender in ("female", "other", "unknown", "male"):
        client.put(f"/fhir/Patient/{rid}", json={**created, "gender": gender})
    bundle = _history(client, f"/fhir/Patient/{rid}/_history?_count=2")
    seen = _versions(bundle)
    assert len(bundle["entry"]) == 2
    while (url := link(bundle, "next")) is not None:
        bundle = _history(client, relative(url))
        assert len(bundle["entry"]) <= 2
        seen += _versions(bundle)
    assert seen == [f'W/"{v}"' for v in range(5, 0, -1)]


def test_history_since_and_at(client: TestClient) -> None:
    created = create(client, patient(gender="male"))
    rid = created["id"]
    second = client.put(f"/fhir/Patient/{rid}", json={**created, "gender": "female"}).json()
    client.put(f"/fhir/Patient/{rid}", json={**created, "gender": "other"})
    since = second["meta"]["lastUpdated"]
    bundle = _history(client, f"/fhir/Patient/{rid}/_history?_since={since.replace('+', '%2B')}")
    assert _versions(bundle) == ['W/"3"', 'W/"2"']
    at = _history(client, f"/fhir/Patient/{rid}/_history?_at={since.replace('+', '%2B')}")
    assert _versions(at) == ['W/"2"']
    future = _history(client, f"/fhir/Patient/{rid}/_history?_since=2999-01-01")
    assert future.get("entry", []) == []
    assert_outcome(client.get(f"/fhir/Patient/{rid}/_history?_since=yesterday"), 400)


def test_history_at_a_period_lists_every_version_current_during_it(client: TestClient) -> None:
    created = create(client, patient(gender="male"))
    rid = created["id"]
    client.put(f"/fhir/Patient/{rid}", json={**created, "gender": "female"})
    client.put(f"/fhir/Patient/{rid}", json={**created, "gender": "other"})
    year = created["meta"]["lastUpdated"][:4]
    bundle = _history(client, f"/fhir/Patient/{rid}/_history?_at={year}")
    assert _versions(bundle) == ['W/"3"', 'W/"2"', 'W/"1"']
    before = _history(client, f"/fhir/Patient/{rid}/_history?_at={int(year) - 1}")
    assert before.get("entry", []) == []


def test_type_and_system_history_since(client: TestClient) -> None:
    first = create(client, patient(gender="male"))
    since = first["meta"]["lastUpdated"].replace("+", "%2B")
    second = create(client, patient(gender="female"))
    obs = create(client, observation(unique("code")))
    patients = _history(client, f"/fhir/Patient/_history?_since={since}")
    assert patients["total"] == 2
    assert {e["resource"]["id"] for e in patients["entry"]} == {first["id"], second["id"]}
    everything = _history(client, f"/fhir/_history?_since={since}&_count=1000")
    # The system history holds the audit trail too: every request above left its AuditEvent.
    kinds = {e["resource"]["resourceType"] for e in everything["entry"]}
    assert kinds == {"Patient", "Observation", "AuditEvent"}
    assert everything["total"] == len(everything["entry"])
    data = [e for e in everything["entry"] if e["resource"]["resourceType"] != "AuditEvent"]
    assert [e["resource"]["id"] for e in data] == [obs["id"], second["id"], first["id"]]
    paged = _history(client, f"/fhir/_history?_since={since}&_count=1")
    assert len(paged["entry"]) == 1
    assert link(paged, "next") is not None


# -- resource contention and conditional interactions ---------------------------------------


def test_if_match_guards_updates(client: TestClient) -> None:
    created = create(client, patient(gender="male"))
    rid = created["id"]
    stale = client.put(
        f"/fhir/Patient/{rid}",
        json={**created, "gender": "female"},
        headers={"If-Match": 'W/"2"'},
    )
    assert_outcome(stale, 412)
    assert read(client, "Patient", rid)["meta"]["versionId"] == "1"
    current = client.put(
        f"/fhir/Patient/{rid}",
        json={**created, "gender": "female"},
        headers={"If-Match": 'W/"1"'},
    )
    assert current.status_code == 200, current.text
    assert current.headers["etag"] == 'W/"2"'


def test_if_none_exist_creates_returns_existing_or_refuses(client: TestClient) -> None:
    sys = system()
    criteria = f"identifier={sys}|a"
    headers = {"If-None-Exist": criteria}
    first = client.post(
        "/fhir/Patient", json=patient(identifier=[{"system": sys, "value": "a"}]), headers=headers
    )
    assert first.status_code == 201, first.text
    again = client.post(
        "/fhir/Patient",
        json=patient(identifier=[{"system": sys, "value": "a"}], gender="male"),
        headers=headers,
    )
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["meta"]["versionId"] == "1"
    assert "gender" not in read(client, "Patient", first.json()["id"])
    create(client, patient(identifier=[{"system": sys, "value": "a"}]))
    before = total(client, "Patient")
    third = client.post(
        "/fhir/Patient", json=patient(identifier=[{"system": sys, "value": "a"}]), headers=headers
    )
    assert_outcome(third, 412)
    assert total(client, "Patient") == before


def test_conditional_update_creates_updates_or_refuses(client: TestClient) -> None:
    sys = system()
    body = patient(identifier=[{"system": sys, "value": "x"}], gender="male")
    created = client.put(f"/fhir/Patient?identifier={sys}|x", json=body)
    assert created.status_code == 201, created.text
    rid = created.json()["id"]
    updated = client.put(f"/fhir/Patient?identifier={sys}|x", json={**body, "gender": "female"})
    assert updated.status_code == 200, updated.text
    assert updated.json()["id"] == rid
    assert updated.json()["meta"]["versionId"] == "2"
    create(client, body)
    before = history_total(client)
    refused = client.put(f"/fhir/Patient?identifier={sys}|x", json={**body, "gender": "other"})
    assert_outcome(refused, 412)
    assert history_total(client) == before
    assert read(client, "Patient", rid)["gender"] == "female"


def test_conditional_update_with_an_id_in_the_body(client: TestClient) -> None:
    sys = system()
    matched = create(client, patient(identifier=[{"system": sys, "value": "m"}]))["id"]
    other = create(client, patient(gender="male"))["id"]
    # One match, but the body names another resource: 400 (http.html#cond-update).
    wrong = client.put(f"/fhir/Patient?identifier={sys}|m", json=patient(id=other, gender="female"))
    assert_outcome(wrong, 400)
    assert read(client, "Patient", other)["gender"] == "male"
    assert read(client, "Patient", matched)["meta"]["versionId"] == "1"
    # No match and a new id: update as create with that id.
    rid = unique("cond-")
    created = client.put(f"/fhir/Patient?identifier={sys}|none", json=patient(id=rid))
    assert created.status_code == 201, created.text
    assert created.json()["id"] == rid


def test_conditional_delete(client: TestClient) -> None:
    sys = system()
    rid = create(client, patient(identifier=[{"system": sys, "value": "one"}]))["id"]
    assert client.delete(f"/fhir/Patient?identifier={sys}|one").status_code in (200, 204)
    assert client.get(f"/fhir/Patient/{rid}").status_code == 410
    before = history_total(client)
    assert client.delete(f"/fhir/Patient?identifier={sys}|none").status_code in (200, 204)
    assert history_total(client) == before
    twins = [create(client, patient(identifier=[{"system": sys, "value": "two"}])) for _ in "ab"]
    assert_outcome(client.delete(f"/fhir/Patient?identifier={sys}|two"), 412)
    for twin in twins:
        assert client.get(f"/fhir/Patient/{twin['id']}").status_code == 200


# -- Prefer ----------------------------------------------------------------------------------


def test_prefer_return_minimal_answers_without_a_body(client: TestClient) -> None:
    response = client.post(
        "/fhir/Patient", json=patient(gender="male"), headers={"Prefer": "return=minimal"}
    )
    assert response.status_code == 201
    assert response.content == b""
    location = VERSION_LOCATION.match(response.headers["location"])
    assert location is not None
    assert response.headers["etag"] == 'W/"1"'
    assert read(client, "Patient", location.group(1))["gender"] == "male"
    rid = location.group(1)
    update = client.put(
        f"/fhir/Patient/{rid}",
        json=patient(id=rid, gender="female"),
        headers={"Prefer": "return=minimal"},
    )
    assert update.status_code == 200
    assert update.content == b""
    assert update.headers["etag"] == 'W/"2"'


def test_prefer_return_representation_and_operation_outcome(client: TestClient) -> None:
    shown = client.post(
        "/fhir/Patient", json=patient(gender="male"), headers={"Prefer": "return=representation"}
    )
    assert shown.status_code == 201
    assert shown.json()["resourceType"] == "Patient"
    assert shown.json()["gender"] == "male"
    outcome = client.post(
        "/fhir/Patient", json=patient(gender="male"), headers={"Prefer": "return=OperationOutcome"}
    )
    assert outcome.status_code == 201
    assert outcome.json()["resourceType"] == "OperationOutcome"
    assert outcome.json()["issue"][0]["severity"] == "information"
    assert outcome.headers["location"]


# -- patch -----------------------------------------------------------------------------------


def test_json_patch(client: TestClient) -> None:
    rid = create(client, patient(gender="male", name=[{"family": "Li"}]))["id"]
    ops = b'[{"op": "replace", "path": "/gender", "value": "female"},'
    ops += b' {"op": "add", "path": "/name/0/given", "value": ["Lei"]}]'
    response = client.patch(
        f"/fhir/Patient/{rid}", content=ops, headers={"Content-Type": JSON_PATCH}
    )
    assert response.status_code == 200, response.text
    assert response.headers["etag"] == 'W/"2"'
    stored = read(client, "Patient", rid)
    assert stored["gender"] == "female"
    assert stored["name"] == [{"family": "Li", "given": ["Lei"]}]


def test_fhir_patch(client: TestClient) -> None:
    rid = create(client, patient(gender="male"))["id"]
    parameters = {
        "resourceType": "Parameters",
        "parameter": [
            {
                "name": "operation",
                "part": [
                    {"name": "type", "valueCode": "replace"},
                    {"name": "path", "valueString": "Patient.gender"},
                    {"name": "value", "valueCode": "unknown"},
                ],
            },
            {
                "name": "operation",
                "part": [
                    {"name": "type", "valueCode": "add"},
                    {"name": "path", "valueString": "Patient"},
                    {"name": "name", "valueString": "birthDate"},
                    {"name": "value", "valueDate": "1990-02-03"},
                ],
            },
        ],
    }
    response = client.patch(
        f"/fhir/Patient/{rid}", json=parameters, headers={"Content-Type": FHIR_JSON}
    )
    assert response.status_code == 200, response.text
    stored = read(client, "Patient", rid)
    assert stored["gender"] == "unknown"
    assert stored["birthDate"] == "1990-02-03"
    assert stored["meta"]["versionId"] == "2"


def test_failing_patch_is_422_and_changes_nothing(client: TestClient) -> None:
    rid = create(client, patient(gender="male"))["id"]
    ops = b'[{"op": "replace", "path": "/gender", "value": "female"},'
    ops += b' {"op": "test", "path": "/gender", "value": "male"}]'
    response = client.patch(
        f"/fhir/Patient/{rid}", content=ops, headers={"Content-Type": JSON_PATCH}
    )
    assert_outcome(response, 422)
    missing = b'[{"op": "remove", "path": "/birthDate"}]'
    response = client.patch(
        f"/fhir/Patient/{rid}", content=missing, headers={"Content-Type": JSON_PATCH}
    )
    assert_outcome(response, 422)
    stored = read(client, "Patient", rid)
    assert stored["gender"] == "male"
    assert stored["meta"]["versionId"] == "1"


def test_patch_into_an_invalid_resource_is_refused(client: TestClient) -> None:
    rid = create(client, patient(gender="male"))["id"]
    ops = b'[{"op": "replace", "path": "/gender", "value": "bogus"}]'
    response = client.patch(
        f"/fhir/Patient/{rid}", content=ops, headers={"Content-Type": JSON_PATCH}
    )
    assert response.status_code in (400, 422)
    assert_outcome(response, response.status_code)
    assert read(client, "Patient", rid)["meta"]["versionId"] == "1"


def test_patch_honours_if_match_and_missing_resources(client: TestClient) -> None:
    rid = create(client, patient(gender="male"))["id"]
    ops = b'[{"op": "replace", "path": "/gender", "value": "female"}]'
    stale = client.patch(
        f"/fhir/Patient/{rid}",
        content=ops,
        headers={"Content-Type": JSON_PATCH, "If-Match": 'W/"7"'},
    )
    assert_outcome(stale, 412)
    assert read(client, "Patient", rid)["gender"] == "male"
    absent = client.patch(
        f"/fhir/Patient/{unique('absent')}", content=ops, headers={"Content-Type": JSON_PATCH}
    )
    assert_outcome(absent, 404)


# -- $validate -------------------------------------------------------------------------------


def test_validate_accepts_a_valid_resource_without_storing_it(client: TestClient) -> None:
    sys = system()
    response = client.post(
        "/fhir/Patient/$validate", json=patient(identifier=[{"system": sys, "value": "v"}])
    )
    assert response.status_code == 200, response.text
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert all(i["severity"] in ("information", "warning") for i in outcome["issue"])
    assert total(client, "Patient", f"identifier={sys}|") == 0


def test_validate_reports_errors_of_an_invalid_resource_without_storing_it(
    client: TestClient,
) -> None:
    sys = system()
    invalid = patient(identifier=[{"system": sys, "value": "v"}], gender="bogus")
    for body in (
        invalid,
        {"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": invalid}]},
    ):
        response = client.post("/fhir/Patient/$validate", json=body)
        assert response.status_code == 200, response.text
        outcome = response.json()
        assert outcome["resourceType"] == "OperationOutcome"
        errors = [i for i in outcome["issue"] if i["severity"] == "error"]
        assert errors
        assert "Patient.gender" in errors[0]["expression"]
    assert total(client, "Patient", f"identifier={sys}|") == 0


# -- formats ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "accept"),
    [
        ("_format=json", None),
        ("_format=application/fhir%2Bjson", None),
        ("", "*/*"),
        ("", "application/json"),
        ("", FHIR_JSON),
        ("", "text/html, application/fhir+json;q=0.9"),
    ],
)
def test_json_is_served(client: TestClient, query: str, accept: str | None) -> None:
    headers = {"Accept": accept} if accept else {}
    response = client.get(f"/fhir/Patient?_summary=count&{query}", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(FHIR_JSON)
    assert response.json()["resourceType"] == "Bundle"


@pytest.mark.parametrize(
    ("query", "accept"),
    [("_format=xml", None), ("_format=application/fhir%2Bxml", None), ("", "application/fhir+xml")],
)
def test_xml_is_not_acceptable(client: TestClient, query: str, accept: str | None) -> None:
    headers = {"Accept": accept} if accept else {}
    assert_outcome(client.get(f"/fhir/Patient?{query}", headers=headers), 406)
    assert_outcome(client.get(f"/fhir/metadata?{query}", headers=headers), 406)


def test_capability_statement(client: TestClient) -> None:
    response = client.get("/fhir/metadata")
    assert response.status_code == 200
    statement = response.json()
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["fhirVersion"] == "4.0.1"
    assert statement["kind"] == "instance"
    assert "json" in statement["format"] or FHIR_JSON in statement["format"]
    rest = statement["rest"][0]
    assert rest["mode"] == "server"
    resources = {r["type"]: r for r in rest["resource"]}
    params = {p["name"]: p["type"] for p in resources["Patient"]["searchParam"]}
    assert params["name"] == "string"
    assert params["birthdate"] == "date"
    interactions = {i["code"] for i in resources["Patient"]["interaction"]}
    assert {"read", "vread", "update", "delete", "create", "search-type"} <= interactions
    assert {"transaction", "batch"} <= {i["code"] for i in rest["interaction"]}
    # SMART on FHIR: the API needs a token, and says where to get one.
    assert rest["security"]["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    (uris,) = rest["security"]["extension"]
    token = next(e["valueUri"] for e in uris["extension"] if e["url"] == "token")
    assert token.endswith("/oauth/token")
    assert client.get("/fhir/metadata", headers={"Authorization": ""}).status_code == 200
