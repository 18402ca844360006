"""Break-glass (紧急调阅): a doctor or nurse facing an emergency declares it for one patient,
with a reason, and sees that patient's whole record for `break_glass_minutes`.

The declaration is itself the grant: an AuditEvent (subtype break-glass, purpose BTG and
ETREAT, the reason in the patient entity's description) tagged for review, which the audit
administrator finds with `AuditEvent?_tag=https://cityhealth.cn/fhir/CodeSystem/audit-review|pending`.
While it is open, the access rules read it back (`open_emergencies`) and every access it opens
is recorded with the emergency purpose."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import Connection, select

from cityhealth.fhir.access import AccessContext
from cityhealth.fhir.clock import now_us
from cityhealth.fhir.schema import compartment, idx_date, idx_reference, idx_token
from cityhealth.fhir.search_sql import own_rows
from cityhealth.fhir.store import Stored
from cityhealth.security import audit
from cityhealth.security.audit_events import (
    BREAK_GLASS_PURPOSE,
    PENDING_REVIEW,
    SUBTYPE,
    audit_event,
)

if TYPE_CHECKING:
    from cityhealth.fhir.repository import Repository

BREAK_GLASS = "break-glass"
MIN_REASON = 4


def declare(
    repository: Repository, conn: Connection, ctx: AccessContext, patient_id: str, reason: str
) -> Stored:
    """Record the emergency declaration (the caller checked the role and the patient)."""
    event = audit_event(
        ctx,
        "operation",
        (SUBTYPE, BREAK_GLASS),
        patients=[patient_id],
        description=reason,
        purpose=BREAK_GLASS_PURPOSE,
        legal_basis="emergency",
        tags=[PENDING_REVIEW],
    )
    return audit.record(repository, conn, event)


def open_emergencies(conn: Connection, who: str, minutes: int) -> set[str]:
    """Patient ids of the break-glass declarations of `who` made in the last `minutes`."""
    kind, _, rid = who.partition("/")
    a, s, d, c = idx_reference.alias(), idx_token.alias(), idx_date.alias(), compartment.alias()
    dialect = conn.dialect.name
    since = now_us() - minutes * 60_000_000
    declared = select(s.c.shard, s.c.rid).where(
        s.c.rtype == "AuditEvent",
        s.c.param == "subtype",
        s.c.system == SUBTYPE,
        s.c.code == BREAK_GLASS,
    )
    recent = select(d.c.shard, d.c.rid).where(
        d.c.rtype == "AuditEvent", d.c.param == "date", d.c.high > since
    )
    mine = select(a.c.shard, a.c.rid).where(
        a.c.rtype == "AuditEvent",
        a.c.param == "agent",
        a.c.target_type == kind,
        a.c.target_id == rid,
        own_rows(a, declared, dialect),
        own_rows(a, recent, dialect),
    )
    rows = conn.execute(select(c.c.patient_id).where(own_rows(c, mine, dialect)).distinct())
    return {row.patient_id for row in rows}
