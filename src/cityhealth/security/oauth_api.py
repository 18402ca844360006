"""The OAuth 2.0 / SMART App Launch 2.0 authorization server, as one FastAPI router.

Authorization code with PKCE (S256 only) for apps and the portal (oauth_authorize.py), refresh
tokens rotated on each use, client credentials for systems, revocation and logout
(oauth_token.py). Errors are the RFCs' own, never a 500: JSON `error` answers from the token
endpoints, `error` redirects or a page from the authorization endpoint. Blocking work
(database, argon2) runs in the thread pool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from cityhealth.security import oauth_authorize, oauth_token
from cityhealth.security.accounts import Accounts, SecuritySettings
from cityhealth.security.grants import Grants
from cityhealth.security.keys import KeyRing
from cityhealth.security.oauth_server import (
    OAuthError,
    OAuthServer,
    client_address,
    guarded,
    json_answer,
    read_form,
)
from cityhealth.security.rate_limit import RateLimiter
from cityhealth.security.roles import ROLES
from cityhealth.security.sign_in_audit import SignIn, not_recorded
from cityhealth.security.tokens import TokenService

CAPABILITIES = (
    "launch-standalone",
    "client-public",
    "client-confidential-symmetric",
    "context-standalone-patient",
    "permission-patient",
    "permission-user",
    "permission-offline",
    "permission-online",
    "permission-v1",
    "permission-v2",
)


def build_oauth_router(
    accounts: Accounts,
    tokens: TokenService,
    keyring: KeyRing,
    settings: SecuritySettings,
    record: Callable[[SignIn], None] = not_recorded,
) -> APIRouter:
    """The authorization server's routes; `accounts.clock` times codes and rate limits;
    `record` puts sign-ins and sign-outs into the audit trail."""
    grants = Grants(
        accounts.db,
        code_seconds=settings.code_seconds,
        refresh_days=settings.refresh_token_days,
        clock=accounts.clock,
    )
    server = OAuthServer(accounts, tokens, grants, settings, RateLimiter(accounts.clock), record)
    router = APIRouter(tags=["OAuth 2.0 / SMART"])

    @router.get("/.well-known/smart-configuration", summary="SMART App Launch configuration")
    def smart_configuration() -> JSONResponse:
        return JSONResponse(_smart_configuration(server))

    @router.get("/.well-known/jwks.json", summary="Public keys of access tokens (RFC 7517)")
    def jwks() -> JSONResponse:
        keyring.reload()  # a key rotated by another process is published at once
        headers = {"Cache-Control": "public, max-age=300"}
        return JSONResponse(keyring.public_jwks(), headers=headers)

    @router.get("/oauth/authorize", summary="Authorization endpoint: the login form")
    def authorize_form(request: Request) -> Response:
        return oauth_authorize.login_form(server, request)

    @router.post("/oauth/authorize", summary="Authorization endpoint: sign in, get a code")
    async def authorize(request: Request) -> Response:
        try:
            params = await read_form(request)
        except OAuthError as error:
            return oauth_authorize.bad_form(error.description)
        address = client_address(request)
        return await run_in_threadpool(oauth_authorize.sign_in, server, params, address)

    @router.post("/oauth/token", summary="Token endpoint")
    async def token(request: Request) -> Response:
        return await json_answer(request, lambda params: oauth_token.token(server, params, request))

    @router.post("/oauth/revoke", summary="Token revocation (RFC 7009)")
    async def revoke(request: Request) -> Response:
        return await json_answer(
            request, lambda params: oauth_token.revoke(server, params, request)
        )

    @router.post("/oauth/logout", summary="End the session of the bearer token")
    def logout(request: Request) -> Response:
        return guarded(lambda: oauth_token.logout(server, request))

    return router


def _smart_configuration(server: OAuthServer) -> dict[str, Any]:
    base = server.base
    return {
        "issuer": base,
        "jwks_uri": f"{base}/.well-known/jwks.json",
        "authorization_endpoint": f"{base}/oauth/authorize",
        "token_endpoint": f"{base}/oauth/token",
        "revocation_endpoint": f"{base}/oauth/revoke",
        "grant_types_supported": list(oauth_token.GRANT_TYPES),
        "token_endpoint_auth_methods_supported": [
            "client_secret_basic",
            "client_secret_post",
            "none",
        ],
        "scopes_supported": sorted({scope for role in ROLES.values() for scope in role.max_scopes}),
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "authorization_response_iss_parameter_supported": True,
        "capabilities": list(CAPABILITIES),
    }
