"""Every route of the application and how it is protected (both databases).

`ROUTES` names each route and method of the application with its treatment: public (and why),
a bearer access token (else 401 with a challenge) or a portal session (else the sign-in). The
first test compares it with the application's routes, so a route added later without an entry
fails here; every protected entry is then called without credentials below. Then: forged and
stale tokens, roles and scopes that do not allow a request (403), and another resident's
records, which look exactly like missing ones through every way of reaching them, the audit
trail a resident reads included.

The city of these tests: hospitals A and B; residents 爱丽 (alice) and 博文 (bob). B holds
alice's lab result, visit and a panel naming one of bob's results; A holds bob's result, visit
and a panel naming alice's result.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import jwt
import pytest
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from httpx import Response
from starlette.routing import Match, Mount

from access_tokens import bearer
from cityhealth.security.consent_shape import ConsentTerms, consent_resource
from cityhealth.security.keys import KeyRing
from cityhealth.security.tokens import TokenService

# -- the table of routes -------------------------------------------------------------------

PUBLIC, TOKEN, SESSION = "public", "bearer token", "portal session"
MOUNT = "*"  # a mounted application (static files) answers every method


@dataclass(frozen=True)
class Treatment:
    kind: str
    reason: str = ""


def public(reason: str) -> Treatment:
    return Treatment(PUBLIC, reason)


API = Treatment(TOKEN)
PAGE = Treatment(SESSION)

ROUTES: dict[tuple[str, str], Treatment] = {
    # Operations and the API's own description
    ("GET", "/healthz"): public("liveness probe: answers ok or fail, nothing else"),
    ("GET", "/metrics"): API,
    ("GET", "/openapi.json"): public("the API's description, no data"),
    ("HEAD", "/openapi.json"): public("the same, headers only"),
    ("GET", "/docs"): public("the API explorer's page, no data"),
    (MOUNT, "/static/swagger-ui"): public("the API explorer's scripts and styles"),
    # OAuth 2.0 / SMART authorization server
    ("GET", "/.well-known/smart-configuration"): public("SMART discovery, read before sign-in"),
    ("GET", "/.well-known/jwks.json"): public("the public keys that verify access tokens"),
    ("GET", "/oauth/authorize"): public("the sign-in form"),
    ("POST", "/oauth/authorize"): public("signing in: checks the password itself"),
    ("POST", "/oauth/token"): public("authenticates the client and its grant itself"),
    ("POST", "/oauth/revoke"): public("authenticates the client itself (RFC 7009)"),
    ("POST", "/oauth/logout"): public("checks the bearer token it ends (401 without one)"),
    # FHIR API
    ("GET", "/fhir/metadata"): public("the CapabilityStatement clients read before sign-in"),
    ("POST", "/fhir/metadata"): public("answers 405 to anyone"),
    ("PUT", "/fhir/metadata"): public("answers 405 to anyone"),
    ("PATCH", "/fhir/metadata"): public("answers 405 to anyone"),
    ("DELETE", "/fhir/metadata"): public("answers 405 to anyone"),
    ("GET", "/fhir"): API,
    ("POST", "/fhir"): API,
    ("POST", "/fhir/_search"): API,
    ("GET", "/fhir/_history"): API,
    ("GET", "/fhir/{rtype}"): API,
    ("POST", "/fhir/{rtype}"): API,
    ("PUT", "/fhir/{rtype}"): API,
    ("DELETE", "/fhir/{rtype}"): API,
    ("POST", "/fhir/{rtype}/_search"): API,
    ("GET", "/fhir/{rtype}/_history"): API,
    ("POST", "/fhir/{rtype}/$validate"): API,
    ("GET", "/fhir/{rtype}/{rid}"): API,
    ("PUT", "/fhir/{rtype}/{rid}"): API,
    ("PATCH", "/fhir/{rtype}/{rid}"): API,
    ("DELETE", "/fhir/{rtype}/{rid}"): API,
    ("GET", "/fhir/{rtype}/{rid}/_history"): API,
    ("GET", "/fhir/{rtype}/{rid}/_history/{vid}"): API,
    ("GET", "/fhir/Patient/{rid}/$everything"): API,
    ("POST", "/fhir/Patient/{rid}/$break-glass"): API,
    ("GET", "/fhir/$export"): API,
    ("POST", "/fhir/$export"): API,
    ("GET", "/fhir/Patient/$export"): API,
    ("POST", "/fhir/Patient/$export"): API,
    ("GET", "/fhir/Group/{group_id}/$export"): API,
    ("POST", "/fhir/Group/{group_id}/$export"): API,
    ("GET", "/fhir/_export-status/{job_id}"): API,
    ("DELETE", "/fhir/_export-status/{job_id}"): API,
    ("GET", "/fhir/_export-file/{job_id}/{name}"): API,
    # Portal
    (MOUNT, "/static/portal"): public("the portal's stylesheet"),
    (MOUNT, "/static/vendor"): public("htmx, fetched at install time"),
    ("GET", "/login"): public("the portal's sign-in entry"),
    ("GET", "/portal/callback"): public("the sign-in callback: checks its state and code"),
    ("POST", "/logout"): public("signing out: ends a session only with its CSRF token"),
    ("GET", "/signed-out"): public("the page after signing out"),
    ("GET", "/lang"): public("switches the language cookie"),
    ("GET", "/"): PAGE,
    ("GET", "/password"): PAGE,
    ("POST", "/password"): PAGE,
    ("GET", "/consents"): PAGE,
    ("POST", "/consents"): PAGE,
    ("GET", "/consents/new"): PAGE,
    ("GET", "/consents/recipients"): PAGE,
    ("POST", "/consents/{consent_id}/revoke"): PAGE,
    ("GET", "/access-log"): PAGE,
}

#: A file to ask each mount for.
MOUNT_FILES = {
    "/static/swagger-ui": "swagger-ui.css",
    "/static/portal": "portal.css",
    "/static/vendor": "htmx.min.js",
}
#: Search criteria of the routes that need them.
QUERIES = {("PUT", "/fhir/{rtype}"): "_id={rid}", ("DELETE", "/fhir/{rtype}"): "_id={rid}"}


def listed(treatment: str) -> list[tuple[str, str]]:
    return [key for key, entry in ROUTES.items() if entry.kind == treatment]


def route_id(key: tuple[str, str]) -> str:
    return " ".join(key)


def application_routes(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path) of every route; (MOUNT, path) of mounts; ("?", path) of anything else.

    `iter_route_contexts` also walks the routers the application includes, which FastAPI
    keeps as one entry each in `app.routes`."""
    found = set()
    for context in iter_route_contexts(app.routes):
        route = context.original_route
        if isinstance(route, Mount):
            found.add((MOUNT, route.path))
        elif context.methods:
            found.update((method, str(context.path)) for method in context.methods)
        else:  # a WebSocket route, say: no treatment of the table covers it
            found.add(("?", str(context.path)))
    return found


def route_of(app: FastAPI, method: str, url: str) -> str | None:
    """The path of the route the application sends `method url` to."""
    path = urlsplit(url).path
    scope = {"type": "http", "method": method, "path": path, "root_path": "", "headers": []}
    for context in iter_route_contexts(app.routes):
        match, _ = context.matches(scope)
        if match == Match.FULL:
            return str(context.path)
    return None


# -- the city ------------------------------------------------------------------------------

RESIDENT_SCOPES = ("patient/*.read", "patient/Consent.write")
STAFF_SCOPES = ("user/*.read", "user/*.write")
ASYNC = {"Prefer": "respond-async"}


def uid() -> str:
    return uuid.uuid4().hex[:12]


@dataclass
class City:
    http: TestClient
    a: str  # Organization ids
    b: str
    alice: str  # Patient ids
    bob: str
    alice_lab: str  # held by B
    alice_visit: str
    alice_panel: str  # has a member: bob_lab
    bob_lab: str  # held by A
    bob_visit: str
    bob_panel: str  # has a member: alice_lab
    group: str  # alice's
    consent: str  # alice's, to hospital A
    job: str  # the platform's export of organizations
    file: str  # one of its files

    @property
    def app(self) -> FastAPI:
        return self.http.app  # type: ignore[return-value]

    def fill(self, template: str) -> str:
        """The template with the city's ids: "/fhir/Patient/{alice}"."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "http"}
        return template.format(**values)

    def resident(self, pid: str, scopes: tuple[str, ...] = RESIDENT_SCOPES) -> dict[str, str]:
        return bearer(self.app, "resident", who=f"Patient/{pid}", scopes=scopes)

    def staff(self, role: str, org: str, scopes: tuple[str, ...] = STAFF_SCOPES) -> dict[str, str]:
        who, organization = f"Practitioner/{uid()}", f"Organization/{org}"
        return bearer(self.app, role, who=who, organization=organization, scopes=scopes)

    def bob_ids(self) -> set[str]:
        return {self.bob, self.bob_lab, self.bob_visit, self.bob_panel}


def make(http: TestClient, resource: dict[str, Any], headers: dict[str, str] | None = None) -> str:
    response = http.post(f"/fhir/{resource['resourceType']}", json=resource, headers=headers or {})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def patient(family: str, given: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "name": [{"family": family, "given": [given]}]}


def observation(subject: str, text: str, members: tuple[str, ...] = ()) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": text},
        "subject": {"reference": f"Patient/{subject}"},
    }
    if members:
        body["hasMember"] = [{"reference": f"Observation/{m}"} for m in members]
    return body


def encounter(subject: str, org: str) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": f"Patient/{subject}"},
        "serviceProvider": {"reference": f"Organization/{org}"},
    }


def local(url: str) -> str:
    """The path and query of an absolute URL the server gave."""
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


def manifest_of(http: TestClient, status_url: str, headers: dict[str, str]) -> dict[str, Any]:
    """Poll an export's status until its manifest (the job runner works in the background)."""
    deadline = time.monotonic() + 60
    while True:
        response = http.get(local(status_url), headers=headers)
        if response.status_code != 202:
            assert response.status_code == 200, response.text
            manifest: dict[str, Any] = response.json()
            return manifest
        assert time.monotonic() < deadline, "the export did not finish within a minute"
        time.sleep(0.05)


def kick_off(http: TestClient, url: str, headers: dict[str, str]) -> str:
    """Start an export; the path of its status."""
    kicked = http.get(url, headers={**headers, **ASYNC})
    assert kicked.status_code == 202, kicked.text
    return local(kicked.headers["content-location"])


@pytest.fixture(scope="module")
def city(client: TestClient) -> City:
    http, app = client, client.app
    assert isinstance(app, FastAPI)
    a, b = (make(http, {"resourceType": "Organization", "name": f"{k} {uid()}"}) for k in "AB")
    his_a = bearer(app, organization=f"Organization/{a}", client_id="his-a")
    his_b = bearer(app, organization=f"Organization/{b}", client_id="his-b")
    alice, bob = make(http, patient("马", "爱丽")), make(http, patient("赵", "博文"))
    alice_lab = make(http, observation(alice, "血红蛋白"), his_b)
    bob_lab = make(http, observation(bob, "血糖"), his_a)
    now = datetime.now(UTC)
    terms = ConsentTerms(
        f"Patient/{alice}",
        f"Patient/{alice}",
        f"Organization/{a}",
        "A",
        now,
        now + timedelta(days=1),
        None,
    )
    alice_token = bearer(app, "resident", who=f"Patient/{alice}", scopes=RESIDENT_SCOPES)
    group = {
        "resourceType": "Group",
        "type": "person",
        "actual": True,
        "member": [{"entity": {"reference": f"Patient/{alice}"}}],
    }
    manifest = manifest_of(http, kick_off(http, "/fhir/$export?_type=Organization", {}), {})
    first_file = manifest["output"][0]["url"]
    return City(
        http,
        a=a,
        b=b,
        alice=alice,
        bob=bob,
        alice_lab=alice_lab,
        alice_visit=make(http, encounter(alice, b), his_b),
        alice_panel=make(http, observation(alice, "复查", (bob_lab,)), his_b),
        bob_lab=bob_lab,
        bob_visit=make(http, encounter(bob, a), his_a),
        bob_panel=make(http, observation(bob, "血常规", (alice_lab,)), his_a),
        group=make(http, group),
        consent=make(http, consent_resource(terms), alice_token),
        job=urlsplit(first_file).path.split("/")[-2],
        file=urlsplit(first_file).path.split("/")[-1],
    )


# -- calling a route -----------------------------------------------------------------------


def sample_url(city: City, method: str, path: str) -> str:
    """A URL of the route with plausible values: existing resources, job and file."""
    if method == MOUNT:
        return f"{path}/{MOUNT_FILES[path]}"
    values = {"rtype": "Patient", "rid": city.alice, "vid": "1", "group_id": city.group}
    values |= {"job_id": city.job, "name": city.file, "consent_id": city.consent}
    url = path.format(**values)
    query = QUERIES.get((method, path))
    return f"{url}?{query.format(**values)}" if query else url


def sample_body(city: City, method: str, path: str) -> dict[str, Any]:
    """What a caller with the right to would send: each write would change alice's record."""
    if path.startswith("/fhir/") and "$export" in path:
        return {"headers": ASYNC}
    if path in ("/fhir/_search", "/fhir/{rtype}/_search"):
        return {"data": {"_id": city.alice}}
    if path == "/fhir":
        delete = {"request": {"method": "DELETE", "url": f"Patient/{city.alice}"}}
        return {"json": {"resourceType": "Bundle", "type": "transaction", "entry": [delete]}}
    if path.endswith("$break-glass"):
        reason = {"name": "reason", "valueString": "昏迷送医"}
        return {"json": {"resourceType": "Parameters", "parameter": [reason]}}
    if method == "PATCH":
        change = [{"op": "replace", "path": "/name/0/family", "value": "改"}]
        return {"json": change, "headers": {"Content-Type": "application/json-patch+json"}}
    if method in ("PUT", "POST") and path.startswith("/fhir"):
        return {"json": {**patient("改", "名"), "id": city.alice}}
    if method == "POST":  # a portal form
        return {"data": {"csrf_token": "guessed", "new_password": "x", "recipient": city.a}}
    return {}


def without_credentials(http: TestClient, method: str, url: str, **kw: Any) -> Response:
    """The request without the platform's Authorization header (nor any other)."""
    request = http.build_request("GET" if method == MOUNT else method, url, **kw)
    del request.headers["authorization"]
    return http.send(request, follow_redirects=False)


def what_a_write_would_change(city: City) -> tuple[Any, ...]:
    http = city.http
    record = http.get(f"/fhir/Patient/{city.alice}").json()
    consent = http.get(f"/fhir/Consent/{city.consent}").json()
    return (
        record["meta"]["versionId"],
        record["name"],
        http.get("/fhir/Patient?_summary=count").json()["total"],
        consent["meta"]["versionId"],
        consent["status"],
        http.get(f"/fhir/_export-status/{city.job}").status_code,
    )


def issue_code(response: Response) -> str:
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    return str(body["issue"][0]["code"])


def ids(response: Response) -> set[str]:
    """The ids of the resources of a Bundle (history entries of deletions included)."""
    assert response.status_code == 200, response.text
    found = set()
    for entry in response.json().get("entry", []):
        if "resource" in entry:
            found.add(entry["resource"]["id"])
        elif "fullUrl" in entry:
            found.add(entry["fullUrl"].rstrip("/").split("/")[-1])
    return found


# -- every route is classified ---------------------------------------------------------------


def test_every_route_of_the_application_is_in_the_table(client: TestClient) -> None:
    app = client.app
    assert isinstance(app, FastAPI)
    found = application_routes(app)
    unclassified = sorted(found - ROUTES.keys())
    assert not unclassified, (
        f"routes without a treatment in ROUTES: {unclassified}; add each as public (with why) "
        "or as API/PAGE, which the tests below then call without credentials"
    )
    stale = sorted(ROUTES.keys() - found)
    assert not stale, f"ROUTES names routes the application does not have: {stale}"
    for key, treatment in ROUTES.items():
        assert treatment.kind != PUBLIC or treatment.reason, f"{key} is public without a reason"


@pytest.mark.parametrize("key", list(ROUTES), ids=route_id)
def test_every_sample_url_reaches_its_own_route(city: City, key: tuple[str, str]) -> None:
    method, path = key
    url = sample_url(city, method, path)
    assert route_of(city.app, "GET" if method == MOUNT else method, url) == path


# -- without credentials -----------------------------------------------------------------------


@pytest.mark.parametrize("key", listed(TOKEN), ids=route_id)
def test_an_api_route_without_a_token_answers_401_with_a_challenge(
    city: City, key: tuple[str, str]
) -> None:
    method, path = key
    before = what_a_write_would_change(city)
    url = sample_url(city, method, path)
    response = without_credentials(city.http, method, url, **sample_body(city, method, path))
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == 'Bearer realm="CityHealth"'
    assert issue_code(response) == "login"
    assert what_a_write_would_change(city) == before


@pytest.mark.parametrize("key", listed(SESSION), ids=route_id)
def test_a_portal_page_without_a_session_sends_to_sign_in(city: City, key: tuple[str, str]) -> None:
    method, path = key
    before = what_a_write_would_change(city)
    url = sample_url(city, method, path)
    back = quote(url if method == "GET" else "/", safe="")
    body = sample_body(city, method, path)
    response = without_credentials(city.http, method, url, **body)
    assert response.status_code == 303, response.text
    assert response.headers["location"] == f"/login?next={back}"
    # An API access token is no portal session.
    with_token = city.http.request(method, url, follow_redirects=False, **body)
    assert with_token.status_code == 303
    assert with_token.headers["location"] == f"/login?next={back}"
    # htmx is told to load the sign-in page instead of following the redirect inside the page.
    htmx = without_credentials(city.http, method, url, **body, headers={"HX-Request": "true"})
    assert htmx.status_code == 401
    assert htmx.headers["hx-redirect"] == f"/login?next={back}"
    assert what_a_write_would_change(city) == before


@pytest.mark.parametrize("key", listed(PUBLIC), ids=route_id)
def test_a_public_route_answers_without_credentials(city: City, key: tuple[str, str]) -> None:
    method, path = key
    url = sample_url(city, method, path)
    response = without_credentials(city.http, method, url)
    assert response.status_code < 500, response.text
    assert response.headers.get("www-authenticate") != 'Bearer realm="CityHealth"'


# -- forged and stale tokens ---------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def tampered(token: str) -> str:
    """The token with one bit of its signature flipped."""
    header, payload, signature = token.split(".")
    raw = bytearray(unb64(signature))
    raw[len(raw) // 2] ^= 0x01
    return f"{header}.{payload}.{b64(bytes(raw))}"


def platform_token(app: FastAPI) -> str:
    return bearer(app)["Authorization"].removeprefix("Bearer ")


def bad_tokens(app: FastAPI, foreign_keys: Path) -> dict[str, str]:
    """Tokens the application must refuse, each otherwise like the platform's own."""
    tokens = app.state.security.tokens
    valid = platform_token(app)
    foreign = KeyRing.load_or_create(foreign_keys)
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)

    def issued(service: TokenService) -> str:
        return service.issue_access_token(
            "test-platform", scopes=("system/*.*",), role="system", client_id="test-platform"
        )

    return {
        "tampered signature": tampered(valid),
        "foreign key, its own kid": issued(TokenService(foreign, tokens.issuer, tokens.audience)),
        "foreign key, our kid": jwt.encode(
            jwt.decode(valid, options={"verify_signature": False}),
            foreign.current.private_key,
            algorithm="ES256",
            headers=jwt.get_unverified_header(valid),
        ),
        "expired": issued(
            TokenService(tokens.keyring, tokens.issuer, tokens.audience, clock=lambda: an_hour_ago)
        ),
        "not a JWT": "not-a-token",
    }


@pytest.mark.parametrize("path", ["/fhir/Patient/{alice}", "/fhir/Observation", "/metrics"])
def test_a_forged_or_stale_token_answers_401_invalid_token(
    city: City, path: str, tmp_path: Path
) -> None:
    url = city.fill(path)
    assert city.http.get(url).status_code == 200  # the genuine token passes
    for name, token in bad_tokens(city.app, tmp_path / "foreign").items():
        response = city.http.get(url, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401, name
        assert response.headers["www-authenticate"] == (
            'Bearer realm="CityHealth", error="invalid_token"'
        ), name
        assert issue_code(response) == "login"


# -- roles and scopes: 403 -------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    who: str  # a key of `caller`
    method: str
    path: str
    body: str = ""  # a key of `refusal_body`


def caller(city: City, who: str) -> dict[str, str]:
    if who == "resident":
        return city.resident(city.alice)
    if who == "observations only":
        return city.resident(city.alice, ("patient/Observation.rs",))
    if who == "pharmacist":
        return city.staff("pharmacist", city.a, ("user/*.read", "user/MedicationDispense.cu"))
    if who == "security admin":
        return city.staff("security_admin", city.a, ("online_access",))
    if who == "audit admin":
        return city.staff("audit_admin", city.a, ("user/AuditEvent.rs",))
    assert who == "doctor"
    return city.staff("doctor", city.a)


def refusal_body(city: City, body: str) -> dict[str, Any]:
    if body == "observation":
        return {"json": observation(city.alice, "自测血压")}
    if body == "own record":
        return {"json": city.http.get(f"/fhir/Patient/{city.alice}").json()}
    if body == "reason":
        reason = {"name": "reason", "valueString": "急诊"}
        return {"json": {"resourceType": "Parameters", "parameter": [reason]}}
    return {}


REFUSALS = {
    "a resident writes an Observation": Refusal(
        "resident", "POST", "/fhir/Observation", "observation"
    ),
    "a resident updates their own Patient": Refusal(
        "resident", "PUT", "/fhir/Patient/{alice}", "own record"
    ),
    "a resident declares an emergency": Refusal(
        "resident", "POST", "/fhir/Patient/{bob}/$break-glass", "reason"
    ),
    "observations only, reading a Patient": Refusal(
        "observations only", "GET", "/fhir/Patient/{alice}"
    ),
    "observations only, searching Encounters": Refusal(
        "observations only", "GET", "/fhir/Encounter"
    ),
    "security admin reads the directory": Refusal(
        "security admin", "GET", "/fhir/Organization/{a}"
    ),
    "security admin searches patients": Refusal("security admin", "GET", "/fhir/Patient"),
    "security admin reads a patient": Refusal("security admin", "GET", "/fhir/Patient/{alice}"),
    "security admin reads the audit trail": Refusal("security admin", "GET", "/fhir/AuditEvent"),
    "security admin exports": Refusal("security admin", "GET", "/fhir/$export"),
    "audit admin reads a patient": Refusal("audit admin", "GET", "/fhir/Patient/{alice}"),
    "audit admin writes an Observation": Refusal(
        "audit admin", "POST", "/fhir/Observation", "observation"
    ),
    "a pharmacist declares an emergency": Refusal(
        "pharmacist", "POST", "/fhir/Patient/{alice}/$break-glass", "reason"
    ),
    "a doctor reads the metrics": Refusal("doctor", "GET", "/metrics"),
    "a resident reads the metrics": Refusal("resident", "GET", "/metrics"),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_a_role_or_scope_that_does_not_allow_the_request_answers_403(city: City, name: str) -> None:
    refusal = REFUSALS[name]
    headers = {**caller(city, refusal.who), **ASYNC}
    before = what_a_write_would_change(city)
    response = city.http.request(
        refusal.method, city.fill(refusal.path), headers=headers, **refusal_body(city, refusal.body)
    )
    assert response.status_code == 403, response.text
    assert issue_code(response) == "forbidden"
    assert what_a_write_would_change(city) == before


# -- another resident's data looks missing -------------------------------------------------------

#: Requests that name one of bob's records ({patient}, {observation}, {encounter}, {panel},
#: {family}): alice gets the same answer as when the record does not exist.
LOOKUPS = {
    "read a Patient": "/fhir/Patient/{patient}",
    "read an Observation": "/fhir/Observation/{observation}",
    "read an Encounter": "/fhir/Encounter/{encounter}",
    "vread": "/fhir/Observation/{observation}/_history/1",
    "instance history": "/fhir/Encounter/{encounter}/_history",
    "$everything": "/fhir/Patient/{patient}/$everything",
    "search by _id": "/fhir/Observation?_id={observation}&_total=accurate",
    "search Patient by _id": "/fhir/Patient?_id={patient}&_total=accurate",
    "search by subject": "/fhir/Encounter?subject=Patient/{patient}&_total=accurate",
    "chain: subject's family": "/fhir/Encounter?subject.family={family}&_total=accurate",
    "chain through a visible panel": (
        "/fhir/Observation?has-member:Observation.subject=Patient/{patient}&_total=accurate"
    ),
    "_has: named by a hidden panel": (
        "/fhir/Observation?_has:Observation:has-member:_id={panel}&_total=accurate"
    ),
    "_has: the patient of a hidden visit": (
        "/fhir/Patient?_has:Encounter:subject:_id={encounter}&_total=accurate"
    ),
    "search across types by _id": "/fhir?_id={observation}&_type=Observation&_total=accurate",
}


def hidden_and_missing(city: City) -> tuple[dict[str, str], dict[str, str]]:
    hidden = {
        "patient": city.bob,
        "observation": city.bob_lab,
        "encounter": city.bob_visit,
        "panel": city.bob_panel,
        "family": "赵",
    }
    return hidden, {name: f"x{uid()}" for name in hidden}


def same_answer(hidden: Response, missing: Response, names: tuple[str, str]) -> None:
    """Two answers alike but for the id asked about."""
    assert hidden.status_code == missing.status_code, (hidden.text, missing.text)
    if hidden.status_code == 200:
        assert ids(hidden) == ids(missing) == set()
        assert hidden.json().get("total") == missing.json().get("total")
    else:
        assert issue_code(hidden) == issue_code(missing)
        said = [r.json()["issue"][0].get("diagnostics", "") for r in (hidden, missing)]
        assert said[0].replace(names[0], "ID") == said[1].replace(names[1], "ID")


@pytest.mark.parametrize("name", list(LOOKUPS))
def test_another_residents_record_answers_like_a_missing_one(city: City, name: str) -> None:
    hidden, missing = hidden_and_missing(city)
    template, alice = LOOKUPS[name], city.resident(city.alice)
    # The platform finds something through bob's record here: the request could leak.
    control = city.http.get(template.format(**hidden))
    assert control.status_code == 200, control.text
    if control.json()["resourceType"] == "Bundle":
        assert ids(control)
    used = next(key for key in hidden if "{" + key + "}" in template)
    same_answer(
        city.http.get(template.format(**hidden), headers=alice),
        city.http.get(template.format(**missing), headers=alice),
        (hidden[used], missing[used]),
    )


#: Requests that could carry bob's records into alice's results: (request, what alice gets).
REACHES = {
    "_include of a member": (
        "/fhir/Observation?_id={alice_panel}&_include=Observation:has-member",
        {"alice_panel"},
    ),
    "_revinclude of a panel": (
        "/fhir/Observation?_id={alice_lab}&_revinclude=Observation:has-member",
        {"alice_lab"},
    ),
    "_revinclude of visits": (
        "/fhir/Patient?_id={alice},{bob}&_revinclude=Encounter:subject",
        {"alice", "alice_visit"},
    ),
    "_include:iterate": (
        "/fhir/Observation?_id={alice_panel}&_include=Observation:has-member"
        "&_include:iterate=Observation:subject",
        {"alice_panel", "alice"},
    ),
    "$everything": ("/fhir/Patient/{alice}/$everything", {"alice", "alice_lab", "alice_panel"}),
    "type history": ("/fhir/Observation/_history", {"alice_lab", "alice_panel"}),
    "type history of patients": ("/fhir/Patient/_history", {"alice"}),
    "system history": ("/fhir/_history?_count=1000", {"alice", "alice_lab", "alice_panel"}),
    "search across types": (
        "/fhir?_type=Patient,Observation,Encounter&_count=1000",
        {"alice", "alice_lab", "alice_panel", "alice_visit"},
    ),
    "search every Observation": ("/fhir/Observation", {"alice_lab", "alice_panel"}),
}


@pytest.mark.parametrize("name", list(REACHES))
def test_no_way_of_searching_reaches_another_residents_records(city: City, name: str) -> None:
    template, expected = REACHES[name]
    url = city.fill(template)
    assert ids(city.http.get(url)) & city.bob_ids(), "the platform reaches bob's records here"
    found = ids(city.http.get(url, headers=city.resident(city.alice)))
    assert not found & city.bob_ids()
    hers = {getattr(city, key) for key in expected}
    # Histories and $everything also hold her audit trail, consents and the like.
    assert found >= hers if "history" in name or "everything" in name else found == hers


@dataclass
class Export:
    status_url: str
    file_urls: list[str]
    records: list[dict[str, Any]]


def patient_export(city: City, headers: dict[str, str]) -> Export:
    """A Patient-level export by the caller, its files read through the manifest's URLs."""
    status_url = kick_off(city.http, "/fhir/Patient/$export", headers)
    manifest = manifest_of(city.http, status_url, headers)
    assert manifest["requiresAccessToken"] is True
    result = Export(status_url, [], [])
    for item in manifest["output"]:
        result.file_urls.append(local(item["url"]))
        response = city.http.get(result.file_urls[-1], headers=headers)
        assert response.status_code == 200, response.text
        lines = [json.loads(line) for line in response.text.splitlines() if line.strip()]
        assert len(lines) == item["count"]
        result.records += lines
    return result


def test_a_patient_export_holds_only_the_residents_own_compartment(city: City) -> None:
    done = patient_export(city, city.resident(city.alice))
    found = {record["id"] for record in done.records}
    assert {city.alice, city.alice_lab, city.alice_visit, city.alice_panel} <= found
    assert not found & city.bob_ids()
    # Each record is hers or names her (her visits, results, consents, who read her record).
    me = f"Patient/{city.alice}"
    for record in done.records:
        mine = (record["resourceType"], record["id"]) == ("Patient", city.alice)
        assert mine or f'"reference": "{me}"' in json.dumps(record, ensure_ascii=False), record


def test_nobody_else_can_poll_or_download_a_residents_export(city: City) -> None:
    done = patient_export(city, city.resident(city.alice))
    bob = city.resident(city.bob)
    job = done.status_url.split("/")[-1]
    other = f"x{uid()}"
    same_answer(
        city.http.get(done.status_url, headers=bob),
        city.http.get(done.status_url.replace(job, other), headers=bob),
        (job, other),
    )
    for url in done.file_urls:
        same_answer(
            city.http.get(url, headers=bob),
            city.http.get(url.replace(job, other), headers=bob),
            (job, other),
        )
    # …and the export is still there for the one who asked.
    assert city.http.get(done.status_url, headers=city.resident(city.alice)).status_code == 200


# -- the audit trail a resident reads ------------------------------------------------------------

#: Where alice reads records of who accessed her record.
AUDIT_CHANNELS = {
    "AuditEvent search": "/fhir/AuditEvent?_count=1000",
    "AuditEvent history": "/fhir/AuditEvent/_history?_count=1000",
    "system history": "/fhir/_history?_count=1000",
    # $everything holds the audit trail only when _type asks for it.
    "$everything": "/fhir/Patient/{alice}/$everything?_count=1000&_type=AuditEvent",
    "Patient/$export": "",
}


def every_resource(http: TestClient, url: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    """The resources of a Bundle and of its next pages."""
    found: list[dict[str, Any]] = []
    next_url: str | None = url
    while next_url:
        response = http.get(next_url, headers=headers)
        assert response.status_code == 200, response.text
        body = response.json()
        found += [entry["resource"] for entry in body.get("entry", []) if "resource" in entry]
        links = [link["url"] for link in body.get("link", []) if link["relation"] == "next"]
        next_url = local(links[0]) if links else None
    return found


def requestor(event: dict[str, Any]) -> str | None:
    agents = [agent for agent in event.get("agent", []) if agent.get("requestor")]
    return agents[0].get("who", {}).get("reference") if agents else None


def named(records: list[dict[str, Any]], wanted: set[str]) -> set[str]:
    """Which of `wanted` appear anywhere in the records."""
    text = json.dumps(records, ensure_ascii=False)
    return {value for value in wanted if value in text}


@pytest.mark.parametrize("channel", list(AUDIT_CHANNELS))
def test_the_record_of_someone_elses_search_names_no_other_residents_record(
    city: City, channel: str
) -> None:
    # The platform searching both residents' visits at once leaves one audit record.
    searched = city.http.get(f"/fhir/Encounter?_id={city.alice_visit},{city.bob_visit}")
    assert ids(searched) == {city.alice_visit, city.bob_visit}
    alice = city.resident(city.alice)
    if channel == "Patient/$export":
        records = patient_export(city, alice).records
    else:
        records = every_resource(city.http, city.fill(AUDIT_CHANNELS[channel]), alice)
    others = [
        record
        for record in records
        if record["resourceType"] == "AuditEvent" and requestor(record) != f"Patient/{city.alice}"
    ]
    assert others, "alice sees who accessed her record"
    assert not named(others, city.bob_ids()), "alice reads bob's records in the audit trail"


def told(event: dict[str, Any], value: str) -> str:
    """What an audit record says of a request, but for the value the request named."""
    said = {key: event.get(key) for key in ("subtype", "action", "outcome", "entity")}
    for entity in said["entity"] or ():
        if "query" in entity:  # base64 of the query, read as text
            entity["query"] = base64.b64decode(entity["query"]).decode()
    text = json.dumps(said, ensure_ascii=False)
    return text.replace(quote(value, safe=""), "VALUE").replace(value, "VALUE")


@pytest.mark.parametrize("name", list(LOOKUPS))
def test_the_record_of_a_residents_lookup_tells_no_more_than_its_answer(
    city: City, name: str
) -> None:
    hidden, missing = hidden_and_missing(city)
    template, alice = LOOKUPS[name], city.resident(city.alice)
    used = next(key for key in hidden if "{" + key + "}" in template)
    for values in (hidden, missing):
        city.http.get(template.format(**values), headers=alice)
    latest = city.http.get("/fhir/AuditEvent?_sort=-date&_count=50", headers=alice)
    assert latest.status_code == 200, latest.text
    mine = [
        entry["resource"]
        for entry in latest.json().get("entry", [])
        if requestor(entry["resource"]) == f"Patient/{city.alice}"
    ]

    def record_of(value: str) -> dict[str, Any]:
        found = [event for event in mine if named([event], {value, quote(value, safe="")})]
        assert found, f"no audit record of alice's request naming {value}"
        return found[0]  # the newest

    assert told(record_of(hidden[used]), hidden[used]) == told(
        record_of(missing[used]), missing[used]
    )
