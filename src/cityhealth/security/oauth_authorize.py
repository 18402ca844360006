"""The authorization endpoint: check the request, sign the person in, redirect with a code.

The code is good for one use within `code_seconds`, bound to the client, the redirect URI, the
PKCE challenge and the granted scopes (requested ∩ role maximum ∩ client maximum). A request
whose client or redirect URI is unknown is answered with a page, never redirected (RFC 6749
§4.1.2.1); other errors go back to the client as `error` parameters of the redirect. The
pages speak the person's language: the portal's choice (cookie, Accept-Language) for the GET,
the form's `lang` field for the POST.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit, urlunsplit

from fastapi import Request, Response
from fastapi.responses import RedirectResponse
from sqlalchemy.exc import SQLAlchemyError

from cityhealth.portal import i18n
from cityhealth.portal.shell import use_language
from cityhealth.security import oauth_pages as pages
from cityhealth.security.accounts import (
    MUST_CHANGE,
    Account,
    LoginResult,
    PasswordRejected,
    normalize_username,
)
from cityhealth.security.clients import OAuthClient
from cityhealth.security.grants import Grant
from cityhealth.security.oauth_server import NO_STORE, OAuthError, OAuthServer, single
from cityhealth.security.roles import ROLES, limit_scopes
from cityhealth.security.scopes import parse_scopes
from cityhealth.security.sign_in_audit import LOGIN, SignIn
from cityhealth.security.tokens import token_digest

log = logging.getLogger("cityhealth.security")

_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")  # base64url SHA-256, no padding
_MAX_STATE = 1024
# The authorization request, carried in hidden fields from the form to its POST.
_CARRIED = (
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "code_challenge",
    "code_challenge_method",
    "aud",
)


class _PageError(Exception):
    """The request cannot be sent back (unknown client or redirect URI): show a page."""

    def __init__(self, notice: str) -> None:
        super().__init__(notice)
        self.notice = notice


class _RedirectError(Exception):
    def __init__(self, error: str, description: str, redirect_uri: str, state: str | None) -> None:
        super().__init__(description)
        self.error, self.description = error, description
        self.redirect_uri, self.state = redirect_uri, state


@dataclass(frozen=True)
class _Request:
    client: OAuthClient
    redirect_uri: str
    state: str
    scopes: tuple[str, ...]
    code_challenge: str
    fields: dict[str, str]


def login_form(server: OAuthServer, request: Request) -> Response:
    """GET: the login form for a valid authorization request."""
    use_language(request)

    def show() -> Response:
        auth = _check(server, single(request.query_params.multi_items()))
        return pages.login_page(auth.client.name, auth.scopes, auth.fields)

    query = request.url.query
    return _answer(server, show, f"{request.url.path}?{query}" if query else request.url.path)


def sign_in(server: OAuthServer, params: dict[str, str], address: str) -> Response:
    """POST: check the credentials (or the chosen patient) and redirect with a code."""
    i18n.use(params.get(pages.LANG_FIELD, i18n.DEFAULT))
    carried = {name: params[name] for name in _CARRIED if name in params}
    back = pages.return_address(carried)
    return _answer(server, lambda: _sign_in(server, params, address), back)


def bad_form(description: str, back: str | None = None) -> Response:
    """The page of a request too malformed to be sent back to its client."""
    return pages.error_page(pages.Notice(pages.BAD_REQUEST, detail=description), 400, back)


def _answer(server: OAuthServer, run: Callable[[], Response], back: str | None) -> Response:
    """`run`'s answer, or the page or redirect of what went wrong; `back` shows the request
    again (in the other language)."""
    try:
        return run()
    except _PageError as error:
        return pages.error_page(pages.Notice(error.notice), 400, back)
    except OAuthError as error:  # a malformed request, before its client is known
        return bad_form(error.description, back)
    except _RedirectError as error:
        params = {"error": error.error, "error_description": error.description}
        if error.state is not None:
            params["state"] = error.state
        return _redirect(server, error.redirect_uri, params)
    except SQLAlchemyError:
        log.exception("authorization endpoint: database error")
        return pages.error_page(pages.Notice(pages.UNAVAILABLE), 503, back)


def _check(server: OAuthServer, params: dict[str, str]) -> _Request:
    client_id = params.get("client_id", "")
    client = server.accounts.client(client_id) if client_id else None
    if client is None or not client.active:
        raise _PageError(pages.UNKNOWN_CLIENT)
    redirect_uri = params.get("redirect_uri", "")
    if redirect_uri not in client.redirect_uris:  # exact match (RFC 6749 §3.1.2.3)
        raise _PageError(pages.WRONG_REDIRECT_URI)
    state = params.get("state")

    def refuse(error: str, description: str) -> _RedirectError:
        return _RedirectError(error, description, redirect_uri, state)

    if params.get("response_type") != "code":
        raise refuse("unsupported_response_type", "response_type must be code")
    if not state or len(state) > _MAX_STATE:
        raise refuse("invalid_request", f"state is required (at most {_MAX_STATE} characters)")
    if params.get("code_challenge_method") != "S256":
        raise refuse("invalid_request", "PKCE is required, with code_challenge_method S256")
    challenge = params.get("code_challenge", "")
    if not _CHALLENGE.fullmatch(challenge):
        raise refuse("invalid_request", "code_challenge must be a base64url SHA-256 digest")
    audience = params.get("aud")
    if audience is not None and audience.rstrip("/") != server.settings.audience.rstrip("/"):
        raise refuse("invalid_request", "aud is not the FHIR base URL of this server")
    scopes = tuple(params.get("scope", "").split())
    try:
        parse_scopes(scopes)
    except ValueError as error:
        raise refuse("invalid_scope", str(error)) from None
    if not scopes:
        raise refuse("invalid_scope", "scope is required")
    fields = {name: params[name] for name in _CARRIED if name in params}
    return _Request(client, redirect_uri, state, scopes, challenge, fields)


def _sign_in(server: OAuthServer, params: dict[str, str], address: str) -> Response:
    auth = _check(server, params)
    settings = server.settings
    per_address = (f"address:{address}", settings.attempts_per_minute_per_address)
    if "login_session" in params:  # second step: the patient was chosen
        wait = server.limiter.admit(per_address)
        return _too_many(auth, wait) if wait else _continue_session(server, auth, params)
    username = params.get("username", "")
    user_key = (f"user:{normalize_username(username)}", settings.attempts_per_minute)
    wait = server.limiter.admit(per_address, user_key)
    if wait:
        return _too_many(auth, wait)

    def form(notice: pages.Notice, change_password: bool = False) -> Response:
        if change_password:
            return pages.password_page(
                auth.client.name,
                auth.scopes,
                auth.fields,
                server.accounts.policy,
                notice=notice,
                username=username,
            )
        return pages.login_page(
            auth.client.name, auth.scopes, auth.fields, notice=notice, username=username
        )

    password, new_password = params.get("password", ""), params.get("new_password")
    if not username or not password:
        return form(pages.Notice(pages.LOGIN_FAILED))
    if new_password is not None:
        if new_password != params.get("new_password_confirm"):
            return form(pages.Notice(pages.PASSWORDS_DIFFER), change_password=True)
        try:
            result = server.accounts.change_password(username, password, new_password)
        except PasswordRejected as error:
            reasons = tuple(i18n.pick(v.message_zh, v.message_en) for v in error.violations)
            notice = pages.Notice(pages.PASSWORD_REJECTED, reasons=reasons)
            return form(notice, change_password=True)
    else:
        result = server.accounts.authenticate(username, password)
    _record(server, result, username, address, new_password is not None)
    if result.outcome == MUST_CHANGE:
        return form(pages.Notice(pages.PASSWORD_EXPIRED), change_password=True)
    if not result.ok or result.account is None:
        # Wrong password, unknown name and locked account look the same (the result says
        # which, for the audit trail).
        return form(pages.Notice(pages.LOGIN_FAILED), change_password=new_password is not None)
    session = server.accounts.create_session(result.account.id)
    return _issue_code(server, auth, result.account, session, chosen=None)


def _record(
    server: OAuthServer, result: LoginResult, username: str, address: str, changing: bool
) -> None:
    account = result.account
    reason = "password_changed" if changing and result.ok else result.reason
    server.record(
        SignIn(
            LOGIN,
            result.ok,
            account.fhir_user if account else username[:64],
            account.role if account else "unknown",
            address,
            reason,
            account.organization if account else None,
        )
    )


def _continue_session(server: OAuthServer, auth: _Request, params: dict[str, str]) -> Response:
    session = params["login_session"]
    account_id = server.accounts.touch_session(token_digest(session))
    account = server.accounts.account(account_id) if account_id else None
    if account is None:
        notice = pages.Notice(pages.SESSION_ENDED)
        return pages.login_page(auth.client.name, auth.scopes, auth.fields, notice=notice)
    return _issue_code(server, auth, account, session, chosen=params.get("patient", ""))


def _issue_code(
    server: OAuthServer, auth: _Request, account: Account, session: str, chosen: str | None
) -> Response:
    """Redirect with a code for what the account may grant; first ask which patient when the
    scopes need one and the account acts for several."""
    # Both maxima were checked when defined and the request when it came: nothing to refuse.
    role_maximum = ROLES[account.role].max_scopes
    granted = limit_scopes(limit_scopes(auth.scopes, role_maximum), auth.client.scopes)
    patient = None
    if any(_needs_patient(scope) for scope in granted):
        links = [(link.patient, link.relation) for link in server.accounts.patients(account.id)]
        if chosen and chosen in {reference for reference, _ in links}:
            patient = chosen
        elif len(links) == 1:
            patient = links[0][0]
        elif links:
            # No choice at all is the language switch: the same question, in other words.
            notice = pages.Notice(pages.CHOOSE_A_PATIENT) if chosen else None
            return pages.choose_patient_page(
                auth.client.name, auth.fields, session, links, notice=notice
            )
        else:
            granted = tuple(scope for scope in granted if not _needs_patient(scope))
    if not granted:
        raise _RedirectError(
            "invalid_scope",
            "none of the requested scopes may be granted to this account",
            auth.redirect_uri,
            auth.state,
        )
    grant = Grant(
        auth.client.client_id,
        account.id,
        token_digest(session),
        granted,
        patient.removeprefix("Patient/") if patient else None,
    )
    code = server.grants.issue_code(
        grant, redirect_uri=auth.redirect_uri, code_challenge=auth.code_challenge
    )
    return _redirect(server, auth.redirect_uri, {"code": code, "state": auth.state})


def _needs_patient(scope: str) -> bool:
    return scope == "launch/patient" or scope.startswith("patient/")


def _too_many(auth: _Request, wait: int) -> Response:
    return pages.login_page(
        auth.client.name,
        auth.scopes,
        auth.fields,
        notice=pages.Notice(pages.TOO_MANY_ATTEMPTS, seconds=wait),
        status=429,
        headers={"Retry-After": str(wait)},
    )


def _redirect(server: OAuthServer, uri: str, params: dict[str, str]) -> Response:
    # RFC 9207: `iss` tells the client which server answered (mix-up attacks).
    extra = urlencode({**params, "iss": server.base})
    parts = urlsplit(uri)
    query = f"{parts.query}&{extra}" if parts.query else extra
    return RedirectResponse(urlunsplit(parts._replace(query=query)), 303, headers=NO_STORE)
