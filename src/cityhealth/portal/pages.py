"""The portal's own pages — home, sign-in and sign-out, language, password — and
`register_portal`, which adds the portal to the application."""

from __future__ import annotations

import logging

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from cityhealth.config import Settings
from cityhealth.fhir.engine import FhirEngine
from cityhealth.portal import i18n
from cityhealth.portal.access_log import build_access_log_router
from cityhealth.portal.assets import PACKAGE_STATIC, htmx_installed, vendor_dir
from cityhealth.portal.consent_pages import build_consent_router
from cityhealth.portal.i18n import N_
from cityhealth.portal.session import (
    LOGIN_COOKIE,
    LoginFailed,
    PortalSessions,
    csrf_ok,
    safe_next,
)
from cityhealth.portal.shell import FORM_EXPIRED, UNAVAILABLE, Call, Portal, use_language
from cityhealth.security.accounts import REFUSED, PasswordRejected
from cityhealth.security.setup import Security

log = logging.getLogger("cityhealth.portal")

SIGNED_OUT = N_("You have signed out.")
PASSWORDS_DIFFER = N_("The two new passwords are not the same.")
WRONG_PASSWORD = N_("The current password is not correct.")
LANGUAGE_YEAR = 365 * 24 * 3600


def register_portal(
    app: FastAPI, engine: FhirEngine, security: Security, settings: Settings
) -> Portal:
    """Add the portal's pages and static files to `app`, and register its OAuth client."""
    keys_dir = settings.keys_dir or settings.var_dir / "keys"
    sessions = PortalSessions(security, settings.public_url, keys_dir)
    try:
        sessions.register_client()
    except SQLAlchemyError:
        # A database not migrated yet: the client is registered at the first sign-in.
        log.warning("portal client not registered at start; retried at sign-in")
    portal = Portal(engine, sessions, settings, htmx=htmx_installed(settings))
    app.mount("/static/portal", StaticFiles(directory=PACKAGE_STATIC), name="portal-static")
    vendor = vendor_dir(settings)
    vendor.mkdir(parents=True, exist_ok=True)  # empty until `cityhealth portal install-assets`
    app.mount("/static/vendor", StaticFiles(directory=vendor), name="portal-vendor")
    app.include_router(build_shell_router(portal))
    app.include_router(build_consent_router(portal))
    app.include_router(build_access_log_router(portal))
    app.state.portal = portal
    return portal


def build_shell_router(portal: Portal) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    sessions = portal.sessions

    def home(call: Call) -> Response:
        return portal.render(call.request, "home.html", call.viewer)

    def login(request: Request) -> Response:
        """Start signing in at the authorization server (or go on when signed in)."""
        use_language(request)
        next_path = safe_next(request.query_params.get("next"))
        address = request.client.host if request.client else None
        try:
            if sessions.viewer(request.cookies.get(sessions.cookie), address) is not None:
                return RedirectResponse(next_path, 303)
            if not sessions.registered:
                sessions.register_client()
        except SQLAlchemyError:
            log.exception("portal sign-in: database error")
            return portal.message(request, UNAVAILABLE, 503)
        target, cookie = sessions.start_login(next_path)
        response = RedirectResponse(target, 303, headers={"Cache-Control": "no-store"})
        sessions.set_login(response, cookie)
        return response

    def callback(request: Request) -> Response:
        """The authorization server's answer: redeem the code and start the session."""
        use_language(request)
        params = dict(request.query_params)
        try:
            token, next_path = sessions.finish_login(request.cookies.get(LOGIN_COOKIE), params)
        except LoginFailed as failure:
            log.info("portal sign-in refused: %s", failure.reason)
            response: Response = portal.render(
                request, "message.html", None, 400, text=failure.message, sign_in=True
            )
        except SQLAlchemyError:
            log.exception("portal sign-in: database error")
            response = portal.message(request, UNAVAILABLE, 503)
        else:
            response = RedirectResponse(safe_next(next_path), 303)
            sessions.set_session(response, token)
        sessions.clear_login(response)
        return response

    async def logout(request: Request) -> Response:
        """End the session: revoke its tokens and its login session."""
        form = await request.form(max_files=0, max_fields=10)
        presented = form.get("csrf_token")
        return await run_in_threadpool(
            _logout, request, presented if isinstance(presented, str) else None
        )

    def _logout(request: Request, presented: str | None) -> Response:
        use_language(request)
        token = request.cookies.get(sessions.cookie)
        address = request.client.host if request.client else None
        viewer = sessions.viewer(token, address)
        if viewer is not None:
            if not csrf_ok(viewer, presented):
                return portal.message(request, FORM_EXPIRED, 403, viewer)
            sessions.logout(viewer.token)
        response = RedirectResponse("/signed-out", 303)
        sessions.clear_session(response)
        return response

    def signed_out(request: Request) -> Response:
        use_language(request)
        return portal.render(request, "message.html", None, text=SIGNED_OUT, sign_in=True)

    def language(request: Request) -> Response:
        """Switch the language (a preference cookie), then go back to the page."""
        chosen = request.query_params.get("to", "")
        response = RedirectResponse(safe_next(request.query_params.get("next")), 303)
        if chosen in i18n.LOCALES:
            response.set_cookie(
                i18n.COOKIE,
                chosen,
                max_age=LANGUAGE_YEAR,
                path="/",
                secure=sessions.secure,
                httponly=True,
                samesite="lax",
            )
        return response

    def password_form(call: Call) -> Response:
        changed = call.request.query_params.get("changed") == "1"
        return portal.render(
            call.request,
            "password.html",
            call.viewer,
            changed=changed,
            errors=[],
            policy=sessions.accounts.policy,
        )

    def change_password(call: Call) -> Response:
        """Change the password under the policy; its refusals in the person's language."""
        current, new = call.field("current_password"), call.field("new_password")
        errors: list[str] = []  # shown as they are: already in the person's language
        if not current:
            errors.append(i18n.gettext(WRONG_PASSWORD))
        elif not new or new != call.field("new_password_confirm"):
            errors.append(i18n.gettext(PASSWORDS_DIFFER))
        else:
            try:
                result = sessions.accounts.change_password(
                    call.viewer.account.username, current, new
                )
            except PasswordRejected as rejected:
                errors += [i18n.pick(v.message_zh, v.message_en) for v in rejected.violations]
            else:
                if result.outcome == REFUSED:
                    errors.append(i18n.gettext(WRONG_PASSWORD))
        if errors:
            return portal.render(
                call.request,
                "password.html",
                call.viewer,
                422,
                changed=False,
                errors=errors,
                policy=sessions.accounts.policy,
            )
        return RedirectResponse("/password?changed=1", 303)

    router.add_api_route("/", portal.page(home), methods=["GET"])
    router.add_api_route("/login", login, methods=["GET"])
    router.add_api_route("/portal/callback", callback, methods=["GET"])
    router.add_api_route("/logout", logout, methods=["POST"])
    router.add_api_route("/signed-out", signed_out, methods=["GET"])
    router.add_api_route("/lang", language, methods=["GET"])
    page = portal.page
    router.add_api_route("/password", page(password_form, allow_expired=True), methods=["GET"])
    router.add_api_route("/password", page(change_password, allow_expired=True), methods=["POST"])
    return router
