"""The door of the FHIR API: every request under /fhir (but the CapabilityStatement, which
SMART clients read before they sign in) and to /metrics carries a valid access token, or is
answered 401 with a `WWW-Authenticate` challenge (RFC 6750) and goes no further.

The token's AccessContext is left in `request.state.access` for the engine's access rules; the
request may add why it is made (purpose of use, v3-PurposeOfUse or v3-ActReason code, and a
reason in words) with the headers `X-Purpose-Of-Use` and `X-Purpose-Reason`, which the rules
and the audit trail read (a regulator's investigation, say)."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable
from urllib.parse import unquote

from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from cityhealth.fhir.access import AccessContext
from cityhealth.fhir.errors import FhirError
from cityhealth.fhir.http import outcome_response
from cityhealth.security.authn import Unauthorized, authenticate_request
from cityhealth.security.tokens import TokenService

log = logging.getLogger("cityhealth.security")

REALM = 'Bearer realm="CityHealth"'
INVALID = f'{REALM}, error="invalid_token"'
PUBLIC = frozenset({"/fhir/metadata"})
_CODE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
MAX_REASON = 500


def protected(path: str) -> bool:
    return (path == "/fhir" or path.startswith("/fhir/") or path == "/metrics") and (
        path not in PUBLIC
    )


class BearerGuard:
    def __init__(
        self,
        app: ASGIApp,
        tokens: TokenService,
        revoked: Callable[[str], bool],
        fresh: Callable[[], bool] = lambda: False,
    ) -> None:
        self.app = app
        self.tokens = tokens
        self.revoked = revoked
        self.fresh = fresh  # whether `revoked` answers without the database

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        request = HTTPConnection(scope)
        try:
            if self.fresh():  # no database to ask: no thread to hand over to
                ctx = authenticate_request(request, self.tokens, self.revoked)
            else:
                ctx = await run_in_threadpool(
                    authenticate_request, request, self.tokens, self.revoked
                )
            if ctx is None:
                raise Unauthorized("no access token")
            ctx = with_purpose(ctx, request)
        except Unauthorized as error:
            log.info("refused %s %s: %s", scope["method"], scope["path"], error.reason)
            challenge = REALM if error.reason == "no access token" else INVALID
            response = outcome_response(
                FhirError(401, "login", "Sign in first: send an access token (Bearer)")
            )
            response.headers["WWW-Authenticate"] = challenge
            await response(scope, receive, send)
            return
        except FhirError as error:
            await outcome_response(error)(scope, receive, send)
            return
        scope.setdefault("state", {})["access"] = ctx
        await self.app(scope, receive, send)


def with_purpose(ctx: AccessContext, request: HTTPConnection) -> AccessContext:
    """The context with the purpose of use and reason the request states (400 if malformed)."""
    purpose = request.headers.get("x-purpose-of-use")
    reason = request.headers.get("x-purpose-reason")
    if purpose is None and reason is None:
        return ctx
    if purpose is None or not _CODE.match(purpose.strip()):
        raise FhirError(400, "invalid", "X-Purpose-Of-Use must be a purpose-of-use code")
    text = unquote(reason).strip() if reason else None
    if text is not None and not 0 < len(text) <= MAX_REASON:
        raise FhirError(400, "invalid", f"X-Purpose-Reason must be 1 to {MAX_REASON} characters")
    return dataclasses.replace(ctx, purpose=purpose.strip(), reason=text)
