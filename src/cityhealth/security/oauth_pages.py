"""The pages of the authorization endpoint: sign in, change an expired password, choose the
patient, errors.

They are portal pages (`templates/sign_in*.html`, the portal's look, catalogs and language
switch) in the language of the request: Simplified Chinese unless the person chose English.
No script, nothing from another site, every value escaped by the templates. The authorization
request travels in hidden fields, with the language the form was shown in (`lang`): the POST
that answers it knows no cookie, and speaks that language.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from fastapi.responses import HTMLResponse

from cityhealth.portal import i18n
from cityhealth.portal.shell import template_environment
from cityhealth.security.passwords import PasswordPolicy
from cityhealth.security.scopes import NON_RESOURCE_SCOPES, parse_scope

ENDPOINT = "/oauth/authorize"
#: The hidden field naming the language of the form (a locale of `i18n.LOCALES`).
LANG_FIELD = "lang"

# What a page tells the person; `sign_in_macros.html` words each one in the person's language.
LOGIN_FAILED = "login_failed"  # one message whether or not the user exists
SESSION_ENDED = "session_ended"
PASSWORD_EXPIRED = "password_expired"
PASSWORDS_DIFFER = "passwords_differ"
PASSWORD_REJECTED = "password_rejected"  # the policy's reasons, worded by the policy
CHOOSE_A_PATIENT = "choose_a_patient"
TOO_MANY_ATTEMPTS = "too_many_attempts"
UNKNOWN_CLIENT = "unknown_client"
WRONG_REDIRECT_URI = "wrong_redirect_uri"
BAD_REQUEST = "bad_request"
UNAVAILABLE = "unavailable"
NOTICES = (
    LOGIN_FAILED,
    SESSION_ENDED,
    PASSWORD_EXPIRED,
    PASSWORDS_DIFFER,
    PASSWORD_REJECTED,
    CHOOSE_A_PATIENT,
    TOO_MANY_ATTEMPTS,
    UNKNOWN_CLIENT,
    WRONG_REDIRECT_URI,
    BAD_REQUEST,
    UNAVAILABLE,
)

_HEADERS = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "X-Frame-Options": "DENY",  # no clickjacking of the login form
    "X-Content-Type-Options": "nosniff",
    # The portal's stylesheet only. No form-action: browsers apply it to the redirect that
    # answers the form, which goes to the application's own site.
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src data:; frame-ancestors 'none'; "
        "base-uri 'none'"
    ),
    "Referrer-Policy": "no-referrer",
}
_ACTIONS = "cruds"  # the order in which a scope's interactions are named


@dataclass(frozen=True)
class Notice:
    """A message for the person: `key` (one of NOTICES) and what its wording needs."""

    key: str
    seconds: int = 0  # TOO_MANY_ATTEMPTS: how long to wait
    detail: str = ""  # BAD_REQUEST: the protocol's description, for the app's developer
    reasons: tuple[str, ...] = ()  # PASSWORD_REJECTED: already in the person's language


@dataclass(frozen=True)
class ScopeView:
    """A requested scope as the templates describe it."""

    scope: str
    context: str | None = None  # resource scopes only: patient, user or system
    resource_type: str = ""
    actions: tuple[str, ...] = ()  # interaction letters, in c r u d s order


def scope_views(scopes: Iterable[str]) -> list[ScopeView]:
    """The scopes of a checked request, ready to be put in words."""
    views = []
    for scope in scopes:
        if scope in NON_RESOURCE_SCOPES:
            views.append(ScopeView(scope))
            continue
        parsed = parse_scope(scope)
        actions = tuple(letter for letter in _ACTIONS if letter in parsed.interactions)
        views.append(ScopeView(scope, parsed.context, parsed.resource_type, actions))
    return views


def return_address(fields: Mapping[str, str]) -> str:
    """The login form of this authorization request: where the language switch goes back to."""
    return f"{ENDPOINT}?{urlencode(fields)}"


def login_page(
    client_name: str,
    scopes: Sequence[str],
    fields: Mapping[str, str],
    *,
    notice: Notice | None = None,
    username: str = "",
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> HTMLResponse:
    """The login form."""
    return _render(
        "sign_in.html",
        return_address(fields),
        status,
        headers,
        client_name=client_name,
        scopes=scope_views(scopes),
        fields=fields,
        notice=notice,
        username=username,
    )


def password_page(
    client_name: str,
    scopes: Sequence[str],
    fields: Mapping[str, str],
    policy: PasswordPolicy,
    *,
    notice: Notice | None = None,
    username: str = "",
) -> HTMLResponse:
    """The login form that also replaces an expired password."""
    return _render(
        "sign_in_password.html",
        return_address(fields),
        200,
        None,
        client_name=client_name,
        scopes=scope_views(scopes),
        fields=fields,
        notice=notice,
        username=username,
        policy=policy,
    )


def choose_patient_page(
    client_name: str,
    fields: Mapping[str, str],
    session_token: str,
    patients: Iterable[tuple[str, str]],
    *,
    notice: Notice | None = None,
) -> HTMLResponse:
    """Which resident (the account holder or a child in their care) the app may act for."""
    return _render(
        "sign_in_patient.html",
        return_address(fields),
        200,
        None,
        client_name=client_name,
        fields=fields,
        session_token=session_token,
        patients=list(patients),
        notice=notice,
    )


def error_page(notice: Notice, status: int, back: str | None = None) -> HTMLResponse:
    """A request that cannot be answered with a redirect; `back` is the address that shows
    it again (for the language switch), when there is one."""
    return _render("sign_in_error.html", back, status, None, notice=notice)


def _render(
    template: str,
    back: str | None,
    status: int,
    headers: Mapping[str, str] | None,
    **values: Any,
) -> HTMLResponse:
    locale = i18n.current()
    html_lang = i18n.HTML_LANG[locale]
    html = (
        template_environment()
        .get_template(template)
        .render(
            viewer=None,
            htmx_url=None,  # the sign-in pages run no script
            locale=locale,
            html_lang=html_lang,
            locales=[(code, i18n.HTML_LANG[code]) for code in i18n.LOCALES],
            here=quote(back, safe="") if back else None,
            endpoint=ENDPOINT,
            **values,
        )
    )
    return HTMLResponse(
        html, status, headers={**_HEADERS, "Content-Language": html_lang, **(headers or {})}
    )
