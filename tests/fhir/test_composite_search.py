"""Composite search parameters: both parts must match on the same element."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient

LOINC = "http://loinc.org"


def _blood_pressure(client: TestClient, systolic: float, diastolic: float) -> str:
    tag = str(uuid.uuid4())
    body = {
        "resourceType": "Observation",
        "status": "final",
        "identifier": [{"system": "urn:test:bp", "value": tag}],
        "code": {"coding": [{"system": LOINC, "code": "85354-9"}]},
        "component": [
            {
                "code": {"coding": [{"system": LOINC, "code": "8480-6"}]},
                "valueQuantity": {
                    "value": systolic,
                    "system": "http://unitsofmeasure.org",
                    "code": "mm[Hg]",
                },
            },
            {
                "code": {"coding": [{"system": LOINC, "code": "8462-4"}]},
                "valueQuantity": {
                    "value": diastolic,
                    "system": "http://unitsofmeasure.org",
                    "code": "mm[Hg]",
                },
            },
        ],
    }
    assert client.post("/fhir/Observation", json=body).status_code == 201
    return tag


def _found(client: TestClient, tag: str, query: str) -> bool:
    bundle = client.get(f"/fhir/Observation?identifier=urn:test:bp|{tag}&{query}").json()
    return bool(bundle["total"])


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (f"component-code-value-quantity={LOINC}|8480-6$gt130", True),
        (f"component-code-value-quantity={LOINC}|8480-6$lt130", False),
        # 85 is the diastolic value: it must not pair with the systolic code
        (f"component-code-value-quantity={LOINC}|8480-6$85", False),
        (f"component-code-value-quantity={LOINC}|8462-4$85", True),
        ("component-code-value-quantity=8462-4$85||mm[Hg]", True),
        ("combo-code-value-quantity=8480-6$140", True),
        ("component-code-value-quantity=8480-6$lt100,8462-4$gt80", True),
    ],
)
def test_component_code_and_value_match_together(
    client: TestClient, query: str, expected: bool
) -> None:
    tag = _blood_pressure(client, 140, 85)
    assert _found(client, tag, query) is expected


def test_code_value_on_the_observation_itself(client: TestClient) -> None:
    tag = str(uuid.uuid4())
    body = {
        "resourceType": "Observation",
        "status": "final",
        "identifier": [{"system": "urn:test:bp", "value": tag}],
        "code": {"coding": [{"system": LOINC, "code": "8867-4"}]},
        "valueQuantity": {"value": 72, "unit": "/min"},
    }
    assert client.post("/fhir/Observation", json=body).status_code == 201
    assert _found(client, tag, f"code-value-quantity={LOINC}|8867-4$72")
    assert not _found(client, tag, f"code-value-quantity={LOINC}|8867-4$gt100")


def test_malformed_composite_value_is_400(client: TestClient) -> None:
    response = client.get("/fhir/Observation?component-code-value-quantity=8480-6")
    assert response.status_code == 400
    assert response.json()["resourceType"] == "OperationOutcome"


def test_unsupported_composite_is_refused(client: TestClient) -> None:
    response = client.get("/fhir/MolecularSequence?chromosome-window-coordinate=1$lt44")
    assert response.status_code == 400
    assert response.json()["issue"][0]["code"] == "not-supported"
