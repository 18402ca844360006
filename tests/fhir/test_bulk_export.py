"""Bulk Data export (hl7.org/fhir/uv/bulkdata/STU2/export.html) on both databases: kick-off,
polling, manifest and NDJSON files at system, Patient and Group level; `_type`, `_since` and
`_outputFormat`; cancellation, restarts, expiry, owners; the job runner underneath; the
`cityhealth export` command; and a round trip of everything into an empty database.

The database is shared by the tests of the module, so expectations of a system-level export
are read from the database itself; Patient- and Group-level tests use data of their own.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
import typer
from fastapi import FastAPI, Request, Response
from fastapi.testclient import TestClient
from helpers import assert_outcome, unique
from httpx import Response as HttpxResponse
from sqlalchemy import select, update
from test_round_trip import INVALID, without_server_meta
from typer.testing import CliRunner

from cityhealth.config import Settings, get_settings
from cityhealth.db import Database
from cityhealth.fhir.access import SYSTEM, AccessContext
from cityhealth.fhir.bulk_export import BulkExport, ExportRequest, ExportSettings
from cityhealth.fhir.clock import instant, now_us
from cityhealth.fhir.definitions import Definitions
from cityhealth.fhir.engine import FhirEngine
from cityhealth.fhir.errors import FhirError
from cityhealth.fhir.export_api import build_export_router, register
from cityhealth.fhir.http import outcome_response
from cityhealth.fhir.rest import build_router
from cityhealth.fhir.schema import job, resource
from cityhealth.jobs import (
    ACCEPTED,
    CANCELLED,
    COMPLETED,
    FAILED,
    RUNNING,
    JobContext,
    JobFailed,
    JobRunner,
)
from cityhealth.migrate import upgrade
from conftest import make_database_url

ASYNC = {"Prefer": "respond-async", "Accept": "application/fhir+json"}
NDJSON = "application/fhir+ndjson"


@dataclass
class Env:
    client: TestClient
    runner: JobRunner
    export: BulkExport
    engine: FhirEngine
    directory: Path


@pytest.fixture(scope="module")
def env(
    engine: FhirEngine, database: Database, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Env]:
    directory = tmp_path_factory.mktemp("exports")
    export = BulkExport(engine, ExportSettings(directory))
    runner = JobRunner(database, [export], poll_seconds=0.05)
    # Wired as the application does: the export routes before the main /fhir router.
    app = FastAPI()
    app.include_router(build_export_router(engine, runner, export))
    app.include_router(build_router(engine))

    @app.exception_handler(FhirError)
    async def fhir_error(_request: Request, error: FhirError) -> Response:
        return outcome_response(error)

    @app.middleware("http")
    async def caller(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        # Two platform clients, to tell whose export is whose.
        who = request.headers.get("x-test-who")
        request.state.access = (
            AccessContext(who=who, role="system", scopes=SYSTEM.scopes) if who else SYSTEM
        )
        return await call_next(request)

    with TestClient(app, raise_server_exceptions=False) as client:
        yield Env(client, runner, export, engine, directory)


# -- helpers -----------------------------------------------------------------------------------


def create(engine: FhirEngine, body: dict[str, Any]) -> dict[str, Any]:
    stored = engine.repository.create(SYSTEM, body).stored
    assert stored.body is not None
    created: dict[str, Any] = orjson.loads(stored.body)
    return created


def patient_with_data(engine: FhirEngine, observations: int = 2) -> list[dict[str, Any]]:
    """A patient and observations about them: all in their compartment."""
    patient = create(engine, {"resourceType": "Patient", "name": [{"family": unique("Fam")}]})
    return [patient] + [
        create(engine, observation(f"Patient/{patient['id']}")) for _ in range(observations)
    ]


def observation(subject: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "urn:cityhealth:test:codes", "code": unique("c")}]},
        "subject": {"reference": subject},
    }


def path(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


def kick_off(
    env: Env, url: str, who: str | None = None, params: dict[str, str] | None = None
) -> str:
    """Start an export; the status URL's path."""
    headers = {**ASYNC, **({"X-Test-Who": who} if who else {})}
    response = env.client.get(url, params=params, headers=headers)
    assert response.status_code == 202, response.text
    location = response.headers["content-location"]
    assert location.startswith("http://testserver/fhir/_export-status/")
    assert response.json()["resourceType"] == "OperationOutcome"
    return path(location)


def poll(env: Env, status: str, who: str | None = None) -> HttpxResponse:
    return env.client.get(status, headers={"X-Test-Who": who} if who else {})


def finished(env: Env, status: str, who: str | None = None) -> dict[str, Any]:
    """Run the queued jobs, then the manifest."""
    env.runner.run_pending()
    response = poll(env, status, who)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert "expires" in response.headers
    manifest: dict[str, Any] = response.json()
    return manifest


def export(
    env: Env, url: str, who: str | None = None, params: dict[str, str] | None = None
) -> dict[str, Any]:
    return finished(env, kick_off(env, url, who, params), who)


def download(
    env: Env, manifest: dict[str, Any], who: str | None = None
) -> dict[str, list[dict[str, Any]]]:
    """The resources of every output file, by type; checks each file's count."""
    found: dict[str, list[dict[str, Any]]] = {}
    for item in manifest["output"]:
        response = env.client.get(path(item["url"]), headers={"X-Test-Who": who} if who else {})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith(NDJSON)
        lines = [orjson.loads(line) for line in response.content.splitlines()]
        assert len(lines) == item["count"]
        assert all(r["resourceType"] == item["type"] for r in lines)
        found.setdefault(item["type"], []).extend(lines)
    return found


def stored(engine: FhirEngine) -> dict[str, list[dict[str, Any]]]:
    """Every current resource in the database, by type."""
    with engine.db.read() as conn:
        rows = conn.execute(
            select(resource.c.type, resource.c.body).where(resource.c.deleted.is_(False))
        ).all()
    found: dict[str, list[dict[str, Any]]] = {}
    for rtype, body in rows:
        found.setdefault(rtype, []).append(orjson.loads(body))
    return found


def by_id(resources: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    keyed = {r["id"]: r for r in resources}
    assert len(keyed) == len(resources), "a resource was exported twice"
    return keyed


def ids(found: dict[str, list[dict[str, Any]]]) -> set[str]:
    return {f"{rtype}/{r['id']}" for rtype, items in found.items() for r in items}


def set_job(env: Env, job_id: str, **values: Any) -> None:
    with env.engine.db.write() as conn:
        conn.execute(update(job).where(job.c.id == job_id).values(**values))


def job_id_of(status: str) -> str:
    return status.rsplit("/", 1)[1]


def drain(env: Env) -> None:
    """Run what earlier tests left queued, so that counts of claimed jobs are this test's."""
    env.runner.run_pending()


# -- system level ------------------------------------------------------------------------------


def test_system_export_writes_every_stored_resource_once(env: Env) -> None:
    patient_with_data(env.engine)
    create(env.engine, {"resourceType": "Organization", "name": unique("Org")})
    gone = create(env.engine, {"resourceType": "Organization", "name": unique("Gone")})
    env.engine.repository.delete(SYSTEM, "Organization", gone["id"])
    started = now_us()

    status = kick_off(env, "/fhir/$export")
    waiting = poll(env, status)
    assert waiting.status_code == 202
    assert waiting.headers["x-progress"] == "queued"
    assert int(waiting.headers["retry-after"]) >= 1

    manifest = finished(env, status)
    assert manifest["request"] == "http://testserver/fhir/$export"
    assert manifest["requiresAccessToken"] is True
    assert manifest["error"] == []
    assert manifest["transactionTime"] > instant(started)
    expected = stored(env.engine)
    assert [o["type"] for o in manifest["output"]] == sorted(expected)
    assert {o["type"]: o["count"] for o in manifest["output"]} == {
        t: len(items) for t, items in expected.items()
    }
    exported = download(env, manifest)
    for rtype, items in expected.items():
        assert by_id(exported[rtype]) == by_id(items)
    assert gone["id"] not in {o["id"] for o in exported["Organization"]}


def test_a_huge_type_is_split_into_parts(env: Env, tmp_path: Path) -> None:
    for _ in range(5):
        patient_with_data(env.engine, observations=0)
    splitting = BulkExport(env.engine, ExportSettings(tmp_path, max_resources_per_file=2))
    output = splitting.write(ExportRequest("system", ("Patient",)), tmp_path / "out")
    patients = len(stored(env.engine)["Patient"])
    names = [f.name for f in output.files]
    assert names[:3] == ["Patient.ndjson", "Patient.2.ndjson", "Patient.3.ndjson"]
    assert all(f.count == 2 for f in output.files[:-1])
    assert sum(f.count for f in output.files) == patients
    lines = [
        orjson.loads(line)
        for name in names
        for line in (tmp_path / "out" / name).read_bytes().splitlines()
    ]
    assert len({p["id"] for p in lines}) == patients


def test_type_and_since_select_what_is_exported(env: Env) -> None:
    patient_with_data(env.engine)
    mark = now_us()
    later = patient_with_data(env.engine, observations=3)
    manifest = export(
        env,
        "/fhir/$export",
        params={
            "_type": "Observation,Organization",
            "_since": instant(mark),
            "_outputFormat": NDJSON,
        },
    )
    assert "_since=" in manifest["request"]
    exported = download(env, manifest)
    assert set(exported) == {"Observation"}
    assert by_id(exported["Observation"]) == {o["id"]: o for o in later[1:]}

    everything = download(env, export(env, "/fhir/$export", params={"_type": "Observation"}))
    assert set(everything) == {"Observation"}
    assert len(everything["Observation"]) == len(stored(env.engine)["Observation"])


@pytest.mark.parametrize("output_format", ["application/ndjson", "ndjson"])
def test_output_format_aliases_are_accepted(env: Env, output_format: str) -> None:
    kick_off(env, "/fhir/$export", params={"_outputFormat": output_format})


# -- Patient and Group level -------------------------------------------------------------------


def test_patient_export_holds_only_patients_and_their_compartments(env: Env) -> None:
    mine = patient_with_data(env.engine)
    organization = create(env.engine, {"resourceType": "Organization", "name": unique("Org")})
    group = create(env.engine, {"resourceType": "Group", "type": "person", "actual": True})
    about_group = create(env.engine, observation(f"Group/{group['id']}"))

    exported = download(env, export(env, "/fhir/Patient/$export"))
    found = ids(exported)
    assert {f"{r['resourceType']}/{r['id']}" for r in mine} <= found
    assert f"Organization/{organization['id']}" not in found
    assert f"Group/{group['id']}" not in found
    assert f"Observation/{about_group['id']}" not in found
    for rtype, items in exported.items():
        for item in items:
            assert rtype == "Patient" or '"Patient/' in orjson.dumps(item).decode()
    assert len(exported["Patient"]) == len(stored(env.engine)["Patient"])


def test_group_export_holds_only_its_active_members_data(env: Env) -> None:
    first, second, former, _outsider = (patient_with_data(env.engine) for _ in range(4))
    group = create(
        env.engine,
        {
            "resourceType": "Group",
            "type": "person",
            "actual": True,
            "member": [
                {"entity": {"reference": f"Patient/{first[0]['id']}"}},
                {"entity": {"reference": f"Patient/{second[0]['id']}"}},
                {"entity": {"reference": f"Patient/{former[0]['id']}"}, "inactive": True},
            ],
        },
    )
    exported = download(env, export(env, f"/fhir/Group/{group['id']}/$export"))
    # The Group is in its members' compartments (Patient compartment: Group.member).
    members_data = {f"{r['resourceType']}/{r['id']}" for r in first + second}
    assert ids(exported) == {*members_data, f"Group/{group['id']}"}

    only = download(
        env, export(env, f"/fhir/Group/{group['id']}/$export", params={"_type": "Patient"})
    )
    assert ids(only) == {f"Patient/{first[0]['id']}", f"Patient/{second[0]['id']}"}


def test_group_export_of_an_unknown_group_is_404(env: Env) -> None:
    response = env.client.get(f"/fhir/Group/{unique('none')}/$export", headers=ASYNC)
    assert_outcome(response, 404)


def test_a_group_deleted_before_the_job_runs_fails_the_job_with_500(env: Env) -> None:
    group = create(env.engine, {"resourceType": "Group", "type": "person", "actual": True})
    status = kick_off(env, f"/fhir/Group/{group['id']}/$export")
    env.engine.repository.delete(SYSTEM, "Group", group["id"])
    env.runner.run_pending()
    outcome = assert_outcome(poll(env, status), 500)
    assert f"Group/{group['id']}" in outcome["issue"][0]["diagnostics"]
    assert not (env.directory / job_id_of(status)).exists()


def test_post_kick_off_takes_a_parameters_resource(env: Env) -> None:
    mine = patient_with_data(env.engine, observations=1)
    body = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "_type", "valueString": "Patient"},
            {"name": "_since", "valueInstant": instant(now_us() - 1_000_000)},
            {"name": "_outputFormat", "valueString": NDJSON},
        ],
    }
    response = env.client.post("/fhir/Patient/$export", json=body, headers=ASYNC)
    assert response.status_code == 202, response.text
    manifest = finished(env, path(response.headers["content-location"]))
    assert manifest["request"] == "http://testserver/fhir/Patient/$export"
    exported = download(env, manifest)
    assert set(exported) == {"Patient"}
    assert mine[0]["id"] in by_id(exported["Patient"])


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "expression"),
    [
        ({"_outputFormat": "application/fhir+json"}, "_outputFormat"),
        ({"_outputFormat": "text/csv"}, "_outputFormat"),
        ({"_type": "Patient,NotAType"}, "_type"),
        ({"_since": "2024-01-01"}, "_since"),
        ({"_since": "yesterday"}, "_since"),
        ({"_typeFilter": "Patient?active=true"}, "_typeFilter"),
        ({"_elements": "id"}, "_elements"),
        ({"includeAssociatedData": "LatestProvenanceResources"}, "includeAssociatedData"),
        ({"patient": "Patient/1"}, "patient"),
    ],
)
def test_bad_kick_off_parameters_are_400_outcomes(
    env: Env, params: dict[str, str], expression: str
) -> None:
    response = env.client.get("/fhir/$export", params=params, headers=ASYNC)
    assert_outcome(response, 400, expression)


def test_lenient_handling_ignores_unsupported_parameters_with_a_warning(env: Env) -> None:
    response = env.client.get(
        "/fhir/$export",
        params={"_typeFilter": "Patient?active=true"},
        headers={**ASYNC, "Prefer": "respond-async, handling=lenient"},
    )
    assert response.status_code == 202, response.text
    warnings = [i for i in response.json()["issue"] if i["severity"] == "warning"]
    assert "_typeFilter" in warnings[0]["diagnostics"]


def test_kick_off_needs_prefer_respond_async_and_json(env: Env) -> None:
    assert_outcome(env.client.get("/fhir/$export"), 400)
    assert_outcome(
        env.client.get("/fhir/Patient/$export", headers={"Prefer": "return=minimal"}), 400
    )
    refused = env.client.get("/fhir/$export", headers={**ASYNC, "Accept": "application/xml"})
    assert_outcome(refused, 406)
    assert env.client.get("/fhir/$export", headers={"Prefer": "respond-async"}).status_code == 202


def test_unknown_status_and_file_are_404(env: Env) -> None:
    assert_outcome(env.client.get(f"/fhir/_export-status/{unique('job')}"), 404)
    assert_outcome(env.client.delete(f"/fhir/_export-status/{unique('job')}"), 404)
    manifest = export(env, "/fhir/$export", params={"_type": "Patient"})
    job_id = path(manifest["output"][0]["url"]).split("/")[3]
    for name in ("missing.ndjson", "Patient.2.ndjson", "manifest.json"):
        assert_outcome(env.client.get(f"/fhir/_export-file/{job_id}/{name}"), 404)


# -- owners, cancellation, restarts, expiry -----------------------------------------------------


def test_only_the_owner_may_poll_cancel_or_download(env: Env) -> None:
    owner, other = "Practitioner/owner", "Practitioner/other"
    status = kick_off(env, "/fhir/$export", who=owner, params={"_type": "Patient"})
    assert_outcome(poll(env, status, other), 404)
    assert_outcome(poll(env, status), 404)  # the platform itself is someone else too
    manifest = finished(env, status, owner)
    file_url = path(manifest["output"][0]["url"])
    assert_outcome(env.client.get(file_url, headers={"X-Test-Who": other}), 404)
    assert_outcome(env.client.delete(status, headers={"X-Test-Who": other}), 404)
    assert env.client.get(file_url, headers={"X-Test-Who": owner}).status_code == 200


def test_delete_cancels_a_queued_export(env: Env) -> None:
    status = kick_off(env, "/fhir/$export")
    response = env.client.delete(status)
    assert response.status_code == 202, response.text
    assert_outcome(poll(env, status), 404)
    assert_outcome(env.client.delete(status), 404)
    env.runner.run_pending()
    found = env.runner.get(job_id_of(status))
    assert found is not None and found.status == CANCELLED
    assert not (env.directory / job_id_of(status)).exists()


def test_delete_after_completion_removes_the_files(env: Env) -> None:
    status = kick_off(env, "/fhir/$export", params={"_type": "Patient"})
    manifest = finished(env, status)
    directory = env.directory / job_id_of(status)
    assert sorted(p.name for p in directory.iterdir()) == ["Patient.ndjson"]
    assert env.client.delete(status).status_code == 202
    assert not directory.exists()
    assert_outcome(env.client.get(path(manifest["output"][0]["url"])), 404)


def test_a_queued_job_survives_a_restart(env: Env, settings: Settings) -> None:
    drain(env)
    status = kick_off(env, "/fhir/$export", params={"_type": "Patient"})
    restarted = Database(settings.database_url, pool_size=2)
    try:
        engine = FhirEngine(restarted, env.engine.definitions, settings)
        runner = JobRunner(restarted, [BulkExport(engine, ExportSettings(env.directory))])
        assert runner.run_pending() == 1
    finally:
        restarted.dispose()
    manifest = poll(env, status).json()
    assert manifest["output"][0]["count"] == len(stored(env.engine)["Patient"])


def test_a_job_left_running_by_a_dead_process_is_run_again_from_the_start(env: Env) -> None:
    drain(env)
    status = kick_off(env, "/fhir/$export", params={"_type": "Patient"})
    job_id = job_id_of(status)
    directory = env.directory / job_id
    directory.mkdir()
    (directory / "Patient.ndjson").write_text("half a line from the dead process")
    (directory / "Stale.ndjson").write_text("{}\n")
    set_job(env, job_id, status=RUNNING, updated_at=now_us())
    assert env.runner.run_pending() == 0  # its heartbeat is fresh: someone is running it
    assert poll(env, status).status_code == 202

    set_job(env, job_id, updated_at=now_us() - 3_600_000_000)
    assert env.runner.run_pending() == 1
    manifest = poll(env, status).json()
    assert sorted(p.name for p in directory.iterdir()) == ["Patient.ndjson"]
    exported = download(env, manifest)
    assert by_id(exported["Patient"]) == by_id(stored(env.engine)["Patient"])


def test_expired_jobs_and_their_files_are_removed(env: Env) -> None:
    status = kick_off(env, "/fhir/$export", params={"_type": "Patient"})
    finished(env, status)
    directory = env.directory / job_id_of(status)
    assert directory.exists()
    set_job(env, job_id_of(status), expires_at=now_us() - 1)
    assert_outcome(poll(env, status), 404)  # expired, even before the sweep
    assert env.runner.expire() >= 1
    assert env.runner.get(job_id_of(status)) is None
    assert not directory.exists()


def test_finished_jobs_expire_after_the_retention(env: Env) -> None:
    status = kick_off(env, "/fhir/$export", params={"_type": "Patient"})
    finished(env, status)
    found = env.runner.get(job_id_of(status))
    assert found is not None and found.expires_at is not None
    retention = found.expires_at - found.updated_at
    assert abs(retention - 24 * 3_600_000_000) < 60_000_000


def test_the_background_runner_completes_a_job_on_its_own(env: Env) -> None:
    status = kick_off(env, "/fhir/$export", params={"_type": "Patient"})
    env.runner.start()
    try:
        deadline = time.monotonic() + 30
        while (response := poll(env, status)).status_code == 202:
            assert time.monotonic() < deadline, "the background runner did not finish"
            time.sleep(0.05)
    finally:
        env.runner.stop()
    assert response.status_code == 200, response.text


def test_skip_locked_leaves_a_job_claimed_elsewhere_alone(env: Env) -> None:
    if not env.engine.db.is_postgres:
        pytest.skip("SQLite claims under its single write lock")
    drain(env)
    status = kick_off(env, "/fhir/$export", params={"_type": "Patient"})
    with env.engine.db.write() as conn:
        conn.execute(select(job.c.id).where(job.c.id == job_id_of(status)).with_for_update())
        assert env.runner.run_pending() == 0
    assert env.runner.run_pending() == 1


# -- the runner with jobs of its own kind ----------------------------------------------------------


class Scripted:
    """A job kind whose run does what the test says, and remembers what was discarded."""

    kind = "scripted"

    def __init__(self, step: Callable[[JobContext], dict[str, Any]]) -> None:
        self.step = step
        self.discarded: list[str] = []

    def run(self, context: JobContext) -> dict[str, Any]:
        return self.step(context)

    def discard(self, job_id: str) -> None:
        self.discarded.append(job_id)

    def retention_us(self) -> int:
        return 60_000_000


def test_a_running_job_stops_when_cancelled(database: Database) -> None:
    def step(context: JobContext) -> dict[str, Any]:
        context.progress("half way", force=True)
        runner.cancel(context.id)
        context.progress("three quarters", force=True)
        return {"done": True}

    kind = Scripted(step)
    runner = JobRunner(database, [kind])
    job_id = runner.submit("scripted", {}, "system")
    assert runner.run_pending() == 1
    found = runner.get(job_id)
    assert found is not None and found.status == CANCELLED and found.result is None
    assert kind.discarded.count(job_id) == 2  # by the cancel, then by the stopped run


def test_a_job_whose_output_vanished_by_a_cancel_is_cancelled_not_failed(
    database: Database,
) -> None:
    def step(context: JobContext) -> dict[str, Any]:
        runner.cancel(context.id)
        raise FileNotFoundError("its directory was removed by the cancel")

    runner = JobRunner(database, [Scripted(step)])
    job_id = runner.submit("scripted", {}, None)
    assert runner.run_pending() == 1
    found = runner.get(job_id)
    assert found is not None and found.status == CANCELLED and found.error is None


def test_a_failing_job_records_its_error_and_leaves_nothing(database: Database) -> None:
    def step(context: JobContext) -> dict[str, Any]:
        if context.request["how"] == "expected":
            raise JobFailed("the input is not there")
        raise RuntimeError("a bug")

    kind = Scripted(step)
    runner = JobRunner(database, [kind])
    expected = runner.submit("scripted", {"how": "expected"}, None)
    bug = runner.submit("scripted", {"how": "bug"}, None)
    assert runner.run_pending() == 2
    first, second = runner.get(expected), runner.get(bug)
    assert first is not None and first.status == FAILED
    assert first.error == "the input is not there"
    assert second is not None and second.status == FAILED
    assert second.error is not None and "a bug" not in second.error
    assert kind.discarded == [expected, bug]


def test_a_job_interrupted_by_shutdown_goes_back_to_the_queue(database: Database) -> None:
    def step(context: JobContext) -> dict[str, Any]:
        runner._stop.set()  # as stop() does while the job runs on the thread
        context.progress("interrupted")
        return {}

    kind = Scripted(step)
    runner = JobRunner(database, [kind])
    job_id = runner.submit("scripted", {}, None)
    runner.run_pending()
    found = runner.get(job_id)
    assert found is not None and found.status == ACCEPTED

    done = JobRunner(database, [Scripted(lambda context: {"ok": 1})])
    assert done.run_pending() == 1
    found = done.get(job_id)
    assert found is not None and found.status == COMPLETED and found.result == {"ok": 1}


# -- the command line --------------------------------------------------------------------------


@pytest.fixture
def cli(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[typer.Typer]:
    monkeypatch.setenv("CITYHEALTH_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("CITYHEALTH_VAR_DIR", str(tmp_path / "var"))
    get_settings.cache_clear()
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """A command line holding only `export`."""

    register(app)
    yield app
    get_settings.cache_clear()


def test_cli_export_writes_files_and_a_manifest(env: Env, cli: typer.Typer, tmp_path: Path) -> None:
    group = create(
        env.engine,
        {
            "resourceType": "Group",
            "type": "person",
            "actual": True,
            "member": [
                {"entity": {"reference": f"Patient/{patient_with_data(env.engine)[0]['id']}"}}
            ],
        },
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["export", "--out", str(out), "--type", "Patient,Observation"])
    assert result.exit_code == 0, result.output
    expected = stored(env.engine)
    for rtype in ("Patient", "Observation"):
        count = len(expected[rtype])
        resources = f"{count} resource" if count == 1 else f"{count} resources"
        assert f"{rtype}: {resources} in 1 file" in result.output
    manifest = orjson.loads((out / "manifest.json").read_bytes())
    assert manifest["requiresAccessToken"] is True
    for item in manifest["output"]:
        file = Path(urlsplit(item["url"]).path)
        lines = [orjson.loads(line) for line in file.read_bytes().splitlines()]
        assert by_id(lines) == by_id(expected[item["type"]])

    grouped = tmp_path / "group"
    result = CliRunner().invoke(cli, ["export", "--out", str(grouped), "--group", group["id"]])
    assert result.exit_code == 0, result.output
    assert "Patient: 1 resource in 1 file" in result.output
    assert "Observation: 2 resources in 1 file" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--group", "no-such-group"], "Group/no-such-group"),
        (["--type", "Nope"], "_type 'Nope'"),
        (["--since", "last week"], "_since"),
        (["--patient-level", "--group", "g"], "exclude each other"),
    ],
)
def test_cli_export_errors_are_one_line(
    cli: typer.Typer, tmp_path: Path, args: list[str], message: str
) -> None:
    result = CliRunner().invoke(cli, ["export", "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output


# -- round trip --------------------------------------------------------------------------------


def test_everything_exported_imports_into_an_empty_database_unchanged(
    env: Env, backend: str, tmp_path: Path, definitions: Definitions, shared: Path
) -> None:
    for example in sorted((shared / "data" / "fhir-r4-examples").glob("*.json"))[::8]:
        body = orjson.loads(example.read_bytes())
        if "id" in body and example.name not in INVALID:
            env.engine.update(SYSTEM, body["resourceType"], body["id"], body)
    exported = download(env, export(env, "/fhir/$export"))
    assert len(exported) > 20

    urls = make_database_url(backend, tmp_path)
    url = next(urls)
    try:
        upgrade(url)
        second = Database(url, pool_size=2)
        try:
            target = FhirEngine(second, definitions, env.engine.settings)
            for rtype, items in exported.items():
                for item in items:
                    target.repository.update(SYSTEM, rtype, item["id"], dict(item))
            imported = stored(target)
        finally:
            second.dispose()
    finally:
        urls.close()
    assert {t: len(v) for t, v in imported.items()} == {t: len(v) for t, v in exported.items()}
    for rtype, items in exported.items():
        assert {k: without_server_meta(v) for k, v in by_id(imported[rtype]).items()} == {
            k: without_server_meta(v) for k, v in by_id(items).items()
        }
