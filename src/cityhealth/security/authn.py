"""Bearer authentication: from `Authorization: Bearer …` to the engine's AccessContext.

A guardian's token names the guardian in `who` and the child in `patient` (SMART's patient in
context)."""

from __future__ import annotations

import re
from collections.abc import Callable

from starlette.requests import HTTPConnection

from cityhealth.fhir.access import AccessContext
from cityhealth.security.roles import ROLES
from cityhealth.security.tokens import AccessClaims, InvalidToken, TokenService

_SPACE = re.compile(r"\s")
CHALLENGE = 'Bearer error="invalid_token"'  # RFC 6750 §3, for the 401 answer


class Unauthorized(Exception):
    """Bearer credentials were presented and are not accepted; answer 401 with CHALLENGE.

    `reason` is for logs, never for the caller."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def bearer_token(request: HTTPConnection) -> str | None:
    """The bearer token of the request; None without one; `Unauthorized` if malformed."""
    headers = request.headers.getlist("authorization")
    if not headers:
        return None
    if len(headers) > 1:
        raise Unauthorized("several Authorization headers")
    scheme, _, token = headers[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    if not token or _SPACE.search(token):
        raise Unauthorized("malformed bearer token")
    return token


def authenticate_request(
    request: HTTPConnection, tokens: TokenService, revoked: Callable[[str], bool]
) -> AccessContext | None:
    """Who the request acts for, from its access token; None when it carries none.

    `revoked(jti)` tells whether a token was revoked before it expired (logout, RFC 7009).
    """
    token = bearer_token(request)
    if token is None:
        return None
    try:
        claims = tokens.verify_access_token(token, is_revoked=revoked)
    except InvalidToken as error:
        raise Unauthorized(error.reason) from None
    client_address = request.client.host if request.client else None
    return access_context(claims, client_address)


def access_context(claims: AccessClaims, client_address: str | None = None) -> AccessContext:
    """The AccessContext of verified claims."""
    role = ROLES.get(claims.role)
    if role is None:
        raise Unauthorized(f"unknown role {claims.role!r}")
    if role.for_clients:
        who = f"Device/{claims.client_id}"
    elif claims.fhir_user:
        who = claims.fhir_user
    else:
        raise Unauthorized("a person's token without fhirUser")
    return AccessContext(
        who=who,
        role=claims.role,
        organization=claims.organization,
        scopes=frozenset(claims.scopes),
        patient=f"Patient/{claims.patient}" if claims.patient else None,
        role_kind=claims.extra.get("role_kind"),
        client_address=client_address,
    )
