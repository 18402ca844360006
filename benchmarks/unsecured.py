"""The platform with its security taken out, for benchmarks only: the baseline against which
the cost of the access rules and the audit trail is measured on the same engine.

Every request under /fhir is served as the platform's own work (`access.SYSTEM`): no token is
checked, no access rule filters and no AuditEvent is written. Nothing of the product starts
this; `crud_mix.py --as unsecured` does, in place of `cityhealth serve`.

    python benchmarks/unsecured.py      # settings from the environment, as `cityhealth serve`
"""

from __future__ import annotations

import sys
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from cityhealth.app import create_app as create_secured_app
from cityhealth.config import Settings, get_settings
from cityhealth.db import Database
from cityhealth.fhir.access import SYSTEM
from cityhealth.migrate import upgrade
from cityhealth.security.guard import BearerGuard

HERE = Path(__file__).resolve().parent


class NoGuard:
    """In place of the BearerGuard: every request acts as the platform itself."""

    def __init__(self, app: ASGIApp, **_settings: object) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})["access"] = SYSTEM
        await self.app(scope, receive, send)


def create_app(settings: Settings | None = None, db: Database | None = None) -> FastAPI:
    app = create_secured_app(settings, db)
    guards = [m for m in app.user_middleware if m.cls is BearerGuard]
    if len(guards) != 1:
        raise RuntimeError("the application no longer has one BearerGuard to replace")
    guards[0].cls = NoGuard  # type: ignore[assignment]  # the stack is built at the first request
    return app


def main() -> int:
    settings = get_settings()
    upgrade(settings.database_url)
    uvicorn.run(
        "unsecured:create_app",
        factory=True,
        app_dir=str(HERE),
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
