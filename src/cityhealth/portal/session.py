"""Signing in to the portal, which is the public OAuth client "portal" of the platform's own
authorization server (authorization code with PKCE S256).

- `start_login` (GET /login) keeps `state`, the PKCE verifier and the page to come back to in a
  signed, short-lived cookie (HttpOnly, SameSite=Lax, path /portal/callback) and sends the
  browser to /oauth/authorize, where the person signs in (and changes an expired password).
- `finish_login` (GET /portal/callback) redeems the code with the verifier in-process, through
  the same `Grants` service as the token endpoint, and gets the refresh token that the token
  endpoint gives this client. That opaque token is the session cookie (HttpOnly, SameSite=Lax,
  Secure on https); the server keeps only its digest, in the refresh token's row, bound to the
  account, the granted scopes, the patient chosen and the login session.
- `viewer` looks both rows up on every request: the refresh grant (not revoked, not expired)
  and its login session, touched so that it ends after `session_idle_minutes` idle. The
  AccessContext is made as a refreshed access token would be (granted scopes cut to the role's
  current maximum), so no access token is kept: none has to be refreshed or can leak, and a
  revocation takes effect on the next request.
- `logout` revokes the refresh token's family and the login session with all of its tokens.
- CSRF: each form carries HMAC(session token, "csrf"); only the holder of the cookie has it.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import os
import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import Response

from cityhealth.fhir.access import AccessContext
from cityhealth.portal.i18n import N_
from cityhealth.security.accounts import SELF, Account, PatientLink
from cityhealth.security.clients import PUBLIC, ClientError
from cityhealth.security.grants import Grant, GrantError, Grants
from cityhealth.security.passwords import is_expired
from cityhealth.security.roles import ROLES, limit_scopes
from cityhealth.security.setup import Security
from cityhealth.security.tokens import pkce_challenge

log = logging.getLogger("cityhealth.portal")

CALLBACK_PATH = "/portal/callback"
#: What the portal asks for; each account gets the part its role allows (residents the
#: patient scopes, staff the user scopes).
PORTAL_SCOPES = (
    "launch/patient",
    "online_access",
    "patient/*.read",
    "patient/Consent.write",
    "user/*.read",
    "user/*.write",
)
LOGIN_COOKIE = "portal_login"
LOGIN_SECONDS = 600
KEY_FILE = "portal-cookie.key"


class LoginFailed(Exception):
    """The callback cannot sign the person in; `message` is a catalog message id."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(reason)
        self.message = message
        self.reason = reason  # for the logs


@dataclass(frozen=True)
class Viewer:
    """The signed-in person of a request."""

    account: Account
    token: str  # the session cookie
    context: AccessContext  # acting for the patient chosen at sign-in (or none)
    patients: tuple[PatientLink, ...]
    csrf: str
    password_expired: bool

    @property
    def is_resident(self) -> bool:
        return ROLES[self.account.role].resource_type == "Patient"

    def acting_for(self, patient: str | None) -> AccessContext | None:
        """The context for one of the account's patients (default: the one in context)."""
        if not patient:
            return self.context
        if patient not in {link.patient for link in self.patients}:
            return None
        return replace(self.context, patient=patient)


class PortalSessions:
    def __init__(self, security: Security, public_url: str, keys_dir: Path) -> None:
        self.accounts = security.accounts
        self.settings = security.settings
        self.client_id = security.settings.portal_client_id
        self.grants = Grants(
            self.accounts.db,
            code_seconds=self.settings.code_seconds,
            refresh_days=self.settings.refresh_token_days,
            clock=self.accounts.clock,
        )
        public = public_url.rstrip("/")
        self.redirect_uri = public + CALLBACK_PATH
        self.secure = public.startswith("https://")
        # The __Host- prefix pins a cookie to this host and path / (browsers need Secure for it).
        self.cookie = "__Host-portal" if self.secure else "portal_session"
        self._key = signing_key(keys_dir)
        self.registered = False

    # The OAuth client

    def register_client(self) -> None:
        """Create the "portal" client unless it exists (several processes may race)."""
        existing = self.accounts.client(self.client_id)
        if existing is None:
            try:
                existing, _ = self.accounts.create_client(
                    self.client_id,
                    name="CityHealth 门户",
                    kind=PUBLIC,
                    redirect_uris=[self.redirect_uri],
                    scopes=PORTAL_SCOPES,
                )
            except ClientError:
                existing = self.accounts.client(self.client_id)
        self.registered = existing is not None
        if existing is not None and self.redirect_uri not in existing.redirect_uris:
            log.error(
                "portal client %r does not list %s among its redirect URIs: sign-in will fail",
                self.client_id,
                self.redirect_uri,
            )

    # Signing in

    def start_login(self, next_path: str) -> tuple[str, str]:
        """The authorization URL and the login cookie's value."""
        state, verifier = secrets.token_urlsafe(24), secrets.token_urlsafe(48)
        expires = int(self.accounts.clock().timestamp()) + LOGIN_SECONDS
        payload = {"s": state, "v": verifier, "n": next_path, "e": expires}
        query = urlencode(
            {
                "response_type": "code",
                "client_id": self.client_id,
                "redirect_uri": self.redirect_uri,
                "scope": " ".join(PORTAL_SCOPES),
                "state": state,
                "code_challenge": pkce_challenge(verifier),
                "code_challenge_method": "S256",
            }
        )
        return f"/oauth/authorize?{query}", self._sign(payload)

    def finish_login(self, cookie: str | None, params: dict[str, str]) -> tuple[str, str]:
        """The session token and the page to go to, for the callback's parameters."""
        login = self._unsign(cookie) if cookie else None
        expired = login is None or login["e"] < self.accounts.clock().timestamp()
        if login is None or expired:
            raise LoginFailed(SIGN_IN_EXPIRED, "no valid login cookie")
        if not _same(params.get("state", ""), login["s"]):
            raise LoginFailed(SIGN_IN_EXPIRED, "state differs")
        issuer = self.settings.issuer.rstrip("/")
        if params.get("iss", issuer).rstrip("/") != issuer:  # RFC 9207: mix-up attacks
            raise LoginFailed(SIGN_IN_FAILED, "wrong issuer")
        if "error" in params:
            message = NOT_FOR_PORTAL if params["error"] == "invalid_scope" else SIGN_IN_FAILED
            raise LoginFailed(message, f"authorization error {params['error']}")
        try:
            grant = self.grants.redeem_code(
                params.get("code", ""),
                client_id=self.client_id,
                redirect_uri=self.redirect_uri,
                verifier=login["v"],
            )
        except GrantError as error:
            raise LoginFailed(SIGN_IN_FAILED, error.reason) from None
        account = self.accounts.account(grant.account_id) if grant.account_id else None
        if account is None or not account.active:
            raise LoginFailed(SIGN_IN_FAILED, "account not active")
        return self.grants.issue_refresh(grant), login["n"]

    # Sessions

    def viewer(self, token: str | None, client_address: str | None) -> Viewer | None:
        """Who holds the session `token`; None when it is unknown or has ended."""
        if not token:
            return None
        try:
            grant = self.grants.refresh_grant(token, client_id=self.client_id)
        except GrantError:
            return None
        if grant.session_id is None:
            return None
        account_id = self.accounts.touch_session(grant.session_id)
        account = self.accounts.account(account_id) if account_id else None
        if account is None or account.id != grant.account_id:
            return None
        patients = tuple(self.accounts.patients(account.id))
        now = self.accounts.clock()
        return Viewer(
            account=account,
            token=token,
            context=_context(account, grant, patients, client_address),
            patients=patients,
            csrf=csrf_token(token),
            password_expired=is_expired(self.accounts.policy, account.password_changed_at, now),
        )

    def logout(self, token: str) -> None:
        """Revoke the session's refresh tokens and its login session."""
        try:
            grant = self.grants.refresh_grant(token, client_id=self.client_id)
        except GrantError:
            grant = None
        self.grants.revoke_refresh(token, client_id=self.client_id)
        if grant is not None and grant.session_id is not None:
            self.accounts.revoke_session(grant.session_id)

    # Cookies

    def set_session(self, response: Response, token: str) -> None:
        response.set_cookie(
            self.cookie, token, path="/", secure=self.secure, httponly=True, samesite="lax"
        )

    def clear_session(self, response: Response) -> None:
        response.delete_cookie(
            self.cookie, path="/", secure=self.secure, httponly=True, samesite="lax"
        )

    def set_login(self, response: Response, value: str) -> None:
        response.set_cookie(
            LOGIN_COOKIE,
            value,
            max_age=LOGIN_SECONDS,
            path=CALLBACK_PATH,
            secure=self.secure,
            httponly=True,
            samesite="lax",
        )

    def clear_login(self, response: Response) -> None:
        response.delete_cookie(
            LOGIN_COOKIE, path=CALLBACK_PATH, secure=self.secure, httponly=True, samesite="lax"
        )

    def _sign(self, payload: dict[str, object]) -> str:
        body = _b64(json.dumps(payload, separators=(",", ":")).encode())
        return f"{body}.{_b64(hmac.digest(self._key, body.encode(), 'sha256'))}"

    def _unsign(self, value: str) -> dict[str, Any] | None:
        body, _, signature = value.partition(".")
        expected = _b64(hmac.digest(self._key, body.encode(), "sha256"))
        if not _same(signature, expected):
            return None
        try:
            payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        except ValueError:
            return None
        return payload if isinstance(payload, dict) else None


# Messages of the callback (catalog ids: translated where shown).
SIGN_IN_EXPIRED = N_("Your sign-in took too long or was started elsewhere. Please sign in again.")
SIGN_IN_FAILED = N_("Sign-in failed. Please try again.")
NOT_FOR_PORTAL = N_("This account cannot use the portal.")


def csrf_token(session_token: str) -> str:
    return _b64(hmac.digest(session_token.encode(), b"csrf", "sha256"))


def csrf_ok(viewer: Viewer, presented: str | None) -> bool:
    return presented is not None and _same(presented, viewer.csrf)


def safe_next(path: str | None) -> str:
    """A page of this site to return to: a local path, never another site (open redirects)."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return path


def signing_key(directory: Path) -> bytes:
    """The portal's cookie-signing key, made once and shared by every process."""
    path = directory / KEY_FILE
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        # Written whole under another name, then linked: a reader never sees a partial key.
        staging = directory / f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(descriptor, secrets.token_bytes(32))
        finally:
            os.close(descriptor)
        try:
            os.link(staging, path)
        except FileExistsError:
            pass  # another process made it first
        finally:
            staging.unlink()
    key = path.read_bytes()
    if len(key) < 32:
        raise ValueError(f"{path} is not a portal cookie key")
    return key


def _context(
    account: Account, grant: Grant, patients: tuple[PatientLink, ...], address: str | None
) -> AccessContext:
    scopes = limit_scopes(grant.scopes, ROLES[account.role].max_scopes)
    own = next((link.patient for link in patients if link.relation == SELF), None)
    patient = f"Patient/{grant.patient}" if grant.patient else own
    return AccessContext(
        who=account.fhir_user,
        role=account.role,
        organization=account.organization,
        scopes=frozenset(scopes),
        patient=patient,
        role_kind=account.role_kind,
        client_address=address,
    )


def _same(presented: str, expected: str) -> bool:
    """Compare secrets in constant time; any text may be presented, not only ASCII."""
    return hmac.compare_digest(
        presented.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
