"""The authorization server over HTTP: SMART configuration, code + PKCE, refresh rotation,
client credentials, revocation, logout and rate limits, on a SQLite database at head."""

from __future__ import annotations

import base64
import html
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cityhealth.db import Database
from cityhealth.migrate import upgrade
from cityhealth.security.accounts import Accounts, SecuritySettings
from cityhealth.security.keys import KeyRing
from cityhealth.security.oauth_api import build_oauth_router
from cityhealth.security.tokens import AccessClaims, TokenService, pkce_challenge
from manual_clock import ManualClock

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
ISSUER = "https://health.zhongwei.example"
AUDIENCE = "https://health.zhongwei.example/fhir"
APP_REDIRECT = "https://app.example/callback"
PORTAL_REDIRECT = "https://health.zhongwei.example/portal/callback"
PASSWORD = "Zhongwei-2026"
RESIDENT_SCOPE = "patient/*.* launch/patient offline_access"


@dataclass
class Env:
    http: TestClient
    accounts: Accounts
    tokens: TokenService
    keyring: KeyRing
    clock: ManualClock
    his_secret: str


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("oauth") / "template.db"
    upgrade(f"sqlite:///{path}")
    return path


def make_env(template: Path, tmp_path: Path, settings: SecuritySettings) -> Iterator[Env]:
    shutil.copy(template, tmp_path / "oauth.db")
    db = Database(f"sqlite:///{tmp_path / 'oauth.db'}", pool_size=2)
    clock = ManualClock(T0)
    accounts = Accounts(db, settings, clock)
    keyring = KeyRing.load_or_create(tmp_path / "keys", clock)
    tokens = TokenService(
        keyring, settings.issuer, settings.audience, settings.access_token_minutes, clock
    )
    accounts.create_account(
        "mali", PASSWORD, role="resident", display_name="马丽", fhir_user="Patient/p1"
    )
    accounts.create_account(
        "wangyi",
        PASSWORD,
        role="doctor",
        display_name="王医生",
        fhir_user="Practitioner/d1",
        organization="Organization/h1",
    )
    accounts.create_client(
        "app",
        name="健康中卫",
        kind="public",
        redirect_uris=[APP_REDIRECT],
        scopes="patient/*.read launch/patient offline_access online_access user/*.read",
    )
    accounts.create_client(
        "portal",
        name="CityHealth 门户",
        kind="public",
        redirect_uris=[PORTAL_REDIRECT],
        scopes="patient/*.* user/*.* launch/patient online_access",
    )
    _, his_secret = accounts.create_client(
        "his",
        name="市人民医院 HIS",
        kind="confidential",
        scopes="system/*.read system/Observation.write",
        role="system",
        organization="Organization/h1",
    )
    assert his_secret
    app = FastAPI()
    app.include_router(build_oauth_router(accounts, tokens, keyring, settings))
    with TestClient(app, follow_redirects=False, client=("203.0.113.7", 5000)) as http:
        yield Env(http, accounts, tokens, keyring, clock, his_secret)
    db.dispose()


@pytest.fixture
def env(template: Path, tmp_path: Path) -> Iterator[Env]:
    yield from make_env(template, tmp_path, SecuritySettings(issuer=ISSUER, audience=AUDIENCE))


# Helpers


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    return verifier, pkce_challenge(verifier)


def authorize_params(
    challenge: str, scope: str = RESIDENT_SCOPE, client_id: str = "app", **extra: str
) -> dict[str, str]:
    redirect = PORTAL_REDIRECT if client_id == "portal" else APP_REDIRECT
    return {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect,
        "scope": scope,
        "state": "st-123",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "aud": AUDIENCE,
        **extra,
    }


def hidden_fields(page: str) -> dict[str, str]:
    found = re.findall(r'<input type="hidden" name="([^"]*)" value="([^"]*)">', page)
    return {html.unescape(name): html.unescape(value) for name, value in found}


def redirect_query(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 303, response.text
    location = response.headers["location"]
    return {name: values[0] for name, values in parse_qs(urlsplit(location).query).items()}


def login(
    env: Env, challenge: str, username: str = "mali", password: str = PASSWORD, **params: str
) -> httpx.Response:
    """Open the login form, then post it back with the credentials."""
    form = env.http.get("/oauth/authorize", params=authorize_params(challenge, **params))
    assert form.status_code == 200, form.text
    fields = {**hidden_fields(form.text), "username": username, "password": password}
    return env.http.post("/oauth/authorize", data=fields)


def get_code(env: Env, challenge: str, **kwargs: Any) -> str:
    query = redirect_query(login(env, challenge, **kwargs))
    assert query["state"] == "st-123" and query["iss"] == ISSUER
    return query["code"]


def exchange(
    env: Env, code: str, verifier: str, client_id: str = "app", redirect_uri: str = APP_REDIRECT
) -> httpx.Response:
    return env.http.post(
        "/oauth/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "code_verifier": verifier,
            "redirect_uri": redirect_uri,
            "client_id": client_id,
        },
    )


def refresh(env: Env, token: str, client_id: str = "app") -> httpx.Response:
    data = {"grant_type": "refresh_token", "refresh_token": token, "client_id": client_id}
    return env.http.post("/oauth/token", data=data)


def basic(client_id: str, secret: str) -> dict[str, str]:
    encoded = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {encoded}"}


def claims_of(env: Env, body: dict[str, Any]) -> AccessClaims:
    return env.tokens.verify_access_token(body["access_token"], is_revoked=env.accounts.is_revoked)


def assert_error(response: httpx.Response, status: int, error: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"] == error
    assert response.headers["cache-control"] == "no-store"


# Discovery


def test_smart_configuration(env: Env) -> None:
    config = env.http.get("/.well-known/smart-configuration").json()
    assert config["issuer"] == ISSUER
    assert config["jwks_uri"] == f"{ISSUER}/.well-known/jwks.json"
    assert config["authorization_endpoint"] == f"{ISSUER}/oauth/authorize"
    assert config["token_endpoint"] == f"{ISSUER}/oauth/token"
    assert config["revocation_endpoint"] == f"{ISSUER}/oauth/revoke"
    assert config["code_challenge_methods_supported"] == ["S256"]
    assert config["response_types_supported"] == ["code"]
    assert set(config["grant_types_supported"]) == {
        "authorization_code",
        "refresh_token",
        "client_credentials",
    }
    assert {"client_secret_basic", "client_secret_post", "none"} == set(
        config["token_endpoint_auth_methods_supported"]
    )
    assert {
        "launch-standalone",
        "client-public",
        "client-confidential-symmetric",
        "context-standalone-patient",
        "permission-patient",
        "permission-user",
        "permission-v1",
        "permission-v2",
    } <= set(config["capabilities"])
    assert {"patient/*.read", "user/*.read", "system/*.*", "launch/patient"} <= set(
        config["scopes_supported"]
    )


def test_jwks_publishes_the_public_keys_only(env: Env) -> None:
    keys = env.http.get("/.well-known/jwks.json").json()["keys"]
    assert [key["kid"] for key in keys] == [env.keyring.current.kid]
    assert keys[0]["alg"] == "ES256" and keys[0]["use"] == "sig"
    assert "d" not in keys[0]
    # A key rotated elsewhere (another process sharing the directory) is published at once.
    other = KeyRing.load_or_create(env.keyring.directory, env.clock)
    env.clock.advance(seconds=1)
    new = other.rotate()
    kids = [key["kid"] for key in env.http.get("/.well-known/jwks.json").json()["keys"]]
    assert kids[0] == new.kid and len(kids) == 2


# The authorization endpoint


def test_the_login_form_is_plain_accessible_chinese(env: Env) -> None:
    _, challenge = pkce()
    response = env.http.get("/oauth/authorize", params=authorize_params(challenge))
    assert response.status_code == 200
    page = response.text
    assert '<html lang="zh-CN">' in page
    assert '<label for="username">用户名</label>' in page and '<label for="password">' in page
    assert "健康中卫" in page
    for external in ("<script", " src=", "http://", "https://cdn"):
        assert external not in page
    # The portal's own stylesheet, from this site only.
    assert re.findall(r'<link rel="([^"]+)" href="([^"]*)"', page) == [
        ("icon", "data:,"),
        ("stylesheet", "/static/portal/portal.css"),
    ]
    # The request, and the language the form was shown in (for the answer to the POST).
    assert hidden_fields(page) == {**authorize_params(challenge), "lang": "zh_CN"}
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-frame-options"] == "DENY"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"client_id": "nobody"}, "client_id"),
        ({"redirect_uri": "https://evil.example/callback"}, "redirect_uri"),
        ({"redirect_uri": APP_REDIRECT + "/"}, "redirect_uri"),
    ],
)
def test_an_untrusted_redirect_is_never_followed(
    env: Env, change: dict[str, str], message: str
) -> None:
    _, challenge = pkce()
    response = env.http.get("/oauth/authorize", params={**authorize_params(challenge), **change})
    assert response.status_code == 400
    assert "location" not in response.headers and message in response.text


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"code_challenge": ""}, "invalid_request"),
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge": "short"}, "invalid_request"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"scope": "patient/*.everything"}, "invalid_scope"),
        ({"aud": "https://other.example/fhir"}, "invalid_request"),
    ],
)
def test_a_bad_request_goes_back_to_the_client(
    env: Env, change: dict[str, str], error: str
) -> None:
    _, challenge = pkce()
    response = env.http.get("/oauth/authorize", params={**authorize_params(challenge), **change})
    query = redirect_query(response)
    assert response.headers["location"].startswith(APP_REDIRECT + "?")
    assert query["error"] == error and query["state"] == "st-123"


def test_the_full_code_flow_with_pkce(env: Env) -> None:
    verifier, challenge = pkce()
    code = get_code(env, challenge)
    response = exchange(env, code, verifier)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 300
    # Asked patient/*.*: a resident may have read plus Consent write, this app only read.
    assert body["scope"].split() == ["patient/*.read", "launch/patient", "offline_access"]
    assert body["patient"] == "p1" and body["refresh_token"]
    claims = claims_of(env, body)
    assert (claims.role, claims.fhir_user, claims.patient) == ("resident", "Patient/p1", "p1")
    assert claims.client_id == "app" and "sid" in claims.extra


def test_a_code_is_refused_with_a_wrong_verifier_and_works_once(env: Env) -> None:
    verifier, challenge = pkce()
    code = get_code(env, challenge)
    other_verifier, _ = pkce()
    assert_error(exchange(env, code, other_verifier), 400, "invalid_grant")
    assert_error(exchange(env, code, ""), 400, "invalid_grant")
    first = exchange(env, code, verifier)
    assert first.status_code == 200
    # A second use is refused and revokes what the first one gave.
    assert_error(exchange(env, code, verifier), 400, "invalid_grant")
    assert_error(refresh(env, first.json()["refresh_token"]), 400, "invalid_grant")


def test_a_code_is_refused_for_another_redirect_uri_or_client(env: Env) -> None:
    verifier, challenge = pkce()
    code = get_code(env, challenge)
    assert_error(
        exchange(env, code, verifier, redirect_uri=APP_REDIRECT + "?x=1"), 400, "invalid_grant"
    )
    assert_error(
        exchange(env, code, verifier, client_id="portal", redirect_uri=APP_REDIRECT),
        400,
        "invalid_grant",
    )
    assert exchange(env, code, verifier).status_code == 200


def test_a_code_expires_after_sixty_seconds(env: Env) -> None:
    verifier, challenge = pkce()
    code = get_code(env, challenge)
    env.clock.advance(seconds=60)
    assert_error(exchange(env, code, verifier), 400, "invalid_grant")


def test_a_failed_login_says_one_generic_thing(env: Env) -> None:
    _, challenge = pkce()
    wrong = login(env, challenge, password="Wrong-password-1")
    assert wrong.status_code == 200 and "location" not in wrong.headers
    assert "用户名或密码错误" in wrong.text
    unknown = login(env, challenge, username="nobody")
    assert "用户名或密码错误" in unknown.text
    for attempt in range(4):
        login(env, challenge, password=f"Wrong-password-{attempt}")
    # Locked now: the right password gets the very page a wrong one gets.
    locked = login(env, challenge)
    assert locked.text == wrong.text
    env.clock.advance(minutes=15)
    assert redirect_query(login(env, challenge))["code"]


def test_an_expired_password_is_changed_on_the_way(env: Env) -> None:
    verifier, challenge = pkce()
    env.clock.advance(days=90)
    response = login(env, challenge)
    assert response.status_code == 200 and "密码已过期" in response.text
    assert 'name="new_password"' in response.text
    fields = hidden_fields(response.text)
    change = {**fields, "username": "mali", "password": PASSWORD}
    differ = env.http.post(
        "/oauth/authorize",
        data={**change, "new_password": "New-pass-2026", "new_password_confirm": "Other-2026"},
    )
    assert "两次输入的新密码不一致" in differ.text
    reused = env.http.post(
        "/oauth/authorize",
        data={**change, "new_password": PASSWORD, "new_password_confirm": PASSWORD},
    )
    assert "最近 5 次" in reused.text
    changed = env.http.post(
        "/oauth/authorize",
        data={**change, "new_password": "New-pass-2026", "new_password_confirm": "New-pass-2026"},
    )
    assert exchange(env, redirect_query(changed)["code"], verifier).status_code == 200


def test_a_guardian_chooses_the_patient(env: Env) -> None:
    mali = env.accounts.account_by_username("mali")
    assert mali is not None
    env.accounts.link_guardian(mali.id, "Patient/child-1")
    verifier, challenge = pkce()
    chooser = login(env, challenge)
    assert chooser.status_code == 200 and 'name="patient"' in chooser.text
    assert "Patient/child-1" in chooser.text and "被监护人" in chooser.text
    fields = hidden_fields(chooser.text)
    assert "login_session" in fields and "password" not in fields
    stranger = env.http.post("/oauth/authorize", data={**fields, "patient": "Patient/other"})
    assert stranger.status_code == 200 and "请选择一位居民" in stranger.text
    chosen = env.http.post("/oauth/authorize", data={**fields, "patient": "Patient/child-1"})
    body = exchange(env, redirect_query(chosen)["code"], verifier).json()
    assert body["patient"] == "child-1"
    assert claims_of(env, body).fhir_user == "Patient/p1"  # the guardian acts, for the child


def test_a_doctor_gets_user_scopes_and_no_patient(env: Env) -> None:
    verifier, challenge = pkce()
    code = get_code(env, challenge, username="wangyi", scope="patient/*.read user/*.read")
    body = exchange(env, code, verifier).json()
    assert body["scope"] == "user/*.read"
    assert "patient" not in body and "refresh_token" not in body
    claims = claims_of(env, body)
    assert (claims.role, claims.organization) == ("doctor", "Organization/h1")


def test_nothing_grantable_is_an_invalid_scope(env: Env) -> None:
    _, challenge = pkce()
    query = redirect_query(login(env, challenge, scope="user/*.read"))
    assert query["error"] == "invalid_scope" and "code" not in query


# Refresh tokens


def test_refresh_tokens_rotate_and_a_reused_one_revokes_the_chain(env: Env) -> None:
    verifier, challenge = pkce()
    first = exchange(env, get_code(env, challenge), verifier).json()["refresh_token"]
    second_body = refresh(env, first).json()
    second = second_body["refresh_token"]
    assert second != first and second_body["patient"] == "p1"
    assert refresh(env, "not-a-token").json()["error"] == "invalid_grant"
    # The rotated token comes back: someone holds a copy. The whole chain is revoked.
    assert_error(refresh(env, first), 400, "invalid_grant")
    assert_error(refresh(env, second), 400, "invalid_grant")


def test_a_refresh_may_narrow_but_not_widen(env: Env) -> None:
    verifier, challenge = pkce()
    token = exchange(env, get_code(env, challenge), verifier).json()["refresh_token"]
    widened = env.http.post(
        "/oauth/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": token,
            "client_id": "app",
            "scope": "patient/*.*",
        },
    )
    assert_error(widened, 400, "invalid_scope")
    narrowed = env.http.post(
        "/oauth/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": token,
            "client_id": "app",
            "scope": "patient/*.read",
        },
    )
    assert narrowed.json()["scope"] == "patient/*.read"
    assert_error(refresh(env, token, client_id="portal"), 400, "invalid_grant")


def test_portal_refresh_tokens_end_with_the_idle_session(env: Env) -> None:
    verifier, challenge = pkce()
    code = get_code(env, challenge, client_id="portal", scope="patient/*.*")
    body = exchange(env, code, verifier, client_id="portal", redirect_uri=PORTAL_REDIRECT).json()
    assert body["scope"] == "patient/*.read patient/Consent.write"
    token = body["refresh_token"]
    env.clock.advance(minutes=29)
    token = refresh(env, token, client_id="portal").json()["refresh_token"]
    env.clock.advance(minutes=30)
    assert_error(refresh(env, token, client_id="portal"), 400, "invalid_grant")


def test_offline_access_outlives_the_idle_session(env: Env) -> None:
    verifier, challenge = pkce()
    token = exchange(env, get_code(env, challenge), verifier).json()["refresh_token"]
    env.clock.advance(days=2)
    assert refresh(env, token).status_code == 200


# Client credentials


def test_client_credentials_for_a_confidential_system(env: Env) -> None:
    data = {"grant_type": "client_credentials", "scope": "system/*.* system/Patient.read"}
    response = env.http.post("/oauth/token", data=data, headers=basic("his", env.his_secret))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["scope"].split() == ["system/*.read", "system/Observation.write"]
    assert "refresh_token" not in body
    claims = claims_of(env, body)
    assert (claims.subject, claims.role, claims.organization) == (
        "his",
        "system",
        "Organization/h1",
    )
    by_form = env.http.post(
        "/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": "his",
            "client_secret": env.his_secret,
        },
    )
    assert by_form.status_code == 200


def test_client_credentials_refused_without_the_right_secret(env: Env) -> None:
    data = {"grant_type": "client_credentials"}
    wrong = env.http.post("/oauth/token", data=data, headers=basic("his", "wrong"))
    assert_error(wrong, 401, "invalid_client")
    assert wrong.headers["www-authenticate"].startswith("Basic")
    assert_error(
        env.http.post("/oauth/token", data={**data, "client_id": "his"}), 401, "invalid_client"
    )
    public = env.http.post("/oauth/token", data={**data, "client_id": "app"})
    assert_error(public, 400, "unauthorized_client")
    both = env.http.post(
        "/oauth/token",
        data={**data, "client_secret": env.his_secret},
        headers=basic("his", env.his_secret),
    )
    assert_error(both, 400, "invalid_request")


@pytest.mark.parametrize(
    ("content", "headers", "status", "error"),
    [
        ("grant_type=password", {}, 400, "unsupported_grant_type"),
        ("client_id=app", {}, 400, "invalid_request"),
        ("grant_type=client_credentials&grant_type=client_credentials", {}, 400, "invalid_request"),
        (
            '{"grant_type": "client_credentials"}',
            {"content-type": "application/json"},
            400,
            "invalid_request",
        ),
        ("grant_type=client_credentials", {"authorization": "Basic !!!"}, 401, "invalid_client"),
        ("grant_type=authorization_code&client_id=app", {}, 400, "invalid_request"),
    ],
)
def test_token_errors_are_rfc_json(
    env: Env, content: str, headers: dict[str, str], status: int, error: str
) -> None:
    sent = {"content-type": "application/x-www-form-urlencoded", **headers}
    assert_error(env.http.post("/oauth/token", content=content, headers=sent), status, error)


# Revocation and logout


def test_revocation_of_refresh_and_access_tokens(env: Env) -> None:
    verifier, challenge = pkce()
    body = exchange(env, get_code(env, challenge), verifier).json()
    revoked = env.http.post(
        "/oauth/revoke", data={"token": body["refresh_token"], "client_id": "app"}
    )
    assert revoked.status_code == 200
    assert_error(refresh(env, body["refresh_token"]), 400, "invalid_grant")
    jti = claims_of(env, body).jti
    foreign = env.http.post(
        "/oauth/revoke", data={"token": body["access_token"], "client_id": "portal"}
    )
    assert foreign.status_code == 200 and not env.accounts.is_revoked(jti)
    env.http.post("/oauth/revoke", data={"token": body["access_token"], "client_id": "app"})
    assert env.accounts.is_revoked(jti)
    unknown = env.http.post("/oauth/revoke", data={"token": "nonsense", "client_id": "app"})
    assert unknown.status_code == 200
    assert_error(env.http.post("/oauth/revoke", data={"client_id": "app"}), 400, "invalid_request")


def test_logout_revokes_the_session_its_refresh_tokens_and_the_token(env: Env) -> None:
    verifier, challenge = pkce()
    body = exchange(env, get_code(env, challenge), verifier).json()
    bearer = {"Authorization": f"Bearer {body['access_token']}"}
    response = env.http.post("/oauth/logout", headers=bearer)
    assert response.status_code == 204
    assert env.accounts.is_revoked(claims_of_unchecked(env, body).jti)
    assert_error(refresh(env, body["refresh_token"]), 400, "invalid_grant")
    again = env.http.post("/oauth/logout", headers=bearer)
    assert_error(again, 401, "invalid_token")
    assert again.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert_error(env.http.post("/oauth/logout"), 401, "invalid_token")


def claims_of_unchecked(env: Env, body: dict[str, Any]) -> AccessClaims:
    return env.tokens.verify_access_token(body["access_token"])


# Rate limits


def test_login_attempts_are_limited_per_username(env: Env) -> None:
    _, challenge = pkce()
    form = env.http.get("/oauth/authorize", params=authorize_params(challenge))
    fields = {**hidden_fields(form.text), "username": "someone", "password": "x"}
    for _ in range(10):
        assert env.http.post("/oauth/authorize", data=fields).status_code == 200
    limited = env.http.post("/oauth/authorize", data=fields)
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) == 60
    assert "尝试次数过多" in limited.text
    # Another name from the same address is still served; the limit is per name here.
    other = env.http.post("/oauth/authorize", data={**fields, "username": "another"})
    assert other.status_code == 200
    env.clock.advance(seconds=60)
    assert env.http.post("/oauth/authorize", data=fields).status_code == 200


@pytest.fixture
def strict_env(template: Path, tmp_path: Path) -> Iterator[Env]:
    settings = SecuritySettings(issuer=ISSUER, audience=AUDIENCE)
    yield from make_env(template, tmp_path, replace(settings, attempts_per_minute_per_address=3))


def test_token_requests_are_limited_per_address(strict_env: Env) -> None:
    data = {"grant_type": "refresh_token", "refresh_token": "x", "client_id": "app"}
    for _ in range(3):
        assert_error(strict_env.http.post("/oauth/token", data=data), 400, "invalid_grant")
    limited = strict_env.http.post("/oauth/token", data=data)
    assert_error(limited, 429, "temporarily_unavailable")
    assert int(limited.headers["retry-after"]) >= 1
