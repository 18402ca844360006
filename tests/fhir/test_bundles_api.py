"""Transaction and batch Bundles posted to the base (hl7.org/fhir/R4/http.html#transaction,
bundle.html): identities, conditional references, processing order, atomicity, batch statuses."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import (
    assert_outcome,
    bundle,
    create,
    found,
    history_total,
    observation,
    patient,
    post,
    read,
    system,
    total,
    unique,
)


def tagged(sys: str, value: str, **fields: Any) -> dict[str, Any]:
    return patient(identifier=[{"system": sys, "value": value}], **fields)


def urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def put(resource: dict[str, Any], url: str, **request: str) -> dict[str, Any]:
    return {"resource": resource, "request": {"method": "PUT", "url": url, **request}}


def call(method: str, url: str) -> dict[str, Any]:
    return {"request": {"method": method, "url": url}}


def submit(client: TestClient, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Post a Bundle that must succeed; returns the response entries."""
    response = client.post("/fhir", json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    assert result["resourceType"] == "Bundle"
    assert result["type"] == f"{body['type']}-response"
    assert len(result["entry"]) == len(body["entry"])
    entries: list[dict[str, Any]] = result["entry"]
    return entries


def located_id(entry: dict[str, Any]) -> str:
    """The id in a response entry's location (Type/id/_history/n)."""
    return str(entry["response"]["location"].split("/")[1])


def status(entry: dict[str, Any]) -> int:
    return int(entry["response"]["status"].split()[0])


# -- transaction -----------------------------------------------------------------------------


def test_transaction_rewrites_urn_uuid_references(client: TestClient) -> None:
    sys, code = system(), unique("code")
    patient_url = urn()
    body = bundle(
        "transaction",
        post(observation(code, subject={"reference": patient_url}), urn()),
        post(tagged(sys, "p"), patient_url),
    )
    obs_entry, patient_entry = submit(client, body)
    assert status(obs_entry) == 201
    assert status(patient_entry) == 201
    assert patient_entry["response"]["etag"] == 'W/"1"'
    assert patient_entry["response"]["location"].endswith("/_history/1")
    pid = located_id(patient_entry)
    assert found(client, "Patient", f"identifier={sys}|p") == {pid}
    stored = read(client, "Observation", located_id(obs_entry))
    assert stored["subject"]["reference"] == f"Patient/{pid}"
    assert found(client, "Observation", f"code={code}&subject=Patient/{pid}") == {stored["id"]}


def test_transaction_rewrites_urn_uuid_in_uri_elements_and_lists(client: TestClient) -> None:
    code = unique("code")
    first, second = urn(), urn()
    body = bundle(
        "transaction",
        post(observation(code), first),
        post(observation(code), second),
        post(
            observation(
                code,
                derivedFrom=[{"reference": first}, {"reference": second}],
                extension=[{"url": "http://example.org/source", "valueUri": first}],
            )
        ),
    )
    one, two, derived = submit(client, body)
    stored = read(client, "Observation", located_id(derived))
    assert stored["derivedFrom"] == [
        {"reference": f"Observation/{located_id(one)}"},
        {"reference": f"Observation/{located_id(two)}"},
    ]
    assert stored["extension"][0]["valueUri"] == f"Observation/{located_id(one)}"


def test_transaction_rewrites_urn_uuid_in_the_narrative(client: TestClient) -> None:
    # http.html#trules: matching links are replaced also in <a href=""> of the narrative.
    code, patient_url = unique("code"), urn()
    div = f'<div xmlns="http://www.w3.org/1999/xhtml"><a href="{patient_url}">patient</a></div>'
    body = bundle(
        "transaction",
        post(patient(gender="male"), patient_url),
        post(observation(code, text={"status": "generated", "div": div})),
    )
    made, obs = submit(client, body)
    stored = read(client, "Observation", located_id(obs))
    assert f'href="Patient/{located_id(made)}"' in stored["text"]["div"]
    assert "urn:uuid" not in stored["text"]["div"]


def test_transaction_resolves_conditional_references(client: TestClient) -> None:
    sys, code = system(), unique("code")
    pid = create(client, tagged(sys, "known"))["id"]
    body = bundle(
        "transaction",
        post(observation(code, subject={"reference": f"Patient?identifier={sys}|known"})),
    )
    (entry,) = submit(client, body)
    stored = read(client, "Observation", located_id(entry))
    assert stored["subject"]["reference"] == f"Patient/{pid}"


@pytest.mark.parametrize("copies", [0, 2])
def test_conditional_reference_that_does_not_match_one_resource_fails(
    client: TestClient, copies: int
) -> None:
    sys, code = system(), unique("code")
    for _ in range(copies):
        create(client, tagged(sys, "ambiguous"))
    before = (total(client, "Patient"), total(client, "Observation"), history_total(client))
    body = bundle(
        "transaction",
        post(tagged(system(), "new")),
        post(observation(code, subject={"reference": f"Patient?identifier={sys}|ambiguous"})),
    )
    response = client.post("/fhir", json=body)
    assert response.status_code in (400, 404, 412, 422), response.text
    assert_outcome(response, response.status_code)
    after = (total(client, "Patient"), total(client, "Observation"), history_total(client))
    assert after == before


def test_if_none_exist_in_a_transaction(client: TestClient) -> None:
    sys, code = system(), unique("code")
    existing = create(client, tagged(sys, "existing"))["id"]
    existing_url, new_url = urn(), urn()
    body = bundle(
        "transaction",
        post(tagged(sys, "existing"), existing_url, ifNoneExist=f"identifier={sys}|existing"),
        post(tagged(sys, "new"), new_url, ifNoneExist=f"identifier={sys}|new"),
        post(observation(code, subject={"reference": existing_url})),
        post(observation(code, subject={"reference": new_url})),
    )
    kept, made, obs_existing, obs_new = submit(client, body)
    assert status(kept) == 200
    assert kept["response"]["location"].split("/")[:2] == ["Patient", existing]
    assert status(made) == 201
    assert found(client, "Patient", f"identifier={sys}|") == {existing, located_id(made)}
    assert read(client, "Observation", located_id(obs_existing))["subject"] == {
        "reference": f"Patient/{existing}"
    }
    assert read(client, "Observation", located_id(obs_new))["subject"] == {
        "reference": f"Patient/{located_id(made)}"
    }


def test_transaction_processes_delete_post_put_then_get(client: TestClient) -> None:
    sys = system()
    doomed = create(client, tagged(sys, "doomed"))["id"]
    replaced = create(client, tagged(sys, "replaced", gender="male"))["id"]
    body = bundle(
        "transaction",
        call("GET", f"Patient?identifier={sys}|"),
        call("GET", f"Patient/{replaced}"),
        put(tagged(sys, "replaced", id=replaced, gender="female"), f"Patient/{replaced}"),
        post(tagged(sys, "doomed"), urn(), ifNoneExist=f"identifier={sys}|doomed"),
        call("DELETE", f"Patient/{doomed}"),
    )
    searched, read_back, updated, recreated, deleted = submit(client, body)
    assert status(deleted) in (200, 204)
    # The DELETE ran first: the conditional create found nothing and made a new resource.
    assert status(recreated) == 201
    assert located_id(recreated) != doomed
    assert status(updated) == 200
    # The GETs ran last and see every change of the transaction.
    assert read_back["resource"]["gender"] == "female"
    assert read_back["resource"]["meta"]["versionId"] == "2"
    listed = {e["resource"]["id"] for e in searched["resource"].get("entry", [])}
    assert listed == {replaced, located_id(recreated)}
    assert client.get(f"/fhir/Patient/{doomed}").status_code == 410


def test_transaction_put_with_client_id_and_if_match(client: TestClient) -> None:
    sys = system()
    rid = unique("tx-")
    (created,) = submit(
        client, bundle("transaction", put(tagged(sys, "a", id=rid), f"Patient/{rid}"))
    )
    assert status(created) == 201
    body = bundle(
        "transaction",
        put(tagged(sys, "a", id=rid, gender="male"), f"Patient/{rid}", ifMatch='W/"1"'),
    )
    (updated,) = submit(client, body)
    assert status(updated) == 200
    assert updated["response"]["etag"] == 'W/"2"'
    stale = bundle(
        "transaction",
        put(tagged(sys, "a", id=rid, gender="female"), f"Patient/{rid}", ifMatch='W/"1"'),
        post(tagged(sys, "b")),
    )
    assert_outcome(client.post("/fhir", json=stale), 412)
    assert read(client, "Patient", rid)["gender"] == "male"
    assert found(client, "Patient", f"identifier={sys}|b") == set()


@pytest.mark.parametrize(
    "bad",
    [
        post(patient(gender="robot")),
        post(patient(nickname="Bob")),
        put(patient(id="x1"), "Patient/x2"),
        call("GET", f"Patient/{uuid.uuid4()}"),
        call("DELETE", "Unicorn/1"),
        {
            "request": {"method": "POST", "url": "Observation"},
            "resource": {"resourceType": "Observation"},
        },
    ],
)
def test_one_failing_entry_rolls_back_the_whole_transaction(
    client: TestClient, bad: dict[str, Any]
) -> None:
    sys, code = system(), unique("code")
    victim = create(client, tagged(sys, "victim"))["id"]
    before = (total(client, "Patient"), total(client, "Observation"), history_total(client))
    patient_url = urn()
    body = bundle(
        "transaction",
        post(tagged(sys, "new"), patient_url),
        post(observation(code, subject={"reference": patient_url})),
        call("DELETE", f"Patient/{victim}"),
        bad,
    )
    response = client.post("/fhir", json=body)
    assert 400 <= response.status_code < 500, response.text
    assert_outcome(response, response.status_code)
    after = (total(client, "Patient"), total(client, "Observation"), history_total(client))
    assert after == before
    assert read(client, "Patient", victim)["meta"]["versionId"] == "1"


def test_transaction_may_not_change_a_resource_twice(client: TestClient) -> None:
    sys = system()
    rid = create(client, tagged(sys, "twice"))["id"]
    body = bundle(
        "transaction",
        put(tagged(sys, "twice", id=rid, gender="male"), f"Patient/{rid}"),
        call("DELETE", f"Patient/{rid}"),
    )
    assert_outcome(client.post("/fhir", json=body), 400)
    assert read(client, "Patient", rid)["meta"]["versionId"] == "1"


# -- batch -----------------------------------------------------------------------------------


def test_batch_entries_succeed_or_fail_on_their_own(client: TestClient) -> None:
    sys = system()
    rid = unique("batch-")
    body = bundle(
        "batch",
        post(tagged(sys, "first")),
        put(tagged(sys, "bad", id="other"), f"Patient/{unique('url-')}"),
        put(tagged(sys, "second", id=rid), f"Patient/{rid}"),
        call("GET", f"Patient/{unique('absent')}"),
    )
    first, bad, second, absent = submit(client, body)
    assert status(first) == 201
    assert status(second) == 201
    assert 400 <= status(bad) < 500
    assert bad["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert status(absent) == 404
    assert absent["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert found(client, "Patient", f"identifier={sys}|") == {located_id(first), rid}


def test_batch_entry_with_an_invalid_resource_fails_alone(client: TestClient) -> None:
    sys = system()
    body = bundle("batch", post(tagged(sys, "good")), post(tagged(sys, "bad", gender="robot")))
    good, bad = submit(client, body)
    assert status(good) == 201
    assert status(bad) == 400
    assert bad["response"]["outcome"]["issue"][0]["severity"] == "error"
    assert found(client, "Patient", f"identifier={sys}|") == {located_id(good)}


def test_batch_reads_and_searches(client: TestClient) -> None:
    sys = system()
    pid = create(client, tagged(sys, "one", gender="male"))["id"]
    body = bundle(
        "batch",
        call("GET", f"Patient/{pid}"),
        call("GET", f"Patient?identifier={sys}|"),
        call("GET", f"Patient/{pid}/_history/1"),
    )
    read_back, searched, version = submit(client, body)
    assert status(read_back) == 200
    assert read_back["resource"]["gender"] == "male"
    assert searched["resource"]["type"] == "searchset"
    assert [e["resource"]["id"] for e in searched["resource"]["entry"]] == [pid]
    assert version["resource"]["meta"]["versionId"] == "1"
