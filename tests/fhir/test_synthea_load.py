"""The Synthea R4 set (../shared/data/synthea-r4: 2 master batch bundles + 120 patient
transaction bundles) loads with exactly the counts its README documents, and every `urn:uuid:`
and conditional reference is resolved to a stored `Type/id`."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import func, select

from cityhealth.fhir.bulk_import import default_workers, run_import
from cityhealth.fhir.engine import FhirEngine
from cityhealth.fhir.schema import import_journal, resource

UNRESOLVED = re.compile(r'"reference":"(urn:uuid:|[A-Z][A-Za-z]+\?)')


def counts(engine: FhirEngine) -> Counter[str]:
    query = (
        select(resource.c.type, func.count())
        .where(resource.c.deleted.is_(False))
        .group_by(resource.c.type)
    )
    with engine.db.read() as conn:
        return Counter({rtype: n for rtype, n in conn.execute(query)})


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
