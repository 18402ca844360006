"""One unit of `cityhealth import`: a Bundle file or an NDJSON chunk, stored in one database
transaction together with its journal row, or not at all.

A transaction Bundle is all or nothing. A batch Bundle and an NDJSON chunk keep what is valid
and report the rest (entry or line, status, diagnostics). NDJSON resources keep their ids
(update, creating on first sight) so that an export re-imports with its references intact.
"""

from __future__ import annotations

import gzip
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Connection, and_, select
from sqlalchemy.exc import SQLAlchemyError

from cityhealth.fhir import import_journal as journal
from cityhealth.fhir import jsonio
from cityhealth.fhir.access import SYSTEM
from cityhealth.fhir.bundles import BundleProcessor
from cityhealth.fhir.engine import FhirEngine
from cityhealth.fhir.errors import FhirError
from cityhealth.fhir.import_sources import Chunk, checksum, read_bytes
from cityhealth.fhir.repository import ID_PATTERN
from cityhealth.fhir.schema import resource as resource_table

#: Bundles may GET or search; their answers are discarded, so any base serves.
_IMPORT_BASE = "urn:cityhealth:import"
_ENTRY_PREFIX = re.compile(r"^(Bundle\.entry\[\d+\]): (.*)$", re.DOTALL)
_READ_ERRORS = (OSError, EOFError, zlib.error, gzip.BadGzipFile)


@dataclass(frozen=True)
class BundleTask:
    path: str
    walked: bool  # found in a directory: a JSON file that is not FHIR is passed over


@dataclass
class UnitResult:
    path: str
    resources: int = 0
    bundles: int = 0
    chunks: int = 0
    skipped: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped_lines: tuple[int, int] | None = None

    def already_imported(self, lines: tuple[int, int] | None = None) -> UnitResult:
        self.skipped = 1
        if lines is None:
            self.notes.append("already imported")
        self.skipped_lines = lines
        return self

    def fail(self, where: str, status: int, diagnostics: str) -> UnitResult:
        self.failures.append({"where": where, "status": status, "diagnostics": diagnostics})
        return self


def run_unit(engine: FhirEngine, task: BundleTask | Chunk, force: bool) -> UnitResult:
    """Import one unit; every problem becomes a reported failure, never an exception."""
    try:
        if isinstance(task, Chunk):
            return import_chunk(engine, task, force)
        return import_bundle(engine, task, force)
    except SQLAlchemyError as error:
        return UnitResult(task.path).fail(task.path, 500, f"database error: {one_line(error)}")
    except Exception as error:
        # One malformed file must not end an import of thousands; it is reported instead.
        return UnitResult(task.path).fail(
            task.path, 500, f"internal error: {type(error).__name__}: {one_line(error)}"
        )


# -- Bundle files -----------------------------------------------------------------------------
def import_bundle(engine: FhirEngine, task: BundleTask, force: bool) -> UnitResult:
    result = UnitResult(task.path)
    try:
        data = read_bytes(Path(task.path))
    except _READ_ERRORS as error:
        return result.fail(task.path, 400, f"cannot read the file: {error}")
    digest = checksum(data)
    if not force and _done(engine, digest):
        return result.already_imported()
    try:
        bundle = jsonio.loads(data)
    except orjson.JSONDecodeError as error:
        return result.fail(task.path, 400, f"not valid JSON: {error}")
    if not isinstance(bundle, dict) or "resourceType" not in bundle:
        if task.walked:
            result.notes.append("not a FHIR resource: ignored")
            return result
        return result.fail(task.path, 400, "not a FHIR resource (no resourceType)")
    if bundle["resourceType"] != "Bundle":
        return result.fail(task.path, 400, f"a {bundle['resourceType']}, not a Bundle")
    try:
        with engine.db.write() as conn:
            journal.claim(conn, digest, Path(task.path).name, force)
            response = BundleProcessor(engine).process(SYSTEM, bundle, _IMPORT_BASE, conn)
            result.resources = _entry_outcomes(response, task.path, result)
            journal.finish(conn, digest, result.resources)
    except journal.AlreadyImported:
        return result.already_imported()
    except FhirError as error:
        result.resources = 0
        result.failures.clear()
        where, diagnostics = task.path, error.diagnostics
        match = _ENTRY_PREFIX.match(diagnostics)
        if match:
            where, diagnostics = f"{task.path} {match.group(1)}", match.group(2)
        return result.fail(where, error.status, diagnostics)
    result.bundles = 1
    return result


def _entry_outcomes(response: dict[str, Any], path: str, result: UnitResult) -> int:
    """Entries stored (created, updated or matched by a conditional create); batch entries
    that failed are added to the result's failures."""
    stored = 0
    for index, entry in enumerate(response["entry"]):
        answer = entry.get("response", {})
        status = int(str(answer.get("status", "500")).split()[0])
        if status >= 400:
            issues = answer.get("outcome", {}).get("issue", [])
            diagnostics = "; ".join(i.get("diagnostics", i.get("code", "")) for i in issues)
            result.fail(f"{path} Bundle.entry[{index}]", status, diagnostics)
        elif "location" in answer:
            stored += 1
    return stored


# -- NDJSON chunks ----------------------------------------------------------------------------
#: (line number, status, diagnostics) of a line that was not stored.
_Problem = tuple[int, int, str]


@dataclass
class _Line:
    number: int
    rtype: str
    resource: dict[str, Any]
    rid: str | None


def import_chunk(engine: FhirEngine, chunk: Chunk, force: bool) -> UnitResult:
    result = UnitResult(chunk.path)
    digest = chunk.checksum()
    if not force and _done(engine, digest):
        return result.already_imported((chunk.first_line, chunk.last_line))
    problems: list[_Problem] = []
    lines = _parse(chunk, problems)
    try:
        with engine.db.write() as conn:
            journal.claim(conn, digest, chunk.source, force)
            result.resources = _store(engine, conn, lines, problems)
            journal.finish(conn, digest, result.resources)
    except journal.AlreadyImported:
        return result.already_imported((chunk.first_line, chunk.last_line))
    for number, status, diagnostics in sorted(problems):
        result.fail(f"{chunk.path} line {number}", status, diagnostics)
    result.chunks = 1
    return result


def _parse(chunk: Chunk, problems: list[_Problem]) -> list[_Line]:
    parsed = []
    for number, raw in chunk.numbered():
        if not raw.strip():
            continue
        try:
            value = jsonio.loads(raw)
        except orjson.JSONDecodeError as error:
            problems.append((number, 400, f"not valid JSON: {error}"))
            continue
        rtype = value.get("resourceType") if isinstance(value, dict) else None
        if not isinstance(rtype, str):
            problems.append((number, 400, "not a FHIR resource (no resourceType)"))
            continue
        rid = value.get("id")
        if rid is not None and not (isinstance(rid, str) and ID_PATTERN.match(rid)):
            problems.append((number, 400, f"'{rid}' is not a valid resource id"))
            continue
        parsed.append(_Line(number, rtype, value, rid))
    return parsed


def _store(
    engine: FhirEngine, conn: Connection, lines: list[_Line], problems: list[_Problem]
) -> int:
    """Create what is new in one batch, then update what exists (or repeats), in line order."""
    known = _existing(conn, [(line.rtype, line.rid) for line in lines if line.rid is not None])
    creates, updates = [], []
    for line in lines:
        if line.rid is None:
            creates.append(line)
        elif (line.rtype, line.rid) in known:
            updates.append((line, line.rid))
        else:
            known.add((line.rtype, line.rid))
            creates.append(line)
    stored = _create(engine, conn, creates, problems)
    for line, rid in updates:
        try:
            engine.repository.update(SYSTEM, line.rtype, rid, line.resource, conn=conn)
        except FhirError as error:
            problems.append((line.number, error.status, error.diagnostics))
        else:
            stored += 1
    return stored


def _create(
    engine: FhirEngine, conn: Connection, lines: list[_Line], problems: list[_Problem]
) -> int:
    """`create_many` validates before it writes and names the first invalid item; only then
    are the remaining items validated one by one, so a clean chunk is validated once."""
    repository = engine.repository
    while lines:
        try:
            repository.create_many(SYSTEM, [(x.rtype, x.resource, x.rid) for x in lines], conn)
        except FhirError as error:
            if error.index is None:
                raise
            bad = lines[error.index]
            problems.append((bad.number, error.status, error.diagnostics))
            valid = lines[: error.index]
            for line in lines[error.index + 1 :]:
                try:
                    repository.check_type(line.rtype)
                    repository.validate(line.resource, line.rtype)
                except FhirError as invalid:
                    problems.append((line.number, invalid.status, invalid.diagnostics))
                else:
                    valid.append(line)
            lines = valid
        else:
            return len(lines)
    return 0


def _existing(conn: Connection, keys: list[tuple[str, str]]) -> set[tuple[str, str]]:
    """Which (type, id) pairs have a row, deleted or not: one query per resource type."""
    by_type: dict[str, list[str]] = {}
    for rtype, rid in keys:
        by_type.setdefault(rtype, []).append(rid)
    found: set[tuple[str, str]] = set()
    r = resource_table
    for rtype, ids in by_type.items():
        query = select(r.c.id).where(and_(r.c.type == rtype, r.c.id.in_(ids)))
        found.update((rtype, rid) for rid in conn.scalars(query))
    return found


# -- helpers ----------------------------------------------------------------------------------
def _done(engine: FhirEngine, digest: str) -> bool:
    with engine.db.read() as conn:
        return journal.is_done(conn, digest)


def one_line(error: BaseException) -> str:
    """The gist of an error for a one-line report (database errors carry SQL and links)."""
    text = str(getattr(error, "orig", None) or error).strip()
    return text.splitlines()[0] if text else type(error).__name__
