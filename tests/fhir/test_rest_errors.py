"""Every refused request answers an OperationOutcome with the right status (never a 500) and
writes nothing (hl7.org/fhir/R4/http.html, search.html)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from helpers import (
    FHIR_JSON,
    assert_outcome,
    create,
    entries,
    history_total,
    patient,
    search,
    system,
    total,
    unique,
)


@pytest.fixture
def unchanged(client: TestClient) -> Iterator[None]:
    """The test's requests may fail, but must not write anything."""
    before = (total(client, "Patient"), total(client, "Observation"), history_total(client))
    yield
    after = (total(client, "Patient"), total(client, "Observation"), history_total(client))
    assert after == before


@pytest.fixture
def existing(client: TestClient) -> dict[str, object]:
    return create(client, patient(name=[{"family": unique("Existing")}], gender="male"))


# -- unknown things --------------------------------------------------------------------------


@pytest.mark.usefixtures("unchanged")
def test_unknown_resource_type_is_404(client: TestClient) -> None:
    assert_outcome(client.get("/fhir/Unicorn/1"), 404)
    assert_outcome(client.get("/fhir/Unicorn?name=x"), 404)
    assert_outcome(client.post("/fhir/Unicorn", json={"resourceType": "Unicorn"}), 404)
    assert_outcome(client.put("/fhir/Unicorn/1", json={"resourceType": "Unicorn", "id": "1"}), 404)
    assert_outcome(client.delete("/fhir/Unicorn/1"), 404)
    assert_outcome(client.get("/fhir/Unicorn/_history"), 404)


@pytest.mark.usefixtures("unchanged")
def test_unknown_id_is_404(client: TestClient) -> None:
    rid = unique("missing")
    assert_outcome(client.get(f"/fhir/Patient/{rid}"), 404)
    assert_outcome(client.get(f"/fhir/Patient/{rid}/_history/1"), 404)
    assert_outcome(client.get("/fhir/Patient/not_a%20valid%20id"), 404)


@pytest.mark.usefixtures("unchanged")
def test_unknown_route_is_404_operation_outcome(client: TestClient) -> None:
    assert_outcome(client.get("/nowhere"), 404)
    assert_outcome(client.get("/fhir/Patient/1/_history/1/more"), 404)


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/fhir/metadata"),
        ("PUT", "/fhir/metadata"),
        ("PATCH", "/fhir/metadata"),
        ("POST", "/fhir/Patient/1"),
        ("DELETE", "/fhir/Patient/1/_history/1"),
    ],
)
def test_wrong_method_is_405_operation_outcome(client: TestClient, method: str, path: str) -> None:
    assert_outcome(client.request(method, path), 405)


# -- bodies ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize("body", [b"{not json", b"", b'{"resourceType": "Patient",}'])
def test_malformed_json_is_400(client: TestClient, body: bytes) -> None:
    headers = {"Content-Type": FHIR_JSON}
    assert_outcome(client.post("/fhir/Patient", content=body, headers=headers), 400)
    assert_outcome(client.put("/fhir/Patient/x1", content=body, headers=headers), 400)


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize("body", [[{"resourceType": "Patient"}], "Patient", 42, None])
def test_body_that_is_not_an_object_is_400(client: TestClient, body: object) -> None:
    assert_outcome(client.post("/fhir/Patient", json=body), 400)
    assert_outcome(client.put("/fhir/Patient/x2", json=body), 400)


@pytest.mark.usefixtures("unchanged")
def test_resource_type_must_match_the_url(client: TestClient) -> None:
    observation = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}
    assert_outcome(client.post("/fhir/Patient", json=observation), 400)
    assert_outcome(client.put("/fhir/Patient/x3", json={**observation, "id": "x3"}), 400)
    assert_outcome(client.post("/fhir/Patient", json={"gender": "male"}), 400)


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    ("body", "element"),
    [
        (patient(nickname="Bob"), "Patient.nickname"),
        (patient(birthDate="1980-13-01"), "Patient.birthDate"),
        (patient(birthDate="yesterday"), "Patient.birthDate"),
        (patient(gender="robot"), "Patient.gender"),
        (patient(active="yes"), "Patient.active"),
        (patient(name=[{"family": ["Li"]}]), "Patient.name[0].family"),
    ],
)
def test_invalid_resource_is_400_naming_the_element(
    client: TestClient, body: dict[str, object], element: str
) -> None:
    assert_outcome(client.post("/fhir/Patient", json=body), 400, element)
    assert_outcome(client.put("/fhir/Patient/x4", json={**body, "id": "x4"}), 400, element)


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize("value", ["1980-02-30", "1981-02-29", "1980-04-31"])
def test_impossible_calendar_date_is_400(client: TestClient, value: str) -> None:
    # datatypes.html: "Dates SHALL be valid dates".
    response = client.post("/fhir/Patient", json=patient(birthDate=value))
    assert_outcome(response, 400, "Patient.birthDate")


def test_invalid_update_keeps_the_current_version(
    client: TestClient, existing: dict[str, object], unchanged: None
) -> None:
    rid = existing["id"]
    response = client.put(f"/fhir/Patient/{rid}", json={**existing, "birthDate": "1980-13-01"})
    assert_outcome(response, 400, "Patient.birthDate")
    assert client.get(f"/fhir/Patient/{rid}").json() == existing


def test_put_needs_the_id_of_the_url_in_the_body(
    client: TestClient, existing: dict[str, object], unchanged: None
) -> None:
    rid = existing["id"]
    assert_outcome(client.put(f"/fhir/Patient/{rid}", json={**existing, "id": "other"}), 400)
    without = {k: v for k, v in existing.items() if k != "id"}
    assert_outcome(client.put(f"/fhir/Patient/{rid}", json=without), 400)
    assert_outcome(client.put("/fhir/Patient/bad_id!", json=patient(id="bad_id!")), 400)


@pytest.mark.usefixtures("unchanged")
def test_unsupported_content_type_is_415(client: TestClient) -> None:
    xml = b'<Patient xmlns="http://hl7.org/fhir"><gender value="male"/></Patient>'
    for content_type in ("application/xml", "application/fhir+xml", "text/plain"):
        headers = {"Content-Type": content_type}
        assert_outcome(client.post("/fhir/Patient", content=xml, headers=headers), 415)
        assert_outcome(client.put("/fhir/Patient/x5", content=xml, headers=headers), 415)


def test_if_match_that_is_not_a_version_is_400(
    client: TestClient, existing: dict[str, object], unchanged: None
) -> None:
    response = client.put(
        f"/fhir/Patient/{existing['id']}", json=existing, headers={"If-Match": "yesterday"}
    )
    assert_outcome(response, 400)


@pytest.mark.usefixtures("unchanged")
def test_conditional_write_with_bad_criteria_is_400(client: TestClient) -> None:
    body = patient(gender="male")
    assert_outcome(client.put("/fhir/Patient?unknown-param=1", json=body), 400)
    assert_outcome(client.delete("/fhir/Patient?unknown-param=1"), 400)
    headers = {"If-None-Exist": "unknown-param=1"}
    assert_outcome(client.post("/fhir/Patient", json=body, headers=headers), 400)


# -- search ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("unchanged")
def test_unknown_search_parameter_is_400(client: TestClient) -> None:
    assert_outcome(client.get("/fhir/Patient?shoe-size=42"), 400)
    assert_outcome(client.post("/fhir/Patient/_search", data={"shoe-size": "42"}), 400)


def test_lenient_handling_ignores_an_unknown_parameter(client: TestClient) -> None:
    family = unique("Lenient")
    rid = create(client, patient(name=[{"family": family}]))["id"]
    bundle = search(
        client,
        "Patient",
        f"family={family}&shoe-size=42",
        Prefer="handling=lenient",
    )
    assert [r["id"] for r in entries(bundle)] == [rid]
    warnings = entries(bundle, "outcome")
    assert warnings and warnings[0]["resourceType"] == "OperationOutcome"
    assert "shoe-size" in warnings[0]["issue"][0]["diagnostics"]
    strict = client.get(
        f"/fhir/Patient?family={family}&shoe-size=42", headers={"Prefer": "handling=strict"}
    )
    assert_outcome(strict, 400)


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    "query",
    [
        "_count=many",
        "_count=-1",
        "birthdate=yesterday",
        "birthdate=2020-13",
        "birthdate=xx2020",
        "_lastUpdated=soon",
        "_cursor=not-a-cursor",
        "_cursor=WyJ4Il0",
        "name:below=x",
        "gender:contains=m",
        "birthdate:exact=2020",
        "_sort=shoe-size",
        "_summary=maybe",
        "_total=some",
        "_include=Patient:name",
        "_include=Nothing",
        "general-practitioner.shoe-size=1",
        "_has:Observation:patient:shoe-size=1",
        "gender:missing=perhaps",
    ],
)
def test_bad_search_values_are_400(client: TestClient, query: str) -> None:
    assert_outcome(client.get(f"/fhir/Patient?{query}"), 400)


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    ("rtype", "query"),
    [
        ("Observation", "value-quantity=big"),
        ("Observation", "value-quantity=5.4|http://unitsofmeasure.org"),
        ("RiskAssessment", "probability=likely"),
        ("Observation", "subject=a/b/c/d"),
    ],
)
def test_bad_number_quantity_and_reference_values_are_400(
    client: TestClient, rtype: str, query: str
) -> None:
    assert_outcome(client.get(f"/fhir/{rtype}?{query}"), 400)


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    ("rtype", "query"),
    [
        ("Observation", "code-value-quantity=http://loinc.org|1234-5"),  # no $value part
        ("MolecularSequence", "chromosome-window-coordinate=1$lt44"),  # shape not supported
    ],
)
def test_bad_or_unsupported_composites_are_400(client: TestClient, rtype: str, query: str) -> None:
    assert_outcome(client.get(f"/fhir/{rtype}?{query}"), 400)


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize("query", ["_text=fever", "_content=fever", "_filter=name eq x"])
def test_refused_special_parameters_are_400(client: TestClient, query: str) -> None:
    assert_outcome(client.get(f"/fhir/Patient?{query}"), 400)


@pytest.mark.usefixtures("unchanged")
def test_post_search_needs_a_form_body(client: TestClient) -> None:
    response = client.post(
        "/fhir/Patient/_search", content=b'{"name": "x"}', headers={"Content-Type": FHIR_JSON}
    )
    assert_outcome(response, 415)


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize(
    "path",
    [
        "/fhir/Patient?name=%00",
        "/fhir/Patient?name=a\\",
        "/fhir/Patient?_count=99999999999999999999",
        "/fhir/Patient?_cursor=",
        "/fhir/Patient?=x",
        "/fhir/Patient?general-practitioner.=x",
        "/fhir/Patient?birthdate=9999-12-31T23:59:59%2B14:00",
        "/fhir/Patient?birthdate=2020-01-01T10:00:00%2B15:00",
        "/fhir/Patient?_has:Observation:patient:_has:Observation:patient:code=1",
        "/fhir/Observation?value-quantity=1e400",
        "/fhir/Observation?value-quantity=nan",
        "/fhir/Observation?subject=urn:uuid:1",
        "/fhir/_history?_count=99999999999999999999",
        "/fhir/Patient/1/$everything?_cursor=zzz",
    ],
)
def test_odd_requests_never_fail_with_500(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code < 500, response.text
    assert response.json()["resourceType"] in ("Bundle", "OperationOutcome")


# -- writes that are refused as a whole ------------------------------------------------------


@pytest.mark.usefixtures("unchanged")
def test_bundle_that_is_not_a_transaction_or_batch_is_400(client: TestClient) -> None:
    assert_outcome(client.post("/fhir", json=patient()), 400)
    assert_outcome(client.post("/fhir", json={"resourceType": "Bundle", "type": "collection"}), 400)
    entry_without_request = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": patient(identifier=[{"system": system(), "value": "1"}])}],
    }
    assert_outcome(client.post("/fhir", json=entry_without_request), 400)
