"""Search details that clients rely on in practice."""

from __future__ import annotations

import uuid

from fastapi.testclient import TestClient


def _patient(client: TestClient, system: str, birth: str = "1980-05-01") -> str:
    body = {
        "resourceType": "Patient",
        "identifier": [{"system": system, "value": "1"}],
        "birthDate": birth,
    }
    response = client.post("/fhir/Patient", json=body)
    assert response.status_code == 201
    return str(response.json()["id"])


def test_count_zero_returns_only_the_total(client: TestClient) -> None:
    system = f"urn:test:{uuid.uuid4()}"
    _patient(client, system)
    _patient(client, system)
    bundle = client.get("/fhir/Patient", params={"identifier": f"{system}|", "_count": "0"}).json()
    assert bundle["total"] == 2
    assert "entry" not in bundle


def test_if_none_exist_may_repeat_the_type(client: TestClient) -> None:
    system = f"urn:test:{uuid.uuid4()}"
    existing = _patient(client, system)
    response = client.post(
        "/fhir/Patient",
        json={"resourceType": "Patient", "identifier": [{"system": system, "value": "1"}]},
        headers={"If-None-Exist": f"Patient?identifier={system}|1"},
    )
    assert response.status_code == 200
    assert response.json()["id"] == existing


def test_unencoded_plus_in_a_timezone_is_read_as_plus(client: TestClient) -> None:
    system = f"urn:test:{uuid.uuid4()}"
    _patient(client, system, "1980-05-01")
    # '+08:00' sent without percent-encoding arrives as ' 08:00'
    url = f"/fhir/Patient?identifier={system}|1&birthdate=ge1980-05-01T00:00:00+08:00"
    bundle = client.get(url).json()
    assert bundle["total"] == 1
