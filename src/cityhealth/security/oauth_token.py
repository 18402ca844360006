"""The token endpoint (authorization code, refresh token, client credentials), revocation
(RFC 7009) and logout. Every answer carries `Cache-Control: no-store` (RFC 6749 §5.1)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any
from urllib.parse import unquote_plus

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from cityhealth.security.accounts import Account
from cityhealth.security.authn import CHALLENGE, Unauthorized, bearer_token
from cityhealth.security.clients import CONFIDENTIAL, PUBLIC, OAuthClient
from cityhealth.security.grants import Grant, GrantError
from cityhealth.security.oauth_server import (
    NO_STORE,
    OAuthError,
    OAuthServer,
    client_address,
    required,
)
from cityhealth.security.roles import ROLES, limit_scopes
from cityhealth.security.sign_in_audit import LOGIN, LOGOUT, SignIn
from cityhealth.security.tokens import InvalidToken

_REFRESH_SCOPES = ("offline_access", "online_access")


def token(server: OAuthServer, params: dict[str, str], request: Request) -> Response:
    grant_type = params.get("grant_type")
    handler = _GRANT_TYPES.get(grant_type or "")
    if handler is None:
        if grant_type is None:
            raise OAuthError("invalid_request", "grant_type is required")
        raise OAuthError("unsupported_grant_type", f"grant_type {grant_type!r} is not supported")
    client_id, secret = _client_credentials(params, request)
    settings = server.settings
    limits = [
        (f"token-address:{client_address(request)}", settings.attempts_per_minute_per_address)
    ]
    if secret is not None:  # one system: its own limit (a public client is shared by many)
        limits.append((f"client:{client_id}", settings.attempts_per_minute))
    wait = server.limiter.admit(*limits)
    if wait:
        raise OAuthError(
            "temporarily_unavailable", "too many requests", 429, {"Retry-After": str(wait)}
        )
    address = client_address(request)
    try:
        client = _authenticate_client(server, client_id, secret)
        body = handler(server, client, params)
    except OAuthError as error:
        if grant_type == "client_credentials":
            _record_system(server, client_id, address, False, error.error)
        raise
    if grant_type == "client_credentials":
        _record_system(server, client_id, address, True, "ok", client.organization)
    return JSONResponse(body, headers=NO_STORE)


def _record_system(
    server: OAuthServer,
    client_id: str,
    address: str,
    ok: bool,
    reason: str,
    organization: str | None = None,
) -> None:
    """A system's sign-in with its client credentials, in the audit trail."""
    who = f"Device/{client_id[:64]}"
    server.record(SignIn(LOGIN, ok, who, "system", address, reason, organization))


def revoke(server: OAuthServer, params: dict[str, str], request: Request) -> Response:
    """Revoke a refresh token (with its family) or an access token of the calling client."""
    client = _authenticate_client(server, *_client_credentials(params, request))
    presented = required(params, "token")
    # Unknown, expired and other clients' tokens are answered alike (RFC 7009 §2.2).
    if not server.grants.revoke_refresh(presented, client_id=client.client_id):
        try:
            claims = server.tokens.verify_access_token(presented)
        except InvalidToken:
            claims = None
        if claims is not None and claims.client_id == client.client_id:
            server.accounts.revoke_access_token(claims.jti, claims.expires_at)
    return Response(status_code=200, headers=NO_STORE)


def logout(server: OAuthServer, request: Request) -> Response:
    """Revoke the bearer token, its login session and the session's refresh tokens."""
    invalid = OAuthError(
        "invalid_token", "a valid bearer token is required", 401, {"WWW-Authenticate": CHALLENGE}
    )
    try:
        presented = bearer_token(request)
        if presented is None:
            raise invalid
        claims = server.tokens.verify_access_token(presented, is_revoked=server.accounts.is_revoked)
    except (Unauthorized, InvalidToken):
        raise invalid from None
    session = claims.extra.get("sid")
    if isinstance(session, str):
        server.accounts.revoke_session(session)
    server.accounts.revoke_access_token(claims.jti, claims.expires_at)
    who = claims.fhir_user or f"Device/{claims.client_id}"
    address = client_address(request)
    server.record(SignIn(LOGOUT, True, who, claims.role, address, "ok", claims.organization))
    return Response(status_code=204, headers=NO_STORE)


def _authorization_code(
    server: OAuthServer, client: OAuthClient, params: dict[str, str]
) -> dict[str, Any]:
    try:
        grant = server.grants.redeem_code(
            required(params, "code"),
            client_id=client.client_id,
            redirect_uri=required(params, "redirect_uri"),
            verifier=params.get("code_verifier", ""),
        )
    except GrantError as error:
        raise OAuthError("invalid_grant", error.reason) from None
    account = _active_account(server, grant)
    wants_refresh = client.client_id == server.settings.portal_client_id or any(
        scope in grant.scopes for scope in _REFRESH_SCOPES
    )
    refresh = server.grants.issue_refresh(grant) if wants_refresh else None
    return _token_body(server, client, account, grant, refresh)


def _refresh_token(
    server: OAuthServer, client: OAuthClient, params: dict[str, str]
) -> dict[str, Any]:
    presented = required(params, "refresh_token")
    try:
        grant = server.grants.refresh_grant(presented, client_id=client.client_id)
    except GrantError as error:
        raise OAuthError("invalid_grant", error.reason) from None
    account = _active_account(server, grant)
    # Offline access outlives the session; other refresh tokens end with it.
    if (
        grant.session_id is not None
        and "offline_access" not in grant.scopes
        and server.accounts.touch_session(grant.session_id) is None
    ):
        raise OAuthError("invalid_grant", "the session has ended")
    # The role may have lost scopes since the grant.
    grant = replace(grant, scopes=limit_scopes(grant.scopes, ROLES[account.role].max_scopes))
    scopes = grant.scopes
    if "scope" in params:
        scopes = tuple(params["scope"].split())
        if not set(scopes) <= set(grant.scopes):
            raise OAuthError("invalid_scope", "scope may only narrow the original grant")
    try:
        refresh = server.grants.rotate(presented, grant)
    except GrantError as error:
        raise OAuthError("invalid_grant", error.reason) from None
    return _token_body(server, client, account, replace(grant, scopes=scopes), refresh)


def _client_credentials_grant(
    server: OAuthServer, client: OAuthClient, params: dict[str, str]
) -> dict[str, Any]:
    if client.kind != CONFIDENTIAL or client.role is None:
        raise OAuthError("unauthorized_client", "this client may not act on its own")
    requested = params.get("scope", " ".join(client.scopes)).split()
    try:
        scopes = limit_scopes(limit_scopes(requested, ROLES[client.role].max_scopes), client.scopes)
    except ValueError as error:
        raise OAuthError("invalid_scope", str(error)) from None
    if not scopes:
        raise OAuthError("invalid_scope", "none of the requested scopes may be granted")
    access = server.tokens.issue_access_token(
        client.client_id,
        scopes=scopes,
        role=client.role,
        client_id=client.client_id,
        organization=client.organization,
    )
    return _access_body(server, access, scopes)


_GRANT_TYPES: dict[str, Callable[[OAuthServer, OAuthClient, dict[str, str]], dict[str, Any]]] = {
    "authorization_code": _authorization_code,
    "refresh_token": _refresh_token,
    "client_credentials": _client_credentials_grant,
}
GRANT_TYPES = tuple(_GRANT_TYPES)


def _token_body(
    server: OAuthServer, client: OAuthClient, account: Account, grant: Grant, refresh: str | None
) -> dict[str, Any]:
    extra = {"sid": grant.session_id, "role_kind": account.role_kind}
    access = server.tokens.issue_access_token(
        account.id,
        scopes=grant.scopes,
        role=account.role,
        client_id=client.client_id,
        organization=account.organization,
        fhir_user=account.fhir_user,
        patient=grant.patient,
        extra={name: value for name, value in extra.items() if value is not None},
    )
    body = _access_body(server, access, grant.scopes)
    if grant.patient:
        body["patient"] = grant.patient
    if refresh:
        body["refresh_token"] = refresh
    return body


def _access_body(server: OAuthServer, access: str, scopes: Iterable[str]) -> dict[str, Any]:
    return {
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": int(server.tokens.access_lifetime.total_seconds()),
        "scope": " ".join(scopes),
    }


def _active_account(server: OAuthServer, grant: Grant) -> Account:
    account = server.accounts.account(grant.account_id) if grant.account_id else None
    if account is None or not account.active:
        raise OAuthError("invalid_grant", "the account is not active")
    return account


def _client_credentials(params: dict[str, str], request: Request) -> tuple[str, str | None]:
    """The client id and secret, from HTTP Basic or the form (RFC 6749 §2.3.1), not both."""
    header = request.headers.get("authorization")
    if header is None:
        return params.get("client_id", ""), params.get("client_secret")
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        raise _invalid_client("client authentication must use HTTP Basic")
    if "client_secret" in params:
        raise OAuthError("invalid_request", "use one client authentication method")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise _invalid_client("malformed HTTP Basic credentials") from None
    client_id, colon, secret = decoded.partition(":")
    if not colon:
        raise _invalid_client("malformed HTTP Basic credentials")
    client_id, secret = unquote_plus(client_id), unquote_plus(secret)
    if params.get("client_id", client_id) != client_id:
        raise _invalid_client("client_id differs from the authenticated client")
    return client_id, secret


def _authenticate_client(server: OAuthServer, client_id: str, secret: str | None) -> OAuthClient:
    if not client_id:
        raise _invalid_client("client authentication is required")
    if secret is not None:
        client = server.accounts.authenticate_client(client_id, secret)
    else:
        found = server.accounts.client(client_id)
        # A confidential client must prove who it is; a public one cannot.
        client = found if found and found.active and found.kind == PUBLIC else None
    if client is None:
        raise _invalid_client("client authentication failed")
    return client


def _invalid_client(description: str) -> OAuthError:
    return OAuthError(
        "invalid_client", description, 401, {"WWW-Authenticate": 'Basic realm="cityhealth"'}
    )
