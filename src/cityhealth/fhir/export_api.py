"""Bulk Data export over HTTP (hl7.org/fhir/uv/bulkdata/STU2/export.html) and `cityhealth export`.

Kick-off (`$export` at system, Patient and Group level) queues a database job and answers 202
with the status URL; polling answers 202 with `X-Progress` until the manifest is ready. Only
the one who asked may poll, cancel or download: to anyone else the job does not exist.
The router must be included before the main /fhir router, whose `/{rtype}/{rid}` would
otherwise take these paths.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import NoReturn

import orjson
import typer
from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from cityhealth.fhir.access import SYSTEM
from cityhealth.fhir.bulk_export import (
    EXPORT_KIND,
    GROUP_LEVEL,
    NDJSON,
    PATIENT_LEVEL,
    SYSTEM_LEVEL,
    BulkExport,
    ExportOutput,
    ExportRequest,
    ExportSettings,
)
from cityhealth.fhir.clock import http_date, now_us
from cityhealth.fhir.datetimes import date_range
from cityhealth.fhir.definitions import Definitions
from cityhealth.fhir.engine import FhirEngine
from cityhealth.fhir.errors import (
    FhirError,
    OutcomeIssue,
    bad_request,
    not_found,
    operation_outcome,
)
from cityhealth.fhir.http import base_url, caller, fhir_response, json_body, negotiate
from cityhealth.jobs.runner import (
    ACCEPTED,
    CANCELLED,
    COMPLETED,
    FAILED,
    Job,
    JobFailed,
    JobRunner,
)

OUTPUT_FORMATS = frozenset({"application/fhir+ndjson", "application/ndjson", "ndjson"})
#: Kick-off parameters of the specification this server does not implement.
UNSUPPORTED = frozenset({"_elements", "patient", "includeAssociatedData", "_typeFilter"})
_INSTANT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})")


def parse_export(
    definitions: Definitions,
    level: str,
    group_id: str | None,
    params: list[tuple[str, str]],
    url: str,
    lenient: bool = False,
) -> tuple[ExportRequest, list[OutcomeIssue]]:
    """The export a kick-off asks for, and warnings for what lenient handling ignored."""
    types: dict[str, None] = {}  # ordered and without repeats
    since: int | None = None
    warnings: list[OutcomeIssue] = []
    for name, value in params:
        if name == "_outputFormat":
            # An unencoded "+" in a query string arrives as a space.
            if value.strip().replace(" ", "+") not in OUTPUT_FORMATS:
                raise bad_request(
                    f"_outputFormat '{value}' is not supported; use {NDJSON}", "_outputFormat"
                )
        elif name == "_type":
            for rtype in (t.strip() for t in value.split(",")):
                if not definitions.is_resource_type(rtype):
                    raise bad_request(f"_type '{rtype}' is not a resource type", "_type")
                types[rtype] = None
        elif name == "_since":
            since = _instant(value)
        elif name in ("_format", "_pretty"):
            continue
        elif lenient:
            warnings.append(
                OutcomeIssue("warning", "not-supported", f"Parameter '{name}' was ignored")
            )
        else:
            detail = "is not supported" if name in UNSUPPORTED else "is not a $export parameter"
            raise bad_request(f"Parameter '{name}' {detail}", name, code="not-supported")
    return ExportRequest(level, tuple(types), since, group_id, url), warnings


def _instant(value: str) -> int:
    if not _INSTANT.fullmatch(value):
        raise bad_request(f"_since must be a FHIR instant, not '{value}'", "_since")
    try:
        return date_range(value)[0]
    except ValueError:
        raise bad_request(f"_since must be a FHIR instant, not '{value}'", "_since") from None


def _preferences(request: Request) -> dict[str, str]:
    """The Prefer header's preferences (RFC 7240: separated by commas or semicolons)."""
    found: dict[str, str] = {}
    for part in re.split(r"[,;]", request.headers.get("prefer", "")):
        name, _, value = part.strip().partition("=")
        if name:
            found[name.strip().lower()] = value.strip().strip('"').lower()
    return found


async def _body_parameters(request: Request) -> list[tuple[str, str]]:
    """The parameters of a POST kick-off's Parameters resource, as (name, value) pairs."""
    if not (await request.body()).strip():
        return []
    body = await json_body(request)
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise bad_request("A POST kick-off takes a Parameters resource", "resourceType")
    pairs = []
    for parameter in body.get("parameter") or []:
        values = [v for k, v in parameter.items() if k.startswith("value")]
        if not isinstance(parameter.get("name"), str) or len(values) != 1:
            raise bad_request("Each parameter needs a name and one value", "Parameters.parameter")
        pairs.append((parameter["name"], str(values[0])))
    return pairs


def build_export_router(engine: FhirEngine, runner: JobRunner, export: BulkExport) -> APIRouter:
    router = APIRouter(prefix="/fhir", tags=["FHIR Bulk Data"])
    settings = engine.settings
    retry_after = str(max(1, math.ceil(runner.poll_seconds)))

    def base(request: Request) -> str:
        return base_url(request, settings.fhir_base_url)

    async def kick_off(request: Request, level: str, group_id: str | None = None) -> Response:
        negotiate(request)
        preferences = _preferences(request)
        if "respond-async" not in preferences:
            raise bad_request("A Bulk Data export needs the header 'Prefer: respond-async'")
        params = [(k, v) for k, v in request.query_params.multi_items()]
        url = base(request) + request.url.path.removeprefix("/fhir")
        if request.method == "POST":
            params += await _body_parameters(request)
        elif request.url.query:
            url += f"?{request.url.query}"
        lenient = preferences.get("handling") == "lenient"
        wanted, warnings = parse_export(engine.definitions, level, group_id, params, url, lenient)
        ctx = caller(request)
        wanted = dataclasses.replace(wanted, access=ctx)

        def submit() -> str:  # recorded in the audit trail, refused or accepted
            with engine.auditor.action(ctx, "operation", "", query=url):
                export.check(ctx, wanted)
                return runner.submit(EXPORT_KIND, wanted.to_json(), ctx.who)

        job_id = await run_in_threadpool(submit)
        accepted = OutcomeIssue("information", "informational", f"Export {job_id} accepted")
        return fhir_response(
            orjson.dumps(operation_outcome([accepted, *warnings])),
            202,
            {"Content-Location": f"{base(request)}/_export-status/{job_id}"},
        )

    def owned(request: Request, job_id: str) -> Job:
        found = runner.get(job_id)
        if (
            found is None
            or found.kind != EXPORT_KIND
            or found.status == CANCELLED
            or found.expired(now_us())
            or found.owner != caller(request).who
        ):
            raise not_found(f"There is no export {job_id}")
        return found

    @router.get("/$export", summary="Export all data")
    @router.post("/$export", summary="Export all data")
    async def system_export(request: Request) -> Response:
        return await kick_off(request, SYSTEM_LEVEL)

    @router.get("/Patient/$export", summary="Export patients' data")
    @router.post("/Patient/$export", summary="Export patients' data")
    async def patient_export(request: Request) -> Response:
        return await kick_off(request, PATIENT_LEVEL)

    @router.get("/Group/{group_id}/$export", summary="Export a group's data")
    @router.post("/Group/{group_id}/$export", summary="Export a group's data")
    async def group_export(request: Request, group_id: str) -> Response:
        return await kick_off(request, GROUP_LEVEL, group_id)

    @router.get("/_export-status/{job_id}", summary="Export status, then its manifest")
    async def status(request: Request, job_id: str) -> Response:
        found = await run_in_threadpool(owned, request, job_id)
        if found.status == COMPLETED:
            assert found.result is not None and found.expires_at is not None
            output = ExportOutput.from_json(found.result)
            files = f"{base(request)}/_export-file/{job_id}"
            manifest = output.manifest(lambda name: f"{files}/{name}")
            return Response(
                orjson.dumps(manifest),
                200,
                {"Expires": http_date(found.expires_at)},
                media_type="application/json",
            )
        if found.status == FAILED:
            raise FhirError(500, "exception", found.error or "The export failed")
        progress = found.progress or ("queued" if found.status == ACCEPTED else "started")
        return Response(
            status_code=202, headers={"X-Progress": progress, "Retry-After": retry_after}
        )

    @router.delete("/_export-status/{job_id}", summary="Cancel an export, or discard its files")
    async def cancel(request: Request, job_id: str) -> Response:
        await run_in_threadpool(owned, request, job_id)
        await run_in_threadpool(runner.cancel, job_id)
        done = OutcomeIssue("information", "informational", f"Export {job_id} cancelled")
        return fhir_response(orjson.dumps(operation_outcome([done])), 202)

    @router.get("/_export-file/{job_id}/{name}", summary="One NDJSON file of an export")
    async def download(request: Request, job_id: str, name: str) -> Response:
        def file_of() -> Path:  # recorded in the audit trail: the data leaves here
            with engine.auditor.action(caller(request), "read", "", query=request.url.path):
                found = owned(request, job_id)
                names = ExportOutput.from_json(found.result).files if found.result else []
                path = export.directory_of(job_id) / name
                listed = name in {f.name for f in names}
                if found.status != COMPLETED or not listed or not path.is_file():
                    raise not_found(f"Export {job_id} has no file {name}")
                return path

        return FileResponse(await run_in_threadpool(file_of), media_type=NDJSON)

    return router


# -- the command line --------------------------------------------------------------------------
def register(app: typer.Typer) -> None:
    """Add `cityhealth export` to the command line."""

    @app.command("export")
    def export_command(
        out: Path = typer.Option(..., "--out", help="Directory for the NDJSON files (empty)."),
        types: str | None = typer.Option(
            None, "--type", help="Resource types, e.g. Patient,Encounter"
        ),
        since: str | None = typer.Option(
            None, "--since", help="Only resources changed at or after this FHIR instant."
        ),
        patient_level: bool = typer.Option(
            False, "--patient-level", help="Only patients and their compartments."
        ),
        group: str | None = typer.Option(None, "--group", help="Only the members of Group/ID."),
    ) -> None:
        """Export resources as NDJSON files plus manifest.json, as $export would."""
        from cityhealth.config import get_settings
        from cityhealth.db import Database
        from cityhealth.fhir.definitions import get_definitions

        if patient_level and group:
            _fail("--patient-level and --group exclude each other")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            _fail(f"{out} must be an empty directory or not exist yet")
        settings = get_settings()
        level = GROUP_LEVEL if group else PATIENT_LEVEL if patient_level else SYSTEM_LEVEL
        params = [("_type", types)] if types else []
        params += [("_since", since)] if since else []
        server = settings.fhir_base_url or f"http://{settings.host}:{settings.port}/fhir"
        path = f"/Group/{group}/$export" if group else "/Patient/$export" if patient_level else ""
        url = f"{server}{path or '/$export'}"
        db = Database(settings.database_url)
        try:
            engine = FhirEngine(db, get_definitions(), settings)
            wanted, _ = parse_export(engine.definitions, level, group, params, url)
            exporter = BulkExport(engine, ExportSettings.from_settings(settings))
            exporter.check(SYSTEM, wanted)
            output = exporter.write(wanted, out)
        except (FhirError, JobFailed) as error:
            _fail(str(error))
        except Exception as error:  # one clear line instead of a traceback
            _fail(f"export failed: {type(error).__name__}: {error}")
        finally:
            db.dispose()
        manifest = output.manifest(lambda name: (out / name).resolve().as_uri())
        (out / "manifest.json").write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
        for rtype, count, files in _per_type(output):
            typer.echo(f"{rtype}: {_count(count, 'resource')} in {_count(files, 'file')}")
        typer.echo(f"manifest: {out / 'manifest.json'}")


def _per_type(output: ExportOutput) -> list[tuple[str, int, int]]:
    totals: dict[str, tuple[int, int]] = {}
    for f in output.files:
        count, files = totals.get(f.type, (0, 0))
        totals[f.type] = (count + f.count, files + 1)
    return [(rtype, count, files) for rtype, (count, files) in totals.items()]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)
