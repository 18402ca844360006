"""What the OAuth endpoints share: the server's services, its error answer, request parsing."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from cityhealth.security.accounts import Accounts, SecuritySettings
from cityhealth.security.grants import Grants
from cityhealth.security.rate_limit import RateLimiter
from cityhealth.security.sign_in_audit import SignIn, not_recorded
from cityhealth.security.tokens import TokenService

log = logging.getLogger("cityhealth.security")

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_FORM = "application/x-www-form-urlencoded"
_MAX_FORM = 64 * 1024


@dataclass(frozen=True)
class OAuthServer:
    accounts: Accounts
    tokens: TokenService
    grants: Grants
    settings: SecuritySettings
    limiter: RateLimiter
    record: Callable[[SignIn], None] = not_recorded  # sign-ins into the audit trail

    @property
    def base(self) -> str:
        """The issuer: the base URL of every endpoint."""
        return self.settings.issuer.rstrip("/")


class OAuthError(Exception):
    """An RFC 6749 §5.2 error answer: JSON `error` and `error_description`."""

    def __init__(
        self,
        error: str,
        description: str,
        status: int = 400,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(description)
        self.error, self.description, self.status = error, description, status
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": self.error, "error_description": self.description}
        return JSONResponse(body, self.status, headers={**NO_STORE, **self.headers})


async def read_form(request: Request) -> dict[str, str]:
    """The form parameters of a POST; `OAuthError` for anything but a small, proper form."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != _FORM:
        raise OAuthError("invalid_request", f"the body must be {_FORM}")
    length = request.headers.get("content-length", "0")
    if not length.isdigit() or int(length) > _MAX_FORM:
        raise OAuthError("invalid_request", "the body is too large")
    try:
        form = await request.form()
    except Exception:  # whatever the parser rejects is the client's error, not ours
        raise OAuthError("invalid_request", "malformed form body") from None
    return single(form.multi_items())


def single(items: Iterable[tuple[str, Any]]) -> dict[str, str]:
    """Parameters as a dict; each at most once (RFC 6749 §3.1, §3.2)."""
    values: dict[str, str] = {}
    for name, value in items:
        if not isinstance(value, str):
            raise OAuthError("invalid_request", f"{name} must be text")
        if name in values:
            raise OAuthError("invalid_request", f"{name} is given more than once")
        values[name] = value
    return values


def required(params: dict[str, str], name: str) -> str:
    value = params.get(name)
    if not value:
        raise OAuthError("invalid_request", f"{name} is required")
    return value


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def guarded(run: Callable[[], Response]) -> Response:
    """`run`, its OAuthError answered as JSON and a database failure as 503, never a 500."""
    try:
        return run()
    except OAuthError as error:
        return error.response()
    except SQLAlchemyError:
        log.exception("OAuth endpoint: database error")
        return OAuthError("temporarily_unavailable", "try again later", 503).response()


async def json_answer(request: Request, handle: Callable[[dict[str, str]], Response]) -> Response:
    """Parse the form, then run `handle` on it in the thread pool, guarded."""
    try:
        params = await read_form(request)
    except OAuthError as error:
        return error.response()
    return await run_in_threadpool(guarded, lambda: handle(params))
