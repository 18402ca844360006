"""Bulk Data export (hl7.org/fhir/uv/bulkdata/STU2/export.html): the job that writes one NDJSON
file per resource type (more when a type is huge) under `<var_dir>/exports/<job id>/`.

One streamed query reads every selected resource in a single snapshot, so an export is a
consistent picture of the data at its `transactionTime`, whatever its size, and memory stays
flat: rows arrive in batches and go straight to the open file of their type.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
from sqlalchemy import Connection, Select, or_, select

from cityhealth.config import Settings
from cityhealth.fhir import store
from cityhealth.fhir.access import SYSTEM, AccessContext
from cityhealth.fhir.clock import instant, now_us
from cityhealth.fhir.engine import FhirEngine
from cityhealth.fhir.index_values import parse_reference
from cityhealth.fhir.schema import compartment, idx_reference, resource
from cityhealth.fhir.search_sql import own_rows
from cityhealth.jobs.runner import JobContext, JobFailed
from cityhealth.security.deidentify import deidentify
from cityhealth.security.visibility import Visibility

EXPORT_KIND = "export"
SYSTEM_LEVEL = "system"
PATIENT_LEVEL = "patient"
GROUP_LEVEL = "group"
NDJSON = "application/fhir+ndjson"

_JOB_ID = re.compile(r"^[A-Za-z0-9\-]{1,64}$")
_US_PER_HOUR = 3_600_000_000


@dataclass(frozen=True)
class ExportSettings:
    directory: Path  # jobs write into directory/<job id>/
    retention_hours: int = 24
    max_resources_per_file: int = 500_000
    batch_size: int = 1000

    @classmethod
    def from_settings(cls, settings: Settings) -> ExportSettings:
        return cls(
            directory=Path(settings.var_dir) / "exports",
            retention_hours=int(getattr(settings, "export_retention_hours", 24)),
            max_resources_per_file=int(getattr(settings, "export_max_resources_per_file", 500_000)),
            batch_size=int(getattr(settings, "export_batch_size", 1000)),
        )


@dataclass(frozen=True)
class ExportRequest:
    level: str  # system | patient | group
    types: tuple[str, ...] = ()  # empty: every type
    since: int | None = None  # epoch microseconds; last_updated ≥ since
    group_id: str | None = None
    url: str = ""  # the kick-off request, echoed as the manifest's `request`
    access: AccessContext = SYSTEM  # who asked: the export holds only what they may see

    def to_json(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "types": list(self.types),
            "since": self.since,
            "group": self.group_id,
            "url": self.url,
            "access": self.access.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExportRequest:
        return cls(
            data["level"],
            tuple(data["types"]),
            data["since"],
            data["group"],
            data["url"],
            AccessContext.from_json(data["access"]),
        )


@dataclass(frozen=True)
class ExportFile:
    type: str
    name: str  # file name inside the export's directory
    count: int


@dataclass(frozen=True)
class ExportOutput:
    transaction_time: int  # epoch microseconds
    request: str
    files: list[ExportFile] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "transactionTime": self.transaction_time,
            "request": self.request,
            "files": [{"type": f.type, "name": f.name, "count": f.count} for f in self.files],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExportOutput:
        files = [ExportFile(f["type"], f["name"], f["count"]) for f in data["files"]]
        return cls(data["transactionTime"], data["request"], files)

    def manifest(self, url_of: Callable[[str], str]) -> dict[str, Any]:
        """The Bulk Data manifest, each file's URL made by `url_of(file name)`."""
        return {
            "transactionTime": instant(self.transaction_time),
            "request": self.request,
            "requiresAccessToken": True,
            "output": [
                {"type": f.type, "url": url_of(f.name), "count": f.count} for f in self.files
            ],
            "error": [],
        }


class _Part:
    """One open NDJSON file."""

    __slots__ = ("handle", "lines", "name", "part")

    def __init__(self, directory: Path, rtype: str, part: int) -> None:
        self.name = f"{rtype}.ndjson" if part == 1 else f"{rtype}.{part}.ndjson"
        self.part = part
        self.lines = 0
        self.handle: IO[str] = open(  # noqa: SIM115 — open across batches; _Files closes it
            directory / self.name, "w", encoding="utf-8", newline="\n", buffering=1 << 20
        )


class _Files:
    """The open NDJSON file of each type; a type moves to its next part after `limit` lines."""

    def __init__(self, directory: Path, limit: int) -> None:
        self.directory = directory
        self.limit = limit
        self.done: list[ExportFile] = []
        self._open: dict[str, _Part] = {}

    def add(self, rtype: str, body: str) -> None:
        current = self._open.get(rtype)
        if current is None:
            current = self._open[rtype] = _Part(self.directory, rtype, 1)
        elif current.lines >= self.limit:
            self._close(rtype)
            current = self._open[rtype] = _Part(self.directory, rtype, current.part + 1)
        current.handle.write(body)
        current.handle.write("\n")
        current.lines += 1

    def _close(self, rtype: str) -> None:
        current = self._open.pop(rtype)
        current.handle.close()
        self.done.append(ExportFile(rtype, current.name, current.lines))

    def close(self) -> list[ExportFile]:
        for rtype in list(self._open):
            self._close(rtype)
        # Stable: the parts of a type were closed, and so stay, in order.
        return sorted(self.done, key=lambda f: f.type)


class BulkExport:
    """The `export` job kind, and the same export run in the foreground (the CLI)."""

    kind = EXPORT_KIND

    def __init__(self, engine: FhirEngine, settings: ExportSettings) -> None:
        self.engine = engine
        self.settings = settings

    def check(self, ctx: AccessContext, request: ExportRequest) -> None:
        """What must hold at kick-off: the caller's scopes allow exporting the types asked for
        (else 403), and the Group of a Group-level export exists for them (else 404)."""
        for rtype in request.types or ["Patient"]:
            self.engine.policy.require(ctx, rtype, "$export")
        if request.level == GROUP_LEVEL:
            assert request.group_id is not None
            self.engine.repository.read(ctx, "Group", request.group_id)

    def retention_us(self) -> int:
        return self.settings.retention_hours * _US_PER_HOUR

    def directory_of(self, job_id: str) -> Path:
        if not _JOB_ID.match(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.settings.directory / job_id

    def run(self, context: JobContext) -> dict[str, Any]:
        directory = self.directory_of(context.id)
        # A job left half-done by a dead process starts again from nothing.
        shutil.rmtree(directory, ignore_errors=True)
        self.engine.repository.settle_audit()  # the audit trail is exported with its index
        output = self.write(ExportRequest.from_json(context.request), directory, context.progress)
        return output.to_json()

    def discard(self, job_id: str) -> None:
        shutil.rmtree(self.directory_of(job_id), ignore_errors=True)

    def write(
        self,
        request: ExportRequest,
        directory: Path,
        progress: Callable[[str], None] | None = None,
    ) -> ExportOutput:
        """Write the NDJSON files of `request` into `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        transaction_time = now_us()
        files = _Files(directory, self.settings.max_resources_per_file)
        written = 0
        try:
            with self.engine.db.read() as conn:
                visibility = self.engine.policy.visibility(request.access, conn)
                query = self._query(conn, request, transaction_time, visibility)
                result = conn.execution_options(yield_per=self.settings.batch_size).execute(query)
                for rows in result.partitions():
                    for rtype, body in rows:
                        files.add(rtype, deidentify(body) if visibility.deidentified else body)
                    written += len(rows)
                    if progress is not None:
                        progress(f"{written} resources exported")
        finally:
            done = files.close()
        return ExportOutput(transaction_time, request.url, done)

    def _query(
        self, conn: Connection, request: ExportRequest, until: int, visibility: Visibility
    ) -> Select[Any]:
        r = resource
        # Resources changed after the transaction time belong to the next export (_since).
        where = [r.c.deleted.is_(False), r.c.last_updated <= until]
        if request.types:
            where.append(r.c.type.in_(request.types))
        seen = visibility.clause(r)
        if seen is not None:
            where.append(seen)
        if request.since is not None:
            where.append(r.c.last_updated >= request.since)
        c, dialect = compartment, conn.dialect.name
        if request.level == PATIENT_LEVEL:
            members = select(c.c.shard, c.c.rid)
            where.append(or_(r.c.type == "Patient", own_rows(r, members, dialect)))
        elif request.level == GROUP_LEVEL:
            assert request.group_id is not None
            members = self._members(conn, request.group_id)
            in_group = select(c.c.shard, c.c.rid).where(c.c.patient_id.in_(members))
            where.append(own_rows(r, in_group, dialect))
        return select(r.c.type, r.c.body).where(*where)

    def _members(self, conn: Connection, group_id: str) -> Select[Any]:
        """The ids of the Group's member patients, as a subquery over its search index (so a
        Group of any size costs no round trips); members marked inactive are left out."""
        group = store.current(conn, "Group", group_id)
        if group is None or group.deleted or group.body is None:
            raise JobFailed(f"Group/{group_id} does not exist any more")
        ref = idx_reference
        members = select(ref.c.target_id).where(
            ref.c.shard == group.shard,
            ref.c.rid == group.rid,
            ref.c.param == "member",
            ref.c.target_type == "Patient",
        )
        inactive = self._inactive_members(group.body)
        if inactive:
            members = members.where(ref.c.target_id.not_in(sorted(inactive)))
        return members

    def _inactive_members(self, body: str) -> set[str]:
        types = self.engine.definitions.resource_types
        active: set[str] = set()
        inactive: set[str] = set()
        for member in orjson.loads(body).get("member") or []:
            reference = (member.get("entity") or {}).get("reference")
            parsed = parse_reference(reference, types) if isinstance(reference, str) else None
            if parsed is None or parsed[0] != "Patient" or parsed[1] is None:
                continue
            (inactive if member.get("inactive") is True else active).add(parsed[1])
        # A patient listed again as an active member stays in the Group.
        return inactive - active
