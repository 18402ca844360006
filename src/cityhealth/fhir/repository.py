"""The one door to FHIR data: validate → index → write current, history and index rows, in one
transaction. Every call takes the caller's AccessContext."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection

from cityhealth.db import Database
from cityhealth.fhir import jsonio, store
from cityhealth.fhir.access import AccessContext
from cityhealth.fhir.clock import instant, now_us
from cityhealth.fhir.definitions import Definitions
from cityhealth.fhir.errors import (
    FhirError,
    OutcomeIssue,
    bad_request,
    gone,
    not_found,
    precondition_failed,
)
from cityhealth.fhir.indexing import Indexer, IndexRows
from cityhealth.fhir.sharding import shard_key
from cityhealth.fhir.store import APPEND_ONLY, IndexEntry, Stored
from cityhealth.fhir.validation import Validator
from cityhealth.security import audit as audit_chain
from cityhealth.security.audit_events import record_patients
from cityhealth.security.auditing import Auditor, audited, patients_by_row
from cityhealth.security.policy import Policy
from cityhealth.security.visibility import Visibility, held_by


def append_only(rtype: str) -> FhirError:
    return FhirError(
        405, "not-supported", f"{rtype} is append-only: it is never changed or deleted"
    )


ID_PATTERN = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


@dataclass(frozen=True)
class Indexed:
    """The index rows of a new version, the patients whose compartments it is in, its shard,
    the relations of care it establishes."""

    rows: IndexRows
    patients: set[str]
    shard: int
    links: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class WriteResult:
    stored: Stored
    created: bool  # a new resource (201) rather than a new version of one (200)


class Repository:
    def __init__(
        self, db: Database, definitions: Definitions, policy: Policy | None = None
    ) -> None:
        self.db = db
        self.definitions = definitions
        self.policy = policy or Policy()
        self.auditor = Auditor(self)
        self.validator = Validator(definitions)
        self.indexer = Indexer(definitions)

    # -- transactions ---------------------------------------------------------------------
    @contextmanager
    def transaction(self, conn: Connection | None = None) -> Iterator[Connection]:
        """Join the caller's transaction, or open a write transaction."""
        if conn is not None:
            yield conn
        else:
            with self.db.write() as new:
                yield new

    @contextmanager
    def reading(self, conn: Connection | None = None) -> Iterator[Connection]:
        if conn is not None:
            yield conn
        else:
            with self.db.read() as new:
                yield new

    # -- checks ---------------------------------------------------------------------------
    def check_type(self, rtype: str) -> None:
        if not self.definitions.is_resource_type(rtype):
            raise not_found(f"Unknown resource type '{rtype}'")

    @staticmethod
    def check_id(rid: str) -> None:
        if not ID_PATTERN.match(rid):
            raise bad_request(f"'{rid}' is not a valid resource id")

    def validate(self, resource: Any, rtype: str | None = None) -> None:
        if not isinstance(resource, dict):
            raise bad_request("The body must be a JSON object (a FHIR resource)")
        issues = [i for i in self.validator.validate(resource, rtype) if i.severity == "error"]
        if issues:
            raise FhirError(
                400,
                "invalid",
                issues[0].diagnostics,
                issues=[
                    OutcomeIssue(i.severity, i.code, i.diagnostics, (i.expression,)) for i in issues
                ],
            )

    # -- writes ---------------------------------------------------------------------------
    def _stamp(self, resource: dict[str, Any], rid: str, version: int, us: int) -> str:
        resource["id"] = rid
        meta = dict(resource.get("meta") or {})
        meta["versionId"] = str(version)
        meta["lastUpdated"] = instant(us)
        resource["meta"] = meta
        return jsonio.dumps(resource).decode()

    def known_shard(self, rtype: str, rid: str) -> int | None:
        """The shard of `rtype/rid` when its type alone decides it: a Patient, or a type outside
        the Patient compartment. Other types follow their patient, known only from the row."""
        if rtype == "Patient" or rtype not in self.definitions.patient_compartment:
            return shard_key(rtype, rid, ())
        return None

    def _patients(self, rtype: str, rid: str, rows: Any) -> set[str]:
        if rtype == "Patient":
            return {rid}
        params = self.definitions.patient_compartment.get(rtype, ())
        return {
            target_id
            for param, target_type, target_id, _url in rows.reference
            if param in params and target_type == "Patient" and target_id
        }

    def settle_audit(self) -> int:
        """Index and chain the AuditEvents written so far (audit.settle)."""
        return audit_chain.settle(self)

    def _indexed(self, resource: dict[str, Any], rtype: str, rid: str) -> Indexed:
        """`index`, but a record of access is indexed when settled (audit.settle): it needs
        only its patients now, for its shard."""
        if rtype not in APPEND_ONLY:
            return self.index(resource, rtype, rid)
        patients = record_patients(resource)
        return Indexed(IndexRows(), patients, shard_key(rtype, rid, patients))

    def index(self, resource: dict[str, Any], rtype: str, rid: str) -> Indexed:
        # The stamp added at write time (versionId, lastUpdated) is not indexed: this can run
        # before it, so that an update knows the shard it is about to lock.
        rows = self.indexer.index(resource)
        patients = self._patients(rtype, rid, rows)
        links = self.policy.care_links(rtype, rows, patients)
        return Indexed(rows, patients, shard_key(rtype, rid, patients), links)

    @staticmethod
    def _lock(conn: Connection, rtype: str, rid: str, shard: int | None) -> Stored | None:
        """The current row, locked. The lock names the row's shard: `shard` if it is there
        (an update that keeps its patient), else the shard an unlocked lookup finds."""
        found = store.locked(conn, rtype, rid, shard) if shard is not None else None
        while found is None:
            anywhere = store.current(conn, rtype, rid)
            if anywhere is None:
                return None
            # None again only if the resource moved to another shard in between.
            found = store.locked(conn, rtype, rid, anywhere.shard)
        return found

    def _write(
        self,
        conn: Connection,
        items: list[tuple[dict[str, Any], str, str, Stored | None, Indexed]],
        method: str,
    ) -> list[Stored]:
        """Write new versions of (resource, type, id, previous version, its index) in a few
        statements."""
        prepared = []
        for resource, rtype, rid, previous, indexed in items:
            version = previous.version + 1 if previous else 1
            us = now_us()
            body = self._stamp(resource, rid, version, us)
            prepared.append((rtype, rid, indexed.shard, version, us, body, indexed, previous))
        new = [
            {"shard": s, "type": t, "id": i, "version": v, "last_updated": us, "body": b}
            for t, i, s, v, us, b, _, previous in prepared
            if previous is None
        ]
        resources = [row for row in new if row["type"] not in APPEND_ONLY]
        records = [row for row in new if row["type"] in APPEND_ONLY]
        new_rids = {
            (row["type"], row["id"]): rid
            for rows, insert in (
                (resources, store.insert_new),
                (records, audit_chain.insert_queued),  # queued for audit.settle
            )
            for row, rid in zip(rows, insert(conn, rows), strict=True)
        }
        written: list[Stored] = []
        kept: list[Stored] = []
        index: list[IndexEntry] = []
        for rtype, rid, shard, version, us, body, indexed, previous in prepared:
            row_id = new_rids[(rtype, rid)] if previous is None else previous.rid
            stored = Stored(row_id, shard, rtype, rid, version, us, False, body, method)
            if previous is not None:
                store.clear_index(conn, previous.shard, row_id)
                if previous.shard == shard:
                    store.replace_current(conn, row_id, shard, version, us, body)
                else:  # its compartment patient changed: the rows go to the new one's shard
                    store.move(conn, previous, stored)
            written.append(stored)
            if rtype not in APPEND_ONLY:  # no history; their index comes with audit.settle
                kept.append(stored)
                index.append(
                    IndexEntry(row_id, shard, rtype, indexed.rows, indexed.patients, indexed.links)
                )
        store.add_history(conn, kept)
        store.write_index(conn, index)
        return written

    def create(
        self,
        ctx: AccessContext,
        resource: Any,
        rtype: str | None = None,
        conn: Connection | None = None,
        rid: str | None = None,
        validate: bool = True,
    ) -> WriteResult:
        """Create with a server-assigned id (any id in the body is replaced)."""
        rtype = rtype or (resource.get("resourceType") if isinstance(resource, dict) else None)
        if not isinstance(rtype, str):
            raise bad_request("The resource has no resourceType", "resourceType")
        return self.create_many(ctx, [(rtype, resource, rid)], conn, validate)[0]

    def create_many(
        self,
        ctx: AccessContext,
        items: list[tuple[str, Any, str | None]],
        conn: Connection | None = None,
        validate: bool = True,
    ) -> list[WriteResult]:
        """Create (type, resource, id or None for a new one) items together, in one
        transaction; a failing item raises with `FhirError.index` set to its position.
        `validate=False` is for resources the platform builds itself (its audit records)."""
        for position, (rtype, resource, _rid) in enumerate(items):
            try:
                self.check_type(rtype)
                if validate:
                    self.validate(resource, rtype)
            except FhirError as error:
                error.index = position
                raise
        prepared: list[tuple[dict[str, Any], str, str, Stored | None, Indexed]] = []
        for rtype, res, given in items:
            rid = given or str(uuid.uuid4())
            self.policy.stamp_holder(ctx, res, None)
            prepared.append((res, rtype, rid, None, self._indexed(res, rtype, rid)))
        with self.transaction(conn) as tx:
            for position, (_res, rtype, _rid, _prev, indexed) in enumerate(prepared):
                try:
                    self.policy.check_write(ctx, tx, rtype, "create", indexed.patients, None)
                except FhirError as error:
                    error.index = position
                    raise
            written = self._write(tx, prepared, "POST")
            patients = {
                (stored.shard, stored.rid): item[4].patients
                for stored, item in zip(written, prepared, strict=True)
            }
            self.auditor.written(ctx, tx, "create", written, patients)
        return [WriteResult(stored, True) for stored in written]

    def add_records(self, conn: Connection, events: list[dict[str, Any]]) -> list[Stored]:
        """Store the platform's own records of access (AuditEvents) in the caller's
        transaction: built by the platform, they are neither validated nor subject to the
        access rules, and nothing records them in turn."""
        items: list[tuple[dict[str, Any], str, str, Stored | None, Indexed]] = []
        for event in events:
            rid = str(uuid.uuid4())
            items.append((event, "AuditEvent", rid, None, self._indexed(event, "AuditEvent", rid)))
        return self._write(conn, items, "POST")

    def update(
        self,
        ctx: AccessContext,
        rtype: str,
        rid: str,
        resource: Any,
        if_match: int | None = None,
        conn: Connection | None = None,
        method: str = "PUT",
    ) -> WriteResult:
        """Update, or create with the client's id when the resource does not exist."""
        self.check_type(rtype)
        self.check_id(rid)
        self.validate(resource, rtype)
        if resource.get("id") is None:
            raise bad_request("The resource must carry an id equal to the one in the URL", "id")
        if resource.get("id") != rid:
            raise bad_request(
                f"The id in the body ({resource.get('id')}) differs from the URL ({rid})", "id"
            )
        self.policy.stamp_holder(ctx, resource, None)
        indexed = self.index(resource, rtype, rid)
        with self.transaction(conn) as tx:
            previous = self._lock(tx, rtype, rid, indexed.shard)
            if previous is not None and rtype in APPEND_ONLY:
                raise append_only(rtype)
            interaction = "patch" if method == "PATCH" else "update"
            self.policy.check_write(ctx, tx, rtype, interaction, indexed.patients, previous)
            if previous is not None and previous.body is not None:
                holder = held_by(previous.body)
                self.policy.stamp_holder(ctx, resource, previous)
                if holder is not None and holder != ctx.organization:
                    indexed = self.index(resource, rtype, rid)  # the record keeps its holder
            if if_match is not None and (previous is None or previous.version != if_match):
                have = "none" if previous is None or previous.deleted else previous.version
                raise precondition_failed(
                    f"Version {if_match} is not the current version of {rtype}/{rid} ({have})"
                )
            (stored,) = self._write(tx, [(resource, rtype, rid, previous, indexed)], method)
            patients = {(stored.shard, stored.rid): indexed.patients}
            self.auditor.written(ctx, tx, interaction, [stored], patients)
        return WriteResult(stored, previous is None or previous.deleted)

    def delete(
        self, ctx: AccessContext, rtype: str, rid: str, conn: Connection | None = None
    ) -> Stored | None:
        """Delete (kept in history); deleting what is absent or already deleted changes nothing."""
        self.check_type(rtype)
        self.check_id(rid)
        with self.transaction(conn) as tx:
            previous = self._lock(tx, rtype, rid, self.known_shard(rtype, rid))
            if previous is None or previous.deleted:
                return None
            if not self.policy.visibility(ctx, tx).sees(tx, previous):
                return None  # what the caller may not see is, to them, not there
            if rtype in APPEND_ONLY:
                raise append_only(rtype)
            self.policy.check_write(ctx, tx, rtype, "delete", set(), previous)
            row = {(previous.shard, previous.rid): f"{rtype}/{rid}"}
            compartments = self.definitions.patient_compartment
            patients = patients_by_row(tx, row, compartments) if audited(ctx) else {}
            us = now_us()
            shard = previous.shard  # a deleted resource stays where it was
            stored = Stored(
                previous.rid, shard, rtype, rid, previous.version + 1, us, True, None, "DELETE"
            )
            store.replace_current(tx, previous.rid, shard, stored.version, us, None)
            store.clear_index(tx, shard, previous.rid)
            store.add_history(tx, [stored])
            self.auditor.written(ctx, tx, "delete", [stored], patients)
            return stored

    # -- reads ----------------------------------------------------------------------------
    def read(
        self, ctx: AccessContext, rtype: str, rid: str, conn: Connection | None = None
    ) -> Stored:
        self.check_type(rtype)
        self.policy.require(ctx, rtype, "read")
        if not ID_PATTERN.match(rid):
            raise not_found(f"{rtype}/{rid} is not known")
        with self.reading(conn) as tx:
            found = store.current(tx, rtype, rid, shard=self.known_shard(rtype, rid))
            visibility = self.policy.visibility(ctx, tx)
            if found is not None and not visibility.sees(tx, found):
                found = None
        if found is None:
            raise not_found(f"{rtype}/{rid} is not known")
        if found.deleted:
            raise gone(f"{rtype}/{rid} was deleted")
        return visibility.present(found)

    def vread(
        self, ctx: AccessContext, rtype: str, rid: str, vid: str, conn: Connection | None = None
    ) -> Stored:
        self.check_type(rtype)
        self.policy.require(ctx, rtype, "vread")
        if not ID_PATTERN.match(rid) or not vid.isdigit():
            raise not_found(f"{rtype}/{rid}/_history/{vid} is not known")
        with self.reading(conn) as tx:
            shard = self.known_shard(rtype, rid)
            if rtype in APPEND_ONLY:  # its current row is its only version
                found = store.current(tx, rtype, rid, shard=shard)
                found = found if found is not None and found.version == int(vid) else None
            else:
                found = store.version(tx, rtype, rid, int(vid), shard=shard)
            visibility = self.policy.visibility(ctx, tx)
            if found is not None and not self._sees_resource(visibility, tx, rtype, rid):
                found = None
        if found is None:
            raise not_found(f"{rtype}/{rid}/_history/{vid} is not known")
        if found.deleted:
            raise gone(f"{rtype}/{rid} version {vid} is a deletion")
        return visibility.present(found)

    def read_any_version(
        self, ctx: AccessContext, rtype: str, rid: str, conn: Connection | None = None
    ) -> Stored:
        """The current row even when it is a deletion (instance history needs it)."""
        self.check_type(rtype)
        self.policy.require(ctx, rtype, "history")
        with self.reading(conn) as tx:
            found = (
                store.current(tx, rtype, rid, shard=self.known_shard(rtype, rid))
                if ID_PATTERN.match(rid)
                else None
            )
            visibility = self.policy.visibility(ctx, tx)
            if found is not None and not self._sees_resource(visibility, tx, rtype, rid):
                found = None
        if found is None:
            raise not_found(f"{rtype}/{rid} is not known")
        return found

    def _sees_resource(
        self, visibility: Visibility, conn: Connection, rtype: str, rid: str
    ) -> bool:
        """Whether the caller sees the resource now: its versions are seen with it."""
        if visibility.everything:
            return visibility.can_see_type(rtype)
        found = store.current(conn, rtype, rid, shard=self.known_shard(rtype, rid))
        return found is not None and visibility.sees(conn, found)
