"""Relations of care as rows of `care_link`, kept with the resources they come from.

An Encounter, Appointment, referral, episode or care team in force that names a practitioner
or an organization relates them to the patients in its compartment (policy.TREATMENT); so does
a prescription routed to a pharmacy (policy.DISPENSING). The repository writes these rows with
the resource's index rows and clears them with them, in the same transaction: an Encounter
finished or deleted closes the relation in the same commit. An access check then asks one
index (`ix_care_link_patient`) whether a record's patient is related to the caller, however
many encounters the caller's institution has.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Connection, bindparam, text

from cityhealth.fhir.indexing import IndexRows

#: Who a relation can name: the caller as a practitioner, or the caller's organization.
ACTOR_TYPES = ("Practitioner", "Organization")


@dataclass(frozen=True)
class Relation:
    """Resources of `rtype` that name an actor in one of the reference parameters `actors`,
    with a status in `statuses`, relate the actor to their patients under `name`; the relation
    opens those patients' records of `types` (None: all of them)."""

    name: str
    rtype: str
    actors: tuple[str, ...]
    statuses: tuple[str, ...]
    types: frozenset[str] | None = None


Link = tuple[str, str, str]  # (relation name, actor "Type/id", patient id)


def links(
    relations: Iterable[Relation], rtype: str, rows: IndexRows, patients: Iterable[str]
) -> list[Link]:
    """The care links of a resource of `rtype` with these index rows and compartment
    patients."""
    found: set[Link] = set()
    for relation in relations:
        if relation.rtype != rtype:
            continue
        if not any(p == "status" and code in relation.statuses for p, _s, code, _t in rows.token):
            continue
        for param, target_type, target_id, _url in rows.reference:
            if param in relation.actors and target_type in ACTOR_TYPES and target_id:
                found |= {(relation.name, f"{target_type}/{target_id}", p) for p in patients}
    return sorted(found)


def rebuild(conn: Connection, relations: Iterable[Relation]) -> None:
    """Write every care link again from the stored index rows (`links`, over the whole store;
    for a migration that introduces or changes relations)."""
    conn.execute(text("DELETE FROM care_link"))
    statement = text(_REBUILD).bindparams(
        bindparam("actors", expanding=True),
        bindparam("kinds", expanding=True),
        bindparam("statuses", expanding=True),
    )
    for relation in relations:
        conn.execute(
            statement,
            {
                "name": relation.name,
                "rtype": relation.rtype,
                "actors": list(relation.actors),
                "kinds": list(ACTOR_TYPES),
                "statuses": list(relation.statuses),
            },
        )


_REBUILD = (
    "INSERT INTO care_link (rid, shard, rtype, relation, actor, patient_id)"
    " SELECT DISTINCT a.rid, a.shard, a.rtype, :name, a.target_type || '/' || a.target_id,"
    " c.patient_id FROM idx_reference a"
    " JOIN compartment c ON c.shard = a.shard AND c.rid = a.rid"
    " WHERE a.rtype = :rtype AND a.param IN :actors AND a.target_type IN :kinds"
    " AND a.target_id IS NOT NULL AND a.target_id <> ''"
    " AND EXISTS (SELECT 1 FROM idx_token s WHERE s.shard = a.shard AND s.rid = a.rid"
    " AND s.rtype = :rtype AND s.param = 'status' AND s.code IN :statuses)"
)
