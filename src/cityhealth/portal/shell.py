"""The shell every portal page lives in: templates, language, the signed-in viewer, CSRF checks,
security headers and readable error pages.

A page is a function of a `Call` (request, viewer, form) registered through `Portal.page`,
which signs the person in first (or sends them to /login), refuses a POST without its CSRF
token, sends a person whose password has expired to the password page, and turns an engine
error into a page in the person's language. Page functions run in the thread pool.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from cityhealth.config import Settings
from cityhealth.fhir import jsonio
from cityhealth.fhir.access import AccessContext
from cityhealth.fhir.engine import FhirEngine
from cityhealth.fhir.errors import FhirError
from cityhealth.portal import i18n
from cityhealth.portal.assets import HTMX_URL
from cityhealth.portal.i18n import N_
from cityhealth.portal.names import display_name
from cityhealth.portal.session import PortalSessions, Viewer, csrf_ok
from cityhealth.security.roles import ROLES

log = logging.getLogger("cityhealth.portal")

TEMPLATES = Path(__file__).with_name("templates")
_MAX_FIELDS = 200
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
_PRIVATE = {"Cache-Control": "no-store", "Pragma": "no-cache"}

FORM_EXPIRED = N_("This form has expired. Please go back, reload the page and try again.")
RESIDENTS_ONLY = N_("This page is for residents.")
NOT_FOUND = N_("The page or record was not found.")
UNAVAILABLE = N_("The service is unavailable for a moment. Please try again later.")
FAILED = N_("Something went wrong; it has been logged. Please try again.")


@cache
def template_environment() -> Environment:
    """The portal's templates, escaping every value, with gettext in the current language.

    One environment for the portal and the authorization endpoint's sign-in pages, so both
    have the same look, the same catalogs and the same language switch.
    """
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined,
        extensions=["jinja2.ext.i18n"],
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.install_gettext_callables(  # type: ignore[attr-defined]
        i18n.gettext, i18n.ngettext, newstyle=True
    )
    env.globals.update(
        show_time=i18n.show_time,
        show_date=i18n.show_date,
        show_list=i18n.show_list,
        show_seconds=i18n.show_seconds,
        pick=i18n.pick,
    )
    return env


@dataclass(frozen=True)
class NavItem:
    path: str
    label: str  # catalog message id
    residents_only: bool = False


#: The shell's menu; later pages add their own entries.
NAV = [
    NavItem("/", N_("Home")),
    NavItem("/consents", N_("Record access consents"), residents_only=True),
    NavItem("/access-log", N_("Who accessed my record"), residents_only=True),
    NavItem("/password", N_("Change password")),
]


@dataclass
class Call:
    """One request to a page."""

    request: Request
    viewer: Viewer
    form: Mapping[str, list[str]] = field(default_factory=dict)

    def field(self, name: str) -> str:
        values = self.form.get(name) or [""]
        return values[0].strip()

    def fields(self, name: str) -> list[str]:
        return list(self.form.get(name) or [])

    @property
    def htmx(self) -> bool:
        return self.request.headers.get("hx-request") == "true"


Handler = Callable[[Call], Response]


class Portal:
    def __init__(
        self, engine: FhirEngine, sessions: PortalSessions, settings: Settings, htmx: bool
    ) -> None:
        self.engine = engine
        self.sessions = sessions
        self.settings = settings
        self.htmx = htmx
        self.env = template_environment()

    # Rendering

    def render(
        self,
        request: Request,
        template: str,
        viewer: Viewer | None = None,
        status: int = 200,
        **values: Any,
    ) -> HTMLResponse:
        locale = i18n.current()
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        html = self.env.get_template(template).render(
            viewer=viewer,
            role_name=_role_name(viewer),
            nav=[i for i in NAV if viewer and (viewer.is_resident or not i.residents_only)],
            current_path=request.url.path,
            here=quote(path, safe=""),
            locale=locale,
            html_lang=i18n.HTML_LANG[locale],
            locales=[(code, i18n.HTML_LANG[code]) for code in i18n.LOCALES],
            htmx_url=HTMX_URL if self.htmx else None,
            csrf=viewer.csrf if viewer else "",
            **values,
        )
        headers = {**_HEADERS, "Content-Language": i18n.HTML_LANG[locale]}
        if viewer is not None:
            headers.update(_PRIVATE)
        return HTMLResponse(html, status, headers=headers)

    def message(
        self, request: Request, text: str, status: int, viewer: Viewer | None = None
    ) -> HTMLResponse:
        """A page with one message (a catalog message id) and the way back."""
        return self.render(request, "message.html", viewer, status, text=text, sign_in=False)

    def patient_choices(self, viewer: Viewer, context: AccessContext) -> list[tuple[str, str]]:
        """The patients the viewer acts for, with their names (a choice for guardians)."""
        named = []
        for link in viewer.patients:
            try:
                stored = self.engine.repository.read(
                    context, "Patient", link.patient.removeprefix("Patient/")
                )
                name = display_name(jsonio.loads(stored.body or "{}"))
            except FhirError:
                name = ""
            named.append((link.patient, name or link.patient))
        return named

    # Pages

    def page(
        self, handler: Handler, *, residents_only: bool = False, allow_expired: bool = False
    ) -> Callable[[Request], Awaitable[Response]]:
        """The endpoint of a page that needs a signed-in person."""

        async def endpoint(request: Request) -> Response:
            form: dict[str, list[str]] = {}
            if request.method == "POST":
                received = await request.form(max_files=0, max_fields=_MAX_FIELDS)
                for name, value in received.multi_items():
                    if isinstance(value, str):
                        form.setdefault(name, []).append(value)
            return await run_in_threadpool(
                self._run, handler, request, form, residents_only, allow_expired
            )

        endpoint.__name__ = handler.__name__
        endpoint.__doc__ = handler.__doc__
        return endpoint

    def _run(
        self,
        handler: Handler,
        request: Request,
        form: dict[str, list[str]],
        residents_only: bool,
        allow_expired: bool,
    ) -> Response:
        use_language(request)
        viewer = None
        try:
            viewer = self.sessions.viewer(
                request.cookies.get(self.sessions.cookie),
                request.client.host if request.client else None,
            )
            if viewer is None:
                return self.to_login(request)
            if request.method == "POST" and not csrf_ok(viewer, _first(form, "csrf_token")):
                return self.message(request, FORM_EXPIRED, 403, viewer)
            if viewer.password_expired and not allow_expired:
                return RedirectResponse("/password", 303)
            if residents_only and not viewer.is_resident:
                return self.message(request, RESIDENTS_ONLY, 403, viewer)
            return handler(Call(request, viewer, form))
        except FhirError as error:
            if error.status in (404, 410):
                return self.message(request, NOT_FOUND, 404, viewer)
            log.warning("portal page %s: engine refused: %s", request.url.path, error)
            return self.message(request, FAILED, min(error.status, 500), viewer)
        except SQLAlchemyError:
            log.exception("portal page %s: database error", request.url.path)
            return self.message(request, UNAVAILABLE, 503)
        except Exception:  # a person sees a page in their language, never a traceback
            log.exception("portal page %s failed", request.url.path)
            return self.message(request, FAILED, 500, viewer)

    def to_login(self, request: Request) -> Response:
        """Send a person who is not signed in to /login, back to this page afterwards."""
        back = request.url.path if request.method == "GET" else "/"
        if request.method == "GET" and request.url.query:
            back += f"?{request.url.query}"
        target = f"/login?next={quote(back, safe='')}"
        if request.headers.get("hx-request") == "true":
            # htmx follows redirects inside the page; this header makes it load the login.
            return Response(status_code=401, headers={"HX-Redirect": target})
        return RedirectResponse(target, 303)


def use_language(request: Request) -> str:
    """Set the language of this request from its cookie and Accept-Language."""
    locale = i18n.negotiate(
        request.cookies.get(i18n.COOKIE), request.headers.get("accept-language")
    )
    i18n.use(locale)
    return locale


def _first(form: Mapping[str, list[str]], name: str) -> str | None:
    values = form.get(name)
    return values[0] if values else None


def _role_name(viewer: Viewer | None) -> str:
    if viewer is None:
        return ""
    role = ROLES[viewer.account.role]
    kind = role.kind(viewer.account.role_kind) if viewer.account.role_kind else None
    name = i18n.pick(role.name_zh, role.name_en)
    return f"{name} · {i18n.pick(kind.name_zh, kind.name_en)}" if kind else name
