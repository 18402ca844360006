"""The application around the FHIR API: health, metrics, and an API explorer with no CDN."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient


def test_healthz_checks_the_database(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_metrics_count_requests(client: TestClient) -> None:
    client.get("/fhir/metadata")
    body = client.get("/metrics").text
    assert "cityhealth_http_requests_total" in body


def test_docs_assets_are_served_locally(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    assert "cdn" not in page.text.lower()
    assets = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page.text)
    assert assets
    for url in assets:
        assert url.startswith("/"), url
        assert client.get(url).status_code == 200, url
    assert client.get("/openapi.json").json()["info"]["title"] == "CityHealth"


def test_every_request_gets_a_request_id(client: TestClient) -> None:
    response = client.get("/fhir/metadata", headers={"X-Request-Id": "abc123"})
    assert response.headers["X-Request-Id"] == "abc123"


def test_the_authorization_server_is_published(client: TestClient) -> None:
    config = client.get("/.well-known/smart-configuration").json()
    assert config["issuer"] == "http://127.0.0.1:8000"
    assert config["token_endpoint"].endswith("/oauth/token")
    assert config["code_challenge_methods_supported"] == ["S256"]
    keys = client.get("/.well-known/jwks.json").json()["keys"]
    assert keys and all("d" not in key and key["alg"] == "ES256" for key in keys)
