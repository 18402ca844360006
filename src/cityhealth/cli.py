"""The `cityhealth` command."""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import typer
import uvicorn

from cityhealth.config import get_settings
from cityhealth.fhir.bulk_import import register as register_import
from cityhealth.fhir.export_api import register as register_export
from cityhealth.fhir.packages import PackageError, install
from cityhealth.portal.assets import commands as portal_commands
from cityhealth.security.cli import audit, users

app = typer.Typer(
    help="CityHealth: the Internet + healthcare platform of a city.", no_args_is_help=True
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
fhir_app = typer.Typer(help="FHIR packages.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(fhir_app, name="fhir")
app.add_typer(users, name="users")
app.add_typer(audit, name="audit")
app.add_typer(portal_commands, name="portal")
register_export(app)
register_import(app)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head")) -> None:
    """Create or migrate the database to the latest schema."""
    from cityhealth.migrate import upgrade

    settings = get_settings()
    try:
        upgrade(settings.database_url, revision)
    except Exception as error:  # one clear line instead of a traceback
        _fail(f"database upgrade failed: {error}")
    typer.echo(f"database at {revision}")


@fhir_app.command("install")
def fhir_install(
    spec: str = typer.Argument(..., help="NAME@VERSION, e.g. hl7.fhir.r4.examples@4.0.1"),
    force: bool = typer.Option(False, help="Reinstall even if present."),
) -> None:
    """Fetch a FHIR package (npm pack), verify its checksum and put it in the package cache."""
    settings = get_settings()
    try:
        path = install(settings.fhir_package_cache, spec, force=force)
    except PackageError as error:
        _fail(str(error))
    typer.echo(f"{spec} installed in {path}")


def _definitions_problem() -> str | None:
    """Load the FHIR definitions (compiling their cache on first use); what stops them, if any."""
    from cityhealth.fhir.definitions import get_definitions

    try:
        get_definitions()
    except PackageError as error:
        return str(error)
    return None


@app.command()
def serve(
    host: str | None = typer.Option(None, help="Address to listen on."),
    port: int | None = typer.Option(None, help="Port to listen on."),
    workers: int | None = typer.Option(None, help="Worker processes."),
) -> None:
    """Migrate the database, then serve the platform (FHIR at /fhir, OpenAPI at /docs)."""
    from cityhealth.migrate import upgrade

    settings = get_settings()
    workers = workers or settings.workers
    logging.basicConfig(level=settings.log_level.upper(), format="%(message)s")
    if workers > 1:
        # The supervisor only forks workers: load the definitions (and build their cache) in a
        # child so that it does not keep them in memory.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            problem = pool.submit(_definitions_problem).result()
    else:
        problem = _definitions_problem()
    if problem:
        _fail(problem)
    upgrade(settings.database_url)
    uvicorn.run(
        "cityhealth.app:create_app",
        factory=True,
        host=host or settings.host,
        port=port or settings.port,
        workers=workers,
        log_level=settings.log_level,
        access_log=False,
    )
