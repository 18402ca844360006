"""Bearer authentication: tokens to AccessContext, and every stale or forged token refused."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from cityhealth.db import Database
from cityhealth.migrate import upgrade
from cityhealth.security.accounts import Accounts, SecuritySettings
from cityhealth.security.authn import (
    CHALLENGE,
    Unauthorized,
    authenticate_request,
)
from cityhealth.security.keys import KeyRing
from cityhealth.security.oauth_api import build_oauth_router
from cityhealth.security.tokens import TokenService, token_digest
from manual_clock import ManualClock

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
SETTINGS = SecuritySettings(
    issuer="https://health.zhongwei.example", audience="https://health.zhongwei.example/fhir"
)
PASSWORD = "Zhongwei-2026"


@dataclass
class Env:
    http: TestClient
    accounts: Accounts
    tokens: TokenService
    clock: ManualClock


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    url = f"sqlite:///{tmp_path / 'authn.db'}"
    upgrade(url)
    db = Database(url, pool_size=2)
    clock = ManualClock(T0)
    accounts = Accounts(db, SETTINGS, clock)
    keyring = KeyRing.load_or_create(tmp_path / "keys", clock)
    tokens = TokenService(keyring, SETTINGS.issuer, SETTINGS.audience, clock=clock)
    app = FastAPI()
    app.include_router(build_oauth_router(accounts, tokens, keyring, SETTINGS))

    @app.get("/whoami")
    def whoami(request: Request) -> JSONResponse:
        """How a protected route uses authenticate_request."""
        try:
            context = authenticate_request(request, tokens, accounts.is_revoked)
        except Unauthorized:
            return JSONResponse({}, 401, headers={"WWW-Authenticate": CHALLENGE})
        if context is None:
            return JSONResponse({}, 401, headers={"WWW-Authenticate": "Bearer"})
        return JSONResponse(
            {
                "who": context.who,
                "role": context.role,
                "organization": context.organization,
                "scopes": sorted(context.scopes),
                "patient": context.patient,
                "address": context.client_address,
            }
        )

    with TestClient(app, client=("198.51.100.4", 4000)) as http:
        yield Env(http, accounts, tokens, clock)
    db.dispose()


def resident_token(env: Env, **overrides: Any) -> str:
    arguments: dict[str, Any] = {
        "scopes": ["patient/*.read", "launch/patient"],
        "role": "resident",
        "client_id": "app",
        "fhir_user": "Patient/p1",
        "patient": "p1",
        **overrides,
    }
    return env.tokens.issue_access_token("acct-1", **arguments)


def whoami(env: Env, token: str | None = None, **headers: str) -> Any:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return env.http.get("/whoami", headers=headers)


def test_a_resident_token_becomes_their_access_context(env: Env) -> None:
    response = whoami(env, resident_token(env))
    assert response.status_code == 200
    assert response.json() == {
        "who": "Patient/p1",
        "role": "resident",
        "organization": None,
        "scopes": ["launch/patient", "patient/*.read"],
        "patient": "Patient/p1",
        "address": "198.51.100.4",
    }


def test_a_guardian_acts_as_themselves_for_the_child(env: Env) -> None:
    body = whoami(env, resident_token(env, patient="child-1")).json()
    assert (body["who"], body["patient"]) == ("Patient/p1", "Patient/child-1")


def test_staff_and_systems(env: Env) -> None:
    doctor = resident_token(
        env,
        scopes=["user/*.read"],
        role="doctor",
        fhir_user="Practitioner/d1",
        patient=None,
        organization="Organization/h1",
    )
    body = whoami(env, doctor).json()
    assert (body["who"], body["role"], body["organization"]) == (
        "Practitioner/d1",
        "doctor",
        "Organization/h1",
    )
    assert body["patient"] is None and body["scopes"] == ["user/*.read"]
    system = env.tokens.issue_access_token(
        "his",
        scopes=["system/*.read"],
        role="system",
        client_id="his",
        organization="Organization/h1",
    )
    body = whoami(env, system).json()
    assert (body["who"], body["role"]) == ("Device/his", "system")


def test_no_bearer_token_is_no_context(env: Env) -> None:
    response = whoami(env)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    basic = base64.b64encode(b"a:b").decode()
    assert whoami(env, Authorization=f"Basic {basic}").headers["www-authenticate"] == "Bearer"


def refused(env: Env, token: str | None = None, **headers: str) -> None:
    response = whoami(env, token, **headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'


def test_tampered_tokens_are_refused(env: Env) -> None:
    token = resident_token(env)
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["fhirUser"] = "Patient/someone-else"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    refused(env, f"{header}.{forged}.{signature}")
    refused(env, f"{header}.{payload}.{signature[:-4]}AAAA")
    # Signed with a key of its own, naming ours: the signature does not verify.
    kid = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"]
    own = ec.generate_private_key(ec.SECP256R1())
    refused(env, jwt.encode(claims, own, "ES256", headers={"kid": kid, "typ": "at+jwt"}))
    refused(env, "not-a-token")


def test_malformed_authorization_headers_are_refused(env: Env) -> None:
    refused(env, Authorization="Bearer ")
    refused(env, Authorization="Bearer a b")
    token = resident_token(env)
    twice = [("Authorization", f"Bearer {token}"), ("Authorization", f"Bearer {token}")]
    response = env.http.get("/whoami", headers=twice)
    assert response.status_code == 401


def test_expired_tokens_are_refused(env: Env) -> None:
    token = resident_token(env)
    env.clock.now = T0 + timedelta(minutes=5, seconds=11)  # 5 minutes, plus the leeway
    refused(env, token)


def test_tokens_for_another_audience_or_role_are_refused(env: Env) -> None:
    other = TokenService(env.tokens.keyring, SETTINGS.issuer, "https://other.example/fhir")
    refused(env, other.issue_access_token("a", scopes=[], role="resident", client_id="x"))
    refused(env, resident_token(env, role="overlord"))
    refused(env, resident_token(env, role="doctor", fhir_user=None))


def test_after_logout_the_token_is_refused(env: Env) -> None:
    account = env.accounts.create_account(
        "mali", PASSWORD, role="resident", display_name="马丽", fhir_user="Patient/p1"
    )
    session = token_digest(env.accounts.create_session(account.id))
    token = resident_token(env, extra={"sid": session})
    assert whoami(env, token).status_code == 200
    assert (
        env.http.post("/oauth/logout", headers={"Authorization": f"Bearer {token}"}).status_code
        == 204
    )
    refused(env, token)
    assert env.accounts.touch_session(session) is None


def test_a_revoked_token_is_refused_directly(env: Env) -> None:
    token = resident_token(env)
    claims = env.tokens.verify_access_token(token)
    env.accounts.revoke_access_token(claims.jti, claims.expires_at)
    refused(env, token)
