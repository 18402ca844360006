"""Small helpers shared by the black-box tests of the FHIR REST API.

The `client` fixture shares one database among the tests of a module, so every test makes its
own data distinguishable: a unique identifier system, family name or code from `unique()`.
"""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy import func, select

from cityhealth.fhir.engine import FhirEngine
from cityhealth.fhir.schema import resource, resource_history

FHIR_JSON = "application/fhir+json"
JSON_PATCH = "application/json-patch+json"


def unique(prefix: str = "t") -> str:
    """A token no other test uses: letters and digits only, safe in ids, codes and names."""
    return f"{prefix}{uuid.uuid4().hex[:16]}"


def system() -> str:
    return f"urn:cityhealth:test:{unique('sys')}"


def patient(**fields: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", **fields}


def observation(code: str, **fields: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "urn:cityhealth:test:codes", "code": code}]},
        **fields,
    }


def create(client: TestClient, resource: dict[str, Any], **headers: str) -> dict[str, Any]:
    response = client.post(f"/fhir/{resource['resourceType']}", json=resource, headers=headers)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def read(client: TestClient, rtype: str, rid: str) -> dict[str, Any]:
    response = client.get(f"/fhir/{rtype}/{rid}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def relative(url: str) -> str:
    """A link of a Bundle as a path the test client can request."""
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


def search(client: TestClient, rtype: str, query: str, **headers: str) -> dict[str, Any]:
    response = client.get(f"/fhir/{rtype}?{query}", headers=headers)
    assert response.status_code == 200, response.text
    bundle: dict[str, Any] = response.json()
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "searchset"
    return bundle


def entries(bundle: dict[str, Any], mode: str = "match") -> list[dict[str, Any]]:
    return [
        e["resource"]
        for e in bundle.get("entry", [])
        if e.get("search", {}).get("mode", "match") == mode
    ]


def ids(bundle: dict[str, Any], mode: str = "match") -> list[str]:
    return [r["id"] for r in entries(bundle, mode)]


def found(client: TestClient, rtype: str, query: str) -> set[str]:
    """Ids of every match, following `next` links (a generous page keeps it short)."""
    bundle = search(client, rtype, f"{query}&_count=100")
    result = ids(bundle)
    while (url := link(bundle, "next")) is not None:
        response = client.get(relative(url))
        assert response.status_code == 200, response.text
        bundle = response.json()
        result += ids(bundle)
    assert len(result) == len(set(result)), "a resource appeared twice"
    return set(result)


def link(bundle: dict[str, Any], relation: str) -> str | None:
    for item in bundle.get("link", []):
        if item["relation"] == relation:
            url: str = item["url"]
            return url
    return None


def total(client: TestClient, rtype: str, query: str = "") -> int:
    """How many resources of the type match (all of them without a query)."""
    response = client.get(f"/fhir/{rtype}?_summary=count{'&' + query if query else ''}")
    assert response.status_code == 200, response.text
    value: int = response.json()["total"]
    return value


def history_total(client: TestClient) -> int:
    """Versions in the store but the audit trail: any write, even a deletion, adds one (every
    request, refused ones too, adds its AuditEvent, by design)."""
    h = resource_history
    engine: FhirEngine = client.app.state.engine  # type: ignore[attr-defined]
    with engine.db.read() as conn:
        query = select(func.count()).select_from(h).where(h.c.type != "AuditEvent")
        return int(conn.execute(query).scalar_one())


def assert_outcome(response: Response, status: int, *expression: str) -> dict[str, Any]:
    """The response is an error of this status whose body is an OperationOutcome with an error;
    each expected expression is named by some issue."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(FHIR_JSON)
    outcome: dict[str, Any] = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"], outcome
    assert any(i["severity"] in ("error", "fatal") for i in outcome["issue"]), outcome
    named = [e for issue in outcome["issue"] for e in issue.get("expression", [])]
    for element in expression:
        assert element in named, f"{element} not in {named}"
    return outcome


def bundle(kind: str, *entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def post(resource: dict[str, Any], full_url: str | None = None, **request: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"], **request},
    }
    if full_url:
        entry["fullUrl"] = full_url
    return entry


def counts(engine: FhirEngine) -> Counter[str]:
    """Stored (not deleted) resources per type."""
    query = (
        select(resource.c.type, func.count())
        .where(resource.c.deleted.is_(False))
        .group_by(resource.c.type)
    )
    with engine.db.read() as conn:
        return Counter({rtype: n for rtype, n in conn.execute(query)})
