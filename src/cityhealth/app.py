"""The ASGI application: FHIR API, health and metrics, error handling and request logs."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from swagger_ui_bundle import swagger_ui_path

from cityhealth import __version__
from cityhealth.config import Settings, get_settings
from cityhealth.db import Database
from cityhealth.fhir.access import AccessContext
from cityhealth.fhir.bulk_export import BulkExport, ExportSettings
from cityhealth.fhir.definitions import get_definitions
from cityhealth.fhir.engine import FhirEngine
from cityhealth.fhir.errors import FhirError
from cityhealth.fhir.export_api import build_export_router
from cityhealth.fhir.http import outcome_response
from cityhealth.fhir.rest import build_router
from cityhealth.jobs import JobRunner
from cityhealth.portal import register_portal
from cityhealth.request_log import RequestLog
from cityhealth.security.audit import Settler
from cityhealth.security.guard import BearerGuard
from cityhealth.security.oauth_api import build_oauth_router
from cityhealth.security.setup import Security
from cityhealth.security.sign_in_audit import SignInRecorder

log = logging.getLogger("cityhealth.http")
_HTTP_CODES = {404: "not-found", 405: "not-supported", 413: "too-costly"}


def create_app(settings: Settings | None = None, db: Database | None = None) -> FastAPI:
    settings = settings or get_settings()
    db = db or Database(settings.database_url, settings.db_pool_size)
    engine = FhirEngine(db, get_definitions(), settings)
    exports = BulkExport(engine, ExportSettings.from_settings(settings))
    runner = JobRunner.from_settings(db, [exports], settings)
    security = Security.build(settings, db)
    settler = Settler(engine.repository)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # As many request threads as pooled connections: none waits for or opens one.
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.db_pool_size
        await run_in_threadpool(security.rotate_keys)
        runner.start()
        settler.start()
        try:
            yield
        finally:
            await run_in_threadpool(runner.stop)
            await run_in_threadpool(settler.stop)

    app = FastAPI(
        lifespan=lifespan,
        title="CityHealth",
        version=__version__,
        description="The Internet + healthcare platform of a city, on one FHIR R4 engine.",
        docs_url=None,
        redoc_url=None,
    )
    # The API explorer's assets come from the installed swagger-ui-bundle package, not a CDN.
    app.mount("/static/swagger-ui", StaticFiles(directory=swagger_ui_path), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    def docs() -> Response:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="CityHealth API",
            swagger_js_url="/static/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger-ui/swagger-ui.css",
            swagger_favicon_url="/static/swagger-ui/favicon-32x32.png",
        )

    app.state.engine = engine
    app.state.security = security
    app.state.jobs = runner
    # The bulk export routes go first: the FHIR router's /{type}/{id} would take their paths.
    app.include_router(build_export_router(engine, runner, exports))
    app.include_router(build_router(engine))
    app.include_router(
        build_oauth_router(
            security.accounts,
            security.tokens,
            security.keyring,
            security.settings,
            SignInRecorder(engine.repository),
        )
    )
    register_portal(app, engine, security, settings)

    @app.exception_handler(FhirError)
    async def fhir_error(_request: Request, error: FhirError) -> Response:
        return outcome_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> Response:
        code = _HTTP_CODES.get(error.status_code, "processing")
        detail = str(error.detail)
        if error.status_code == 404:
            detail = f"No route for {request.method} {request.url.path}"
        return outcome_response(FhirError(error.status_code, code, detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, error: RequestValidationError) -> Response:
        return outcome_response(FhirError(400, "invalid", str(error.errors()[:3])))

    @app.exception_handler(DataError)
    async def data_error(_request: Request, _error: DataError) -> Response:
        # A value the database cannot hold or compare (e.g. a NUL character): the input is wrong.
        return outcome_response(FhirError(400, "invalid", "A value in the request is not valid"))

    @app.exception_handler(IntegrityError)
    async def integrity_error(_request: Request, _error: IntegrityError) -> Response:
        # Two requests created the same resource at once; the loser may retry.
        return outcome_response(FhirError(409, "conflict", "A concurrent change won; retry"))

    @app.exception_handler(OperationalError)
    async def database_down(_request: Request, error: OperationalError) -> Response:
        log.error("database unavailable: %s", type(error.orig).__name__)
        return outcome_response(FhirError(503, "transient", "The database is unavailable"))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return outcome_response(
            FhirError(500, "exception", "The server could not complete the request; it was logged")
        )

    app.add_middleware(
        BearerGuard,
        tokens=security.tokens,
        revoked=security.accounts.is_revoked,
        fresh=security.accounts.revocations_fresh,
    )
    app.add_middleware(RequestLog)

    @app.get("/healthz", tags=["operations"])
    def healthz() -> Response:
        try:
            with db.read() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as error:  # the check reports any database failure
            body = {"status": "fail", "database": type(error).__name__}
            return Response(orjson.dumps(body), 503, media_type="application/json")
        return Response(orjson.dumps({"status": "ok"}), media_type="application/json")

    @app.get("/metrics", tags=["operations"])
    def metrics(request: Request) -> Response:
        ctx: AccessContext = request.state.access
        if ctx.role != "platform_admin" and not (ctx.role == "system" and not ctx.organization):
            raise FhirError(403, "forbidden", "Metrics are for the platform's operators")
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
