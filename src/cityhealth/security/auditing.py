"""Every caller's action leaves an AuditEvent (audit_events.audit_event), chained (audit.py):

- a write (create, update, patch, delete, bundle entries, consent changes) is recorded by the
  repository in the write's own transaction: the change and its record commit together;
- a read, search, history, $everything or export kick-off is recorded after the data was read
  and before it is answered, in a transaction shared with the reads of other requests that
  finished meanwhile (a group commit: one commit and one turn of the chain's lock for all);
- a refused or failed action is recorded in a transaction of its own, since its own rolled
  back: outcome 4 (refused, invalid) or 8 (failed), with what was asked for.
The platform's own work (SYSTEM: imports, the audit records themselves) records nothing here.

Each patient whose records were touched gets a record of their own (see Auditor), which they
find in "who accessed my record" (AuditEvent?patient=…).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, select, tuple_

from cityhealth.fhir import jsonio, store
from cityhealth.fhir.access import SYSTEM, AccessContext
from cityhealth.fhir.errors import FhirError
from cityhealth.fhir.schema import compartment
from cityhealth.fhir.store import Stored
from cityhealth.security.audit_events import (
    BREAK_GLASS_PURPOSE,
    FAILED,
    PENDING_REVIEW,
    REFUSED,
    RESTFUL,
    RESTFUL_CODES,
    SUCCESS,
    audit_event,
    legal_basis,
)
from cityhealth.security.policy import rules_for

if TYPE_CHECKING:
    from cityhealth.fhir.repository import Repository

ID_REF = re.compile(r"[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}")
#: The most entities one record lists; a larger result is summarised by its patients.
MAX_ENTITIES = 200


@dataclass
class Seen:
    """What an action touched, filled in while it runs."""

    refs: dict[tuple[int, int], str] = field(default_factory=dict)  # (shard, rid) → Type/id
    recorded: bool = False  # a write recorded itself in its transaction

    def add(self, items: Iterable[Any]) -> None:
        for item in items:
            self.refs[(item.shard, item.rid)] = f"{item.type}/{item.id}"


def audited(ctx: AccessContext) -> bool:
    return ctx.who != SYSTEM.who


def patients_by_row(
    conn: Connection, refs: Mapping[tuple[int, int], str], compartment_types: Container[str]
) -> dict[tuple[int, int], set[str]]:
    """The patients whose compartments each row (shard, rid) → `Type/id` is in: a Patient is in
    its own, a type outside the Patient compartment in none (as `Repository.index` writes the
    compartment rows), any other as its compartment rows say."""
    found: dict[tuple[int, int], set[str]] = {}
    asked = []
    for row, ref in refs.items():
        rtype, _, rid = ref.partition("/")
        if rtype == "Patient":
            found[row] = {rid}
        elif rtype in compartment_types:
            asked.append(row)
    for row in _compartment_rows(conn, asked):
        found.setdefault((row.shard, row.rid), set()).add(row.patient_id)
    return found


def _compartment_rows(conn: Connection, rows: list[tuple[int, int]]) -> Iterator[Any]:
    if not rows:
        return
    if conn.dialect.name == "postgresql":  # one fixed statement, however many rows
        yield from store.run(conn, _PATIENTS, (jsonio.dumps(rows).decode(),))
        return
    c = compartment
    for start in range(0, len(rows), 500):
        part = rows[start : start + 500]
        where = tuple_(c.c.shard, c.c.rid).in_(part)
        yield from conn.execute(select(c.c.shard, c.c.rid, c.c.patient_id).where(where))


_PATIENTS = (
    "SELECT c.shard, c.rid, c.patient_id FROM json_array_elements(?::json) AS e"
    " JOIN compartment c ON c.shard = (e->>0)::bigint AND c.rid = (e->>1)::bigint"
)


@dataclass
class _Read:
    """A read waiting for its records to be committed."""

    ctx: AccessContext
    interaction: str
    seen: Seen
    query: str | None
    what: str
    done: Future[None] = field(default_factory=Future)
    wake: threading.Event = field(default_factory=threading.Event)  # done, or its turn to write


class _GroupCommit:
    """Records of reads from many request threads, stored together: one transaction and one
    commit for every read that arrived in the meantime. A thread that finds no batch being
    written writes the queue (its own records and all queued meanwhile); the others wait for
    their own record, and when a batch is done, the oldest read still queued is woken to write
    the next. Each thread writes at most one batch, and returns once its own records are
    committed, so no answer leaves without its record; only the threads that are done, or whose
    turn it is, are woken."""

    def __init__(self, write: Callable[[list[_Read]], None]) -> None:
        self._write = write
        self._lock = threading.Lock()
        self._queue: list[_Read] = []
        self._writing = False

    def submit(self, read: _Read) -> None:
        with self._lock:
            self._queue.append(read)
            turn = not self._writing
            self._writing = True
        if not turn:
            read.wake.wait()
            if read.done.done():
                read.done.result()  # raises if its batch failed
                return
        with self._lock:  # its turn: the writing was handed over to it
            batch, self._queue = self._queue, []
        try:
            self._write(batch)
        except BaseException as error:  # each request of the batch fails with its record
            for queued in batch:
                queued.done.set_exception(error)
        else:
            for queued in batch:
                queued.done.set_result(None)
        finally:
            for queued in batch:
                queued.wake.set()
            with self._lock:
                if self._queue:
                    self._queue[0].wake.set()  # the next batch is the oldest waiter's to write
                else:
                    self._writing = False
        read.done.result()


class Auditor:
    """Records callers' actions. One AuditEvent per patient whose records an action touched,
    naming only that patient's records, so that what a patient reads of the trail tells them
    nothing of anyone else (IHE BALP records patient-specific events the same way); the query,
    the records of several patients and records of no patient go into one more event that
    names no patient, for the auditors."""

    def __init__(self, repository: Repository) -> None:
        self.repository = repository
        self._reads = _GroupCommit(self._store_reads)

    def written(
        self,
        ctx: AccessContext,
        conn: Connection,
        interaction: str,
        stored: Iterable[Stored],
        patients: dict[tuple[int, int], set[str]] | None = None,
    ) -> None:
        """Record a write inside its transaction; `patients` by row, when the writer knows them
        (else they are read from the compartment rows)."""
        if not audited(ctx):
            return
        seen = Seen()
        seen.add(stored)
        by_row = patients if patients is not None else self._patients(conn, seen.refs)
        self._store(conn, self._events(conn, ctx, interaction, seen, by_row))

    @contextmanager
    def action(
        self,
        ctx: AccessContext,
        interaction: str,
        what: str,
        conn: Connection | None = None,
        query: str | None = None,
    ) -> Iterator[Seen]:
        """Record the action run in the block: a read once it has read (its Seen names what it
        touched), a refusal or failure once it has been rolled back. Inside a caller's
        transaction (`conn`), the read is recorded there, and a failure by the caller.

        A refusal names what was asked for but no patient: the record of asking for a hidden
        record and for a missing one must read the same to the one who asked."""
        seen = Seen()
        try:
            yield seen
        except FhirError as error:
            if audited(ctx) and conn is None:
                outcome = FAILED if error.status >= 500 else REFUSED
                description = f"{error.status} {error.diagnostics}"[:500]
                refs = [what] if _named(what) else []
                with self.repository.db.write() as tx:
                    event = self._event(
                        ctx, interaction, outcome, refs, set(), False, description, query
                    )
                    self._store(tx, [event])
            raise
        if not audited(ctx) or seen.recorded:
            return
        if conn is not None:
            by_row = self._patients(conn, seen.refs)
            self._store(conn, self._events(conn, ctx, interaction, seen, by_row, query, what))
        else:
            self._reads.submit(_Read(ctx, interaction, seen, query, what))

    def _store_reads(self, reads: list[_Read]) -> None:
        with self.repository.db.write() as conn:
            by_row = self._patients(conn, {k: v for r in reads for k, v in r.seen.refs.items()})
            events = []
            for r in reads:
                mine = {row: by_row[row] for row in r.seen.refs if row in by_row}
                events += self._events(conn, r.ctx, r.interaction, r.seen, mine, r.query, r.what)
            self._store(conn, events)

    def _patients(
        self, conn: Connection, refs: Mapping[tuple[int, int], str]
    ) -> dict[tuple[int, int], set[str]]:
        return patients_by_row(conn, refs, self.repository.definitions.patient_compartment)

    def _store(self, conn: Connection, events: list[dict[str, Any]]) -> None:
        self.repository.add_records(conn, events)

    def _events(
        self,
        conn: Connection,
        ctx: AccessContext,
        interaction: str,
        seen: Seen,
        by_row: dict[tuple[int, int], set[str]],
        query: str | None = None,
        what: str = "",
    ) -> list[dict[str, Any]]:
        everyone = set().union(*by_row.values()) if by_row else set()
        opened = self._in_emergency(ctx, conn, everyone)
        events = []
        for patient in sorted(everyone):
            refs = [ref for row, ref in seen.refs.items() if patient in by_row.get(row, ())]
            emergency = patient in opened
            events.append(
                self._event(ctx, interaction, SUCCESS, refs[:MAX_ENTITIES], {patient}, emergency)
            )
        if query is not None or len(everyone) != 1:
            refs = [ref for ref in seen.refs.values() if not ref.startswith("Patient/")]
            if not refs and _named(what):
                refs = [what]
            events.append(
                self._event(ctx, interaction, SUCCESS, refs[:MAX_ENTITIES], set(), query=query)
            )
        return events

    def _in_emergency(self, ctx: AccessContext, conn: Connection, patients: set[str]) -> set[str]:
        """Which of the patients the caller reached through a break-glass declaration (one
        look for the whole action)."""
        if not patients or not rules_for(ctx).break_glass:
            return set()
        return patients & self.repository.policy.emergency_patients(ctx, conn)

    @staticmethod
    def _event(
        ctx: AccessContext,
        interaction: str,
        outcome: str,
        refs: list[str],
        patients: set[str],
        emergency: bool = False,
        description: str | None = None,
        query: str | None = None,
    ) -> dict[str, Any]:
        return audit_event(
            ctx,
            interaction,
            (RESTFUL, interaction if interaction in RESTFUL_CODES else "operation"),
            outcome,
            patients=patients,
            entities=[r for r in refs if not r.startswith("Patient/")],
            description=description or ctx.reason,
            query=query,
            purpose=BREAK_GLASS_PURPOSE if emergency else None,
            legal_basis=legal_basis(ctx, emergency),
            tags=[PENDING_REVIEW] if emergency else None,
        )


def _named(what: str) -> bool:
    """`Type/id` of something other than a Patient: a record may name it to anyone who asked."""
    return ID_REF.fullmatch(what) is not None and not what.startswith("Patient/")
