"""`cityhealth import`: Bundle and NDJSON files into the store, all-or-nothing per transaction
Bundle, resumable through the import journal, with per-file counts and failures.

The database is shared by the tests of this module (on each backend), so every test measures
what it adds (counts before and after) and makes its content unique.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
import typer
from helpers import bundle, counts, observation, patient, post, unique
from typer.testing import CliRunner

from cityhealth.config import get_settings
from cityhealth.fhir.access import SYSTEM
from cityhealth.fhir.bulk_import import register as register_import
from cityhealth.fhir.bulk_import import run_import
from cityhealth.fhir.engine import FhirEngine


def added(engine: FhirEngine, before: Counter[str]) -> dict[str, int]:
    return {k: v for k, v in (counts(engine) - before).items() if v}


def named(family: str, **fields: Any) -> dict[str, Any]:
    return patient(name=[{"family": family}], **fields)


def write(path: Path, content: Any) -> Path:
    data = orjson.dumps(content)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def write_lines(path: Path, lines: list[Any]) -> Path:
    text = b"".join(
        (line if isinstance(line, bytes) else orjson.dumps(line)) + b"\n" for line in lines
    )
    path.write_bytes(gzip.compress(text) if path.name.endswith(".gz") else text)
    return path


def ids_of_family(engine: FhirEngine, family: str) -> list[str]:
    with engine.db.read() as conn:
        return [hit.id for hit in engine.find(SYSTEM, conn, "Patient", f"family={family}")]


def test_a_failed_transaction_stores_nothing_and_the_next_file_still_imports(
    engine: FhirEngine, tmp_path: Path
) -> None:
    broken_family, good_family = unique("fam"), unique("fam")
    subject = f"urn:uuid:{unique()}"
    broken = write(
        tmp_path / "a.json",
        bundle(
            "transaction",
            post(named(broken_family)),
            post(named(broken_family, birthDate="not a date")),
            post(observation(unique("code"))),
        ),
    )
    good = write(
        tmp_path / "b.json",
        bundle(
            "transaction",
            post(named(good_family), subject),
            post(observation(unique("code"), subject={"reference": subject})),
        ),
    )
    before = counts(engine)

    report = run_import(engine, [broken, good])

    assert added(engine, before) == {"Patient": 1, "Observation": 1}
    assert ids_of_family(engine, broken_family) == []
    assert len(ids_of_family(engine, good_family)) == 1
    first, second = report.files
    assert (first.path, first.bundles, first.resources) == (str(broken), 0, 0)
    [failure] = first.failures
    assert (failure["where"], failure["status"]) == (f"{broken} Bundle.entry[1]", 400)
    assert "not a date" in failure["diagnostics"]
    assert (second.bundles, second.resources, second.failures) == (1, 2, [])
    assert report.resources == 2 and report.failures == [failure]

    # A failed bundle is not journaled: the next run tries it again, the good one is skipped.
    again = run_import(engine, [broken, good])
    assert [f.skipped for f in again.files] == [0, 1]
    assert len(again.failures) == 1 and again.resources == 0
    assert added(engine, before) == {"Patient": 1, "Observation": 1}


class Killed(Exception):
    pass


def test_a_killed_import_resumes_without_duplicates_and_force_imports_again(
    engine: FhirEngine, tmp_path: Path
) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    run = unique("run")
    write_lines(folder / "a.ndjson", [observation(f"{run}-{n}") for n in range(1100)])
    write(
        folder / "b.json",
        bundle("transaction", post(named(run)), post(observation(run)), post(observation(run))),
    )
    clean = {"Observation": 1102, "Patient": 1}
    before = counts(engine)

    def kill(resources: int) -> None:
        raise Killed

    with pytest.raises(Killed):
        run_import(engine, [folder], progress=kill)
    assert added(engine, before) == {"Observation": 500}

    resumed = run_import(engine, [folder])
    assert added(engine, before) == clean
    ndjson, bundled = resumed.files
    assert (ndjson.resources, ndjson.chunks, ndjson.skipped) == (600, 2, 1)
    assert ndjson.notes == ["lines 1-500 already imported"]
    assert (bundled.resources, bundled.bundles, bundled.skipped) == (3, 1, 0)

    repeated = run_import(engine, [folder])
    assert (repeated.resources, repeated.skipped) == (0, 4)
    assert [f.notes for f in repeated.files] == [
        ["lines 1-1100 already imported"],
        ["already imported"],
    ]
    assert added(engine, before) == clean

    forced = run_import(engine, [folder], force=True)
    assert (forced.resources, forced.skipped, forced.failures) == (1103, 0, [])
    assert added(engine, before) == {"Observation": 2204, "Patient": 2}


def test_ndjson_keeps_ids_and_reports_bad_lines_with_their_number(
    engine: FhirEngine, tmp_path: Path
) -> None:
    pid, oid, precise, family = unique("p"), unique("o"), unique("o"), unique("fam")
    source = write_lines(
        tmp_path / "export.ndjson.gz",
        [
            named(family, id=pid),
            observation(unique("code"), id=oid, subject={"reference": f"Patient/{pid}"}),
            observation(unique("code"), subject={"reference": f"Patient/{pid}"}),
            b'{"resourceType": "Patient", "name": [',
            named(family, id=unique("p"), birthDate="not a date"),
            b"",
            {"about": "not FHIR"},
            named(family, id="not/an id"),
            b'{"resourceType": "Observation", "id": "%s", "status": "final", "code": {"text": "x"},'
            b' "valueQuantity": {"value": 5.40}}' % precise.encode(),
        ],
    )
    before = counts(engine)

    report = run_import(engine, [source])

    assert added(engine, before) == {"Patient": 1, "Observation": 3}
    [file] = report.files
    assert (file.resources, file.chunks) == (4, 1)
    assert [(f["where"], f["status"]) for f in file.failures] == [
        (f"{source} line 4", 400),
        (f"{source} line 5", 400),
        (f"{source} line 7", 400),
        (f"{source} line 8", 400),
    ]
    assert "not a date" in file.failures[1]["diagnostics"]
    stored = engine.repository.read(SYSTEM, "Observation", oid)
    assert orjson.loads(stored.body or b"")["subject"] == {"reference": f"Patient/{pid}"}
    assert '"value":5.40' in (engine.repository.read(SYSTEM, "Observation", precise).body or "")
    with engine.db.read() as conn:
        assert len(engine.find(SYSTEM, conn, "Observation", f"subject=Patient/{pid}")) == 2

    # Re-imported on purpose: resources with ids become new versions, the others new resources.
    again = run_import(engine, [source], force=True)
    assert again.resources == 4
    assert added(engine, before) == {"Patient": 1, "Observation": 4}
    assert engine.repository.read(SYSTEM, "Patient", pid).version == 2


def test_a_directory_is_walked_in_name_order_after_the_files_named_before_it(
    engine: FhirEngine, tmp_path: Path
) -> None:
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    system, value, family = f"urn:cityhealth:test:{unique('sys')}", unique("v"), unique("fam")
    identifier = {"system": system, "value": value}
    master = write(
        folder / "2-organizations.json.gz",
        bundle(
            "batch",
            post(
                {"resourceType": "Organization", "identifier": [identifier]},
                ifNoneExist=f"identifier={system}|{value}",
            ),
            post({"resourceType": "Organization", "active": "yes"}),
        ),
    )
    reference = {"reference": f"Organization?identifier={system}|{value}"}
    write(
        folder / "sub" / "3-patients.json",
        bundle("transaction", post(named(family, managingOrganization=reference, gender="male"))),
    )
    write(
        folder / "1-patients.json",
        bundle("transaction", post(named(family, managingOrganization=reference))),
    )
    write(folder / "about.json", {"generated": "by hand"})
    (folder / "README.txt").write_text("not imported")
    before = counts(engine)

    report = run_import(engine, [master, folder])

    assert [Path(f.path).relative_to(folder).as_posix() for f in report.files] == [
        "2-organizations.json.gz",
        "1-patients.json",
        "about.json",
        "sub/3-patients.json",
    ]
    assert added(engine, before) == {"Organization": 1, "Patient": 2}
    organization, first, ignored, nested = report.files
    [failure] = organization.failures
    assert failure["where"] == f"{master} Bundle.entry[1]"
    assert (failure["status"], organization.resources, organization.bundles) == (400, 1, 1)
    assert (first.resources, nested.resources, first.failures, nested.failures) == (1, 1, [], [])
    assert (ignored.resources, ignored.failures) == (0, [])
    assert ignored.notes == ["not a FHIR resource: ignored"]
    with engine.db.read() as conn:
        [org] = engine.find(SYSTEM, conn, "Organization", f"identifier={system}|{value}")
        hits = engine.find(SYSTEM, conn, "Patient", f"organization=Organization/{org.id}")
    assert sorted(h.id for h in hits) == sorted(ids_of_family(engine, family))


def test_a_path_that_cannot_be_imported_is_a_failure(engine: FhirEngine, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    single = write(tmp_path / "patient.json", named(unique("fam")))
    plain = write(tmp_path / "plain.json", {"about": "not FHIR"})
    missing = tmp_path / "missing.ndjson"

    report = run_import(engine, [text, broken, single, plain, missing])

    assert [(f["where"], f["status"]) for f in report.failures] == [
        (str(text), 400),
        (str(broken), 400),
        (str(single), 400),
        (str(plain), 400),
        (str(missing), 400),
    ]
    assert "not a Bundle" in report.failures[2]["diagnostics"]
    assert report.resources == 0


def test_the_cli_prints_counts_writes_a_json_report_and_fails_on_failures(
    engine: FhirEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "CITYHEALTH_DATABASE_URL", engine.db.url.render_as_string(hide_password=False)
    )
    get_settings.cache_clear()
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """CityHealth."""

    register_import(app)
    run = unique("run")
    good = write_lines(tmp_path / "good.ndjson", [observation(f"{run}-{n}") for n in range(3)])
    bad = write(tmp_path / "bad.json", bundle("transaction", post(named(run, gender="robot"))))
    output = tmp_path / "report.json"
    before = counts(engine)
    runner = CliRunner()

    try:
        first = runner.invoke(
            app, ["import", str(good), str(bad), "--report", str(output), "--workers", "2"]
        )
        second = runner.invoke(app, ["import", str(good), "--quiet"])
    finally:
        get_settings.cache_clear()

    assert first.exit_code == 1, first.output
    assert "Traceback" not in first.output
    assert f"{good}: 3 resources, 1 chunk" in first.stdout
    assert f"failed: {bad}" in first.stderr and "robot" in first.stderr
    report = json.loads(output.read_text())
    assert report["resources"] == 3 and report["failures"] == 1
    assert [(f["path"], f["resources"], len(f["failures"])) for f in report["files"]] == [
        (str(good), 3, 0),
        (str(bad), 0, 1),
    ]
    assert report["files"][1]["failures"][0]["status"] == 400
    assert second.exit_code == 0, second.output
    assert "1 skipped as already imported" in second.stdout
    assert added(engine, before) == {"Observation": 3}
