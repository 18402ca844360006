"""The Synthea R4 set (../shared/data/synthea-r4: 2 master batch bundles + 120 patient
transaction bundles) loads with exactly the counts its README documents, and every `urn:uuid:`
and conditional reference is resolved to a stored `Type/id`."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from helpers import counts
from sqlalchemy import select

from cityhealth.config import Settings
from cityhealth.db import Database
from cityhealth.fhir.bulk_export import BulkExport, ExportRequest, ExportSettings
from cityhealth.fhir.bulk_import import default_workers, run_import
from cityhealth.fhir.engine import FhirEngine
from cityhealth.fhir.schema import import_journal, resource
from cityhealth.migrate import upgrade
from conftest import make_database_url

UNRESOLVED = re.compile(r'"reference":"(urn:uuid:|[A-Z][A-Za-z]+\?)')


@pytest.mark.slow
def test_synthea_loads_with_the_documented_counts(engine: FhirEngine, shared: Path) -> None:
    folder = shared / "data" / "synthea-r4"
    expected = json.loads((folder / "EXPECTED_COUNTS.json").read_text())
    masters = [folder / name for name in expected["master_bundles"]]
    before = counts(engine)
    started = time.perf_counter()

    report = run_import(engine, [*masters, folder], workers=default_workers(engine.db))

    seconds = time.perf_counter() - started
    print(
        f"Synthea on {engine.db.dialect}: {report.resources} resources in {seconds:.1f} s, "
        f"{report.resources / seconds:,.0f} resources/s, {report.workers} worker(s)"
    )
    assert report.failures == []
    by_type = expected["resources_after_correct_load_by_type"]
    assert dict(counts(engine) - before) == by_type
    assert report.resources == expected["total_resources_after_correct_load"] == 92114
    assert [Path(f.path).name for f in report.files[:2]] == expected["master_bundles"]
    bundles = [f for f in report.files if f.bundles]
    assert len(bundles) == expected["total_bundles"]
    with engine.db.read() as conn:
        journaled = set(conn.scalars(select(import_journal.c.checksum)))
        unresolved = [
            (rtype, rid, match.group(0))
            for rtype, rid, body in conn.execute(
                select(resource.c.type, resource.c.id, resource.c.body)
                .where(resource.c.deleted.is_(False))
                .execution_options(yield_per=2000)
            )
            if (match := UNRESOLVED.search(body))
        ]
    assert {f["sha256_uncompressed"] for f in expected["files"].values()} <= journaled
    assert unresolved == []


@pytest.mark.slow
def test_export_of_everything_reimports_with_the_same_counts(
    engine: FhirEngine, backend: str, tmp_path: Path
) -> None:
    """Runs after the load above (same module database): $export → import into an empty one."""
    original = counts(engine)
    assert sum(original.values()) >= 92114
    exporter = BulkExport(engine, ExportSettings(directory=tmp_path / "jobs"))
    output = exporter.write(ExportRequest(level="system"), tmp_path / "export")
    files = sorted((tmp_path / "export").glob("*.ndjson"))
    assert {f.name.split(".")[0] for f in files} == set(original)

    for url in make_database_url(backend, tmp_path / "empty"):
        upgrade(url)
        db = Database(url, pool_size=2)
        try:
            copy = FhirEngine(db, engine.definitions, Settings(database_url=url))
            report = run_import(copy, files, workers=default_workers(db))
            assert report.failures == []
            assert counts(copy) == original
            with engine.db.read() as a, copy.db.read() as b:
                sample = select(resource.c.type, resource.c.id, resource.c.body).limit(200)
                for rtype, rid, body in a.execute(sample.order_by(resource.c.rid)):
                    again = b.execute(
                        select(resource.c.body).where(
                            resource.c.type == rtype, resource.c.id == rid
                        )
                    ).scalar_one()
                    assert _content(again) == _content(body)
        finally:
            db.dispose()
    assert output is not None


def _content(body: str) -> dict[str, object]:
    """A resource apart from the version and time the server stamped on it."""
    resource_json = json.loads(body)
    meta = {
        k: v
        for k, v in resource_json.pop("meta", {}).items()
        if k not in ("versionId", "lastUpdated")
    }
    return {**resource_json, **({"meta": meta} if meta else {})}
