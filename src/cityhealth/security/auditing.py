"""Every caller's action leaves an AuditEvent (audit_events.audit_event), chained (audit.py):

- a write (create, update, patch, delete, bundle entries, consent changes) is recorded by the
  repository in the write's own transaction: the change and its record commit together;
- a read, search, history, $everything or export kick-off is recorded, after the data was read
  and before it is answered, in a transaction of its own;
- a refused or failed action is recorded in a transaction of its own, since its own rolled
  back: outcome 4 (refused, invalid) or 8 (failed), with what was asked for.
The platform's own work (SYSTEM: imports, the audit records themselves) records nothing here.

Each patient whose records were touched gets a record of their own (see Auditor), which they
find in "who accessed my record" (AuditEvent?patient=…).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, select, tuple_

from cityhealth.fhir.access import SYSTEM, AccessContext
from cityhealth.fhir.errors import FhirError
from cityhealth.fhir.schema import compartment
from cityhealth.fhir.store import Stored
from cityhealth.security import audit
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
    return ctx is not SYSTEM and ctx.who != SYSTEM.who


def patients_by_row(
    conn: Connection, rows: Iterable[tuple[int, int]]
) -> dict[tuple[int, int], set[str]]:
    """The patients whose compartments each row (shard, rid) is in."""
    rows = list(rows)
    found: dict[tuple[int, int], set[str]] = {}
    c = compartment
    for start in range(0, len(rows), 500):
        part = rows[start : start + 500]
        query = select(c.c.shard, c.c.rid, c.c.patient_id).where(
            tuple_(c.c.shard, c.c.rid).in_(part)
        )
        for row in conn.execute(query):
            found.setdefault((row.shard, row.rid), set()).add(row.patient_id)
    return found


class Auditor:
    """Records callers' actions. One AuditEvent per patient whose records an action touched,
    naming only that patient's records, so that what a patient reads of the trail tells them
    nothing of anyone else (IHE BALP records patient-specific events the same way); the query,
    the records of several patients and records of no patient go into one more event that
    names no patient, for the auditors."""

    def __init__(self, repository: Repository) -> None:
        self.repository = repository

    def written(
        self,
        ctx: AccessContext,
        conn: Connection,
        interaction: str,
        stored: Iterable[Stored],
        patients: dict[tuple[int, int], set[str]] | None = None,
    ) -> None:
        """Record a write inside its transaction (`patients` by row when the rows no longer
        say, as after a deletion)."""
        if not audited(ctx):
            return
        seen = Seen()
        seen.add(stored)
        self._record_all(conn, ctx, interaction, seen, patients)

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
                with self.repository.db.write() as tx:
                    refs = [what] if _named(what) else []
                    self._record(tx, ctx, interaction, outcome, refs, set(), description, query)
            raise
        if audited(ctx) and not seen.recorded:
            with self.repository.transaction(conn) as tx:
                self._record_all(tx, ctx, interaction, seen, None, query, what)

    def _record_all(
        self,
        conn: Connection,
        ctx: AccessContext,
        interaction: str,
        seen: Seen,
        patients: dict[tuple[int, int], set[str]] | None,
        query: str | None = None,
        what: str = "",
    ) -> None:
        by_row = patients if patients is not None else patients_by_row(conn, seen.refs)
        everyone = set().union(*by_row.values()) if by_row else set()
        for patient in sorted(everyone):
            refs = [ref for row, ref in seen.refs.items() if patient in by_row.get(row, ())]
            self._record(conn, ctx, interaction, SUCCESS, refs[:MAX_ENTITIES], {patient})
        if query is not None or len(everyone) != 1:
            refs = [ref for ref in seen.refs.values() if not ref.startswith("Patient/")]
            if not refs and _named(what):
                refs = [what]
            self._record(conn, ctx, interaction, SUCCESS, refs[:MAX_ENTITIES], set(), None, query)

    def _record(
        self,
        conn: Connection,
        ctx: AccessContext,
        interaction: str,
        outcome: str,
        refs: list[str],
        patients: set[str],
        description: str | None = None,
        query: str | None = None,
    ) -> None:
        emergency = bool(patients) and rules_for(ctx).break_glass
        if emergency:
            opened = self.repository.policy.emergency_patients(ctx, conn)
            emergency = bool(patients & opened)
        event = audit_event(
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
        audit.record(self.repository, conn, event)


def _named(what: str) -> bool:
    """`Type/id` of something other than a Patient: a record may name it to anyone who asked."""
    return ID_REF.fullmatch(what) is not None and not what.startswith("Patient/")
