"""Search details that clients rely on in practice."""

from __future__ import annotations

import uuid

from fastapi.testclient import TestClient
from helpers import relative


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


def test_one_criterion_pages_skip_deleted_and_changed_resources(client: TestClient) -> None:
    """A page of a one-criterion search is taken from the index rows: deletes and updates
    that move a resource out of the criterion must not leave holes, repeats or ghosts."""
    family = f"王{uuid.uuid4().hex[:8]}"
    made = []
    for n in range(23):
        body = {"resourceType": "Patient", "name": [{"family": family, "given": [f"g{n}"]}]}
        made.append(client.post("/fhir/Patient", json=body).json())
    for gone in made[3:20:4]:
        assert client.delete(f"/fhir/Patient/{gone['id']}").status_code in (200, 204)
    renamed = made[1]
    renamed["name"] = [{"family": "李", "given": ["x"]}]
    assert client.put(f"/fhir/Patient/{renamed['id']}", json=renamed).status_code == 200
    again = made[2]
    again["gender"] = "female"  # an update that keeps the name rewrites its index rows
    assert client.put(f"/fhir/Patient/{again['id']}", json=again).status_code == 200
    live = [p["id"] for p in made if p not in made[3:20:4] and p is not renamed]

    pages, bundle = [], client.get(f"/fhir/Patient?family={family}&_count=4").json()
    while True:
        pages.append([e["resource"]["id"] for e in bundle.get("entry", [])])
        nxt = next((x["url"] for x in bundle["link"] if x["relation"] == "next"), None)
        if nxt is None:
            break
        bundle = client.get(relative(nxt)).json()
    assert [rid for page in pages for rid in page] == live  # creation order = rid order
    assert all(len(page) == 4 for page in pages[:-1])
    back = bundle
    seen_backwards = []
    while prev := next((x["url"] for x in back["link"] if x["relation"] == "previous"), None):
        back = client.get(relative(prev)).json()
        seen_backwards = [e["resource"]["id"] for e in back.get("entry", [])] + seen_backwards
    assert seen_backwards + pages[-1] == live
