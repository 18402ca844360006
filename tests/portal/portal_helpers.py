"""The portal on a test database: the app (OAuth server + portal), people and records, and
signing in through /login → /oauth/authorize → /portal/callback as a browser would."""

from __future__ import annotations

import html
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cityhealth.config import Settings
from cityhealth.db import Database
from cityhealth.fhir import jsonio
from cityhealth.fhir.access import SYSTEM
from cityhealth.fhir.definitions import Definitions
from cityhealth.fhir.engine import FhirEngine
from cityhealth.portal import register_portal
from cityhealth.portal.shell import Portal
from cityhealth.security.accounts import Account, Accounts
from cityhealth.security.keys import KeyRing
from cityhealth.security.oauth_api import build_oauth_router
from cityhealth.security.setup import Security, security_settings
from cityhealth.security.sign_in_audit import SignInRecorder
from cityhealth.security.tokens import TokenService
from manual_clock import ManualClock

PASSWORD = "Zhongwei-2026"
PUBLIC_URL = "http://testserver"
_HIDDEN = re.compile(r'<input type="hidden" name="([^"]+)" value="([^"]*)">')


@dataclass
class PortalEnv:
    app: FastAPI
    engine: FhirEngine
    security: Security
    portal: Portal
    clock: ManualClock
    settings: Settings

    @property
    def accounts(self) -> Accounts:
        return self.security.accounts

    def browser(self, **headers: str) -> TestClient:
        """A new browser: its own cookies, no redirects followed."""
        return TestClient(
            self.app,
            base_url=PUBLIC_URL,
            follow_redirects=False,
            raise_server_exceptions=True,
            headers=headers,
        )


def build_env(
    db: Database, definitions: Definitions, tmp: Path, public_url: str = PUBLIC_URL
) -> PortalEnv:
    settings = Settings(
        database_url=db.url.render_as_string(hide_password=False),
        var_dir=tmp / "var",
        keys_dir=tmp / "keys",
        public_url=public_url,
    )
    clock = ManualClock(datetime.now(UTC).replace(microsecond=0))
    config = security_settings(settings)
    keyring = KeyRing.load_or_create(tmp / "keys", clock)
    tokens = TokenService(
        keyring, config.issuer, config.audience, config.access_token_minutes, clock
    )
    security = Security(config, Accounts(db, config, clock), keyring, tokens, timedelta(days=30))
    engine = FhirEngine(db, definitions, settings)
    app = FastAPI()
    recorder = SignInRecorder(engine.repository)
    app.include_router(build_oauth_router(security.accounts, tokens, keyring, config, recorder))
    portal = register_portal(app, engine, security, settings)
    return PortalEnv(app, engine, security, portal, clock, settings)


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def put(env: PortalEnv, resource: dict[str, Any]) -> str:
    """Store a resource as the platform itself; its reference."""
    rid = resource.get("id") or unique("r")
    resource["id"] = rid
    env.engine.update(SYSTEM, resource["resourceType"], rid, resource)
    return f"{resource['resourceType']}/{rid}"


def patient(env: PortalEnv, family: str, given: str) -> str:
    return put(env, {"resourceType": "Patient", "name": [{"family": family, "given": [given]}]})


def resident(env: PortalEnv, family: str = "马", given: str = "丽") -> Account:
    """A resident's Patient and account (password PASSWORD)."""
    reference = patient(env, family, given)
    return env.accounts.create_account(
        unique("res"),
        PASSWORD,
        role="resident",
        display_name=f"{family}{given}",
        fhir_user=reference,
    )


def doctor(env: PortalEnv, organization: str) -> Account:
    reference = put(
        env, {"resourceType": "Practitioner", "name": [{"family": "王", "given": ["建国"]}]}
    )
    return env.accounts.create_account(
        unique("doc"),
        PASSWORD,
        role="doctor",
        display_name="王建国",
        fhir_user=reference,
        organization=organization,
    )


def hidden_fields(page: str) -> dict[str, str]:
    return {name: html.unescape(value) for name, value in _HIDDEN.findall(page)}


def authorize(browser: TestClient, next_path: str) -> str:
    """GET /login: the authorization endpoint's URL it redirects to."""
    started = browser.get(f"/login?next={quote(next_path, safe='')}")
    assert started.status_code == 303, started.text
    target = started.headers["location"]
    assert target.startswith("/oauth/authorize?")
    return target


def submit_login(
    browser: TestClient, login_page: httpx.Response, username: str, **extra: str
) -> httpx.Response:
    fields = {**hidden_fields(login_page.text), "username": username, **extra}
    return browser.post("/oauth/authorize", data=fields)


def follow_callback(browser: TestClient, answer: httpx.Response) -> httpx.Response:
    """Follow the authorization server's redirect to the portal's callback."""
    assert answer.status_code == 303, answer.text
    location = urlsplit(answer.headers["location"])
    assert f"{location.scheme}://{location.netloc}" == PUBLIC_URL
    assert location.path == "/portal/callback"
    return browser.get(f"{location.path}?{location.query}")


def sign_in(
    browser: TestClient, username: str, password: str = PASSWORD, next_path: str = "/"
) -> httpx.Response:
    """Sign in as a browser does; the callback's answer (303 to `next_path`)."""
    form = browser.get(authorize(browser, next_path))
    assert form.status_code == 200, form.text
    answer = submit_login(browser, form, username, password=password)
    signed_in = follow_callback(browser, answer)
    assert signed_in.status_code == 303, signed_in.text
    assert signed_in.headers["location"] == next_path
    return signed_in


def csrf(page: httpx.Response) -> str:
    return hidden_fields(page.text)["csrf_token"]


def consents_of(env: PortalEnv, patient_reference: str) -> list[dict[str, Any]]:
    request = env.engine.parse_search("Consent", [("patient", patient_reference)])
    return [jsonio.loads(hit.body) for hit in env.engine.search(SYSTEM, request).matches]
